"""Checkpoints, the only module that touches orbax: save, list, restore, the same-model check, and what happens
when a checkpoint cannot be read, for pretraining and for the evaluation jobs, on one process or several.

A checkpoint that cannot be read is set aside (moved to ``WORKDIR/damaged_checkpoints/``) only when the
checkpoint itself shows the damage (:func:`inspect`): files missing or truncated, metadata that does not parse,
arrays that do not decode. Anything else is not the checkpoint's fault, and nothing is moved:

- an error that goes away (the storage answered 503 once) is retried with backoff for up to
  ``restore_retry_seconds``;
- one that stays (out of memory while restoring, a bug, storage down for longer) ends the job with
  :class:`CheckpointReadError`, one line naming the checkpoint and the error, every checkpoint left where it
  was, and never a new run from step 0 over them.

Several processes read together and agree on every outcome: each restores its own shards without orbax's
cross-process barriers (a process that fails mid-restore cannot leave the others waiting in one), then they
compare results; the damage verdict is any process's, the decision to give up process 0's clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

from vicreg_jax import distributed, errors, parallel

ITEM = 'default'  # the folder of a step that holds the state (orbax's single-item layout)

# tensorstore's status codes that say the stored bytes are wrong or absent (the checkpoint's fault); any other
# (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, PERMISSION_DENIED, INTERNAL, ...) says nothing about it.
_DAMAGE_CODES = ('NOT_FOUND', 'OUT_OF_RANGE', 'DATA_LOSS', 'INVALID_ARGUMENT', 'FAILED_PRECONDITION')


class CheckpointReadError(errors.UserError):
  """A checkpoint that looks intact could not be read within ``restore_retry_seconds``: the job stops and every
  checkpoint stays where it is. Exit status 1: storage that failed may come back, so a supervisor restarts."""
  status = 1


class InspectionError(Exception):
  """The storage could not be read while inspecting a checkpoint: no evidence either way."""


# --- writing and listing --------------------------------------------------------------------------------------

def manager(directory: str, keep: int, keep_every: int = 0) -> ocp.CheckpointManager:
  """An orbax manager writing to ``directory`` (created), keeping the newest ``keep`` checkpoints and, with
  ``keep_every`` > 0, every one whose step is a multiple of ``keep_every`` (for the evaluation jobs); each save
  deletes the checkpoints neither rule keeps, those of earlier runs in ``directory`` included.

  A save lands in a temporary directory renamed when complete, so a save cut short (a kill) never looks like
  a checkpoint; the manager deletes such leftovers when it starts. Tests can hold one save open before its
  rename (:data:`HOLD_SAVE_ENV`)."""
  policies = [ocp.checkpoint_managers.LatestN(keep)]
  if keep_every:
    policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), create=True,
      cleanup_tmp_directories=True, temporary_path_class=_held_save_class()))


def reader(directory: str) -> ocp.CheckpointManager:
  """An orbax manager that only lists ``directory`` (never writes or deletes there)."""
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
  """Checkpoint ``step`` of ``state`` (asynchronous; every process joins)."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def steps(mngr: ocp.CheckpointManager) -> list[int]:
  """The finalised checkpoints' steps, oldest first, as the storage lists them now."""
  mngr.reload()
  return sorted(int(s) for s in mngr.all_steps())


def path(directory: str, step: int) -> str:
  """The folder holding checkpoint ``step``'s state."""
  return os.path.join(str(directory), str(step), ITEM)


def item_metadata(directory: str, step: int) -> dict:
  """The tree of array metadata (shape, dtype) of checkpoint ``step``; raises if it cannot be read."""
  meta = ocp.StandardCheckpointer().metadata(path(directory, step)).item_metadata
  if meta is None:
    raise OSError(f'the metadata of checkpoint {step} in {directory} cannot be read')
  return dict(meta)


# Tests: VICREG_JAX_TEST_HOLD_SAVE=STEP holds the save of checkpoint STEP open for ever just before its final
# rename, after writing the temporary directory's path to WORKDIR/save_held (so a test can kill the run while
# that save is provably in flight).
HOLD_SAVE_ENV = 'VICREG_JAX_TEST_HOLD_SAVE'
# Tests: VICREG_JAX_TEST_RESTORE_FAULT=PROCESS:COUNT:KIND makes process PROCESS's first COUNT restores raise
# KIND ('storage': an OSError as a 503 from GCS; 'memory': a MemoryError), before reading anything.
RESTORE_FAULT_ENV = 'VICREG_JAX_TEST_RESTORE_FAULT'
_faults = {'raised': 0}


def _held_save_class():
  hold = os.environ.get(HOLD_SAVE_ENV)
  if not hold:
    return None
  from orbax.checkpoint.path import atomicity

  class HeldSave(atomicity.AtomicRenameTemporaryPath):
    async def finalize(self):
      if self.get_final().name == hold:
        marker = self.get_final().parent.parent / 'save_held'
        marker.write_text(str(self.get()))
        while True:
          await asyncio.sleep(3600)
      await super().finalize()

  return HeldSave


def _injected_fault() -> None:
  spec = os.environ.get(RESTORE_FAULT_ENV)
  if not spec:
    return
  process, count, kind = spec.split(':')
  if int(process) == jax.process_index() and _faults['raised'] < int(count):
    _faults['raised'] += 1
    if kind == 'memory':
      raise MemoryError('injected: out of memory while restoring')
    raise OSError('injected: 503 Service Unavailable')


# --- reading --------------------------------------------------------------------------------------------------

def _local(handler_class):
  """A checkpointer for this process alone: no barrier with the others (they compare outcomes afterwards)."""
  options = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
  return ocp.Checkpointer(handler_class(multiprocessing_options=options), multiprocessing_options=options)


def _restore_state(directory: str, step: int, target: Any) -> Any:
  """Checkpoint ``step`` laid out like ``target`` (this process's shards)."""
  _injected_fault()
  return _local(ocp.StandardCheckpointHandler).restore(path(directory, step),
                                                        args=ocp.args.StandardRestore(target))


def restore_subtrees(directory: str, step: int, target: dict) -> dict:
  """Only the subtrees of checkpoint ``step`` that ``target`` (ShapeDtypeStructs with shardings) names, laid out
  as it says (this process's shards; no retry: see :func:`read_agreed`)."""
  _injected_fault()
  return _local(ocp.PyTreeCheckpointHandler).restore(path(directory, step), args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))


def numpy_arrays(item: str) -> dict:
  """Every array of the checkpoint whose state folder is ``item`` (``.../STEP/default``), as numpy, whatever the
  devices or processes that wrote it (tests, benchmarks, post-mortems)."""
  meta = ocp.StandardCheckpointer().metadata(str(item)).item_metadata
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return ocp.PyTreeCheckpointer().restore(str(item), args=ocp.args.PyTreeRestore(restore_args=restore_args))


def inspect(directory: str, step: int) -> Optional[str]:
  """What is wrong with checkpoint ``step`` in ``directory`` judged from its files alone: its metadata missing or
  not parsing, an array's bytes missing, truncated or not decoding (every array is read in full, one at a time);
  None when all of it reads back, 'gone' when the whole checkpoint is (deleted meanwhile: not damage).
  Raises :class:`InspectionError` when the storage itself fails (no evidence either way)."""
  item = path(directory, step)
  try:
    if not tf.io.gfile.isdir(os.path.dirname(item)):
      return 'gone'
    if not tf.io.gfile.exists(os.path.join(item, '_METADATA')):
      return 'its metadata file _METADATA is missing'
    with tf.io.gfile.GFile(os.path.join(item, '_METADATA'), 'rb') as f:
      raw = f.read()
  except (OSError, tf.errors.OpError) as e:
    raise InspectionError(f'{type(e).__name__}: {e}') from e
  try:
    meta = json.loads(raw)
    tree = meta['tree_metadata']
    arrays = ['.'.join(str(k['key']) for k in v['key_metadata']) for v in tree.values()
              if not v['value_metadata'].get('skip_deserialize')]
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return f'its metadata does not parse ({type(e).__name__}: {e})'
  import tensorstore as ts  # orbax's storage layer
  base = item if '://' in item else 'file://' + os.path.abspath(item)
  for name in arrays:
    kvstore = ({'driver': 'ocdbt', 'base': base + '/', 'path': name + '/'} if meta.get('use_ocdbt', True)
               else f'{base}/{name}/')
    try:
      ts.open({'driver': 'zarr3' if meta.get('use_zarr3') else 'zarr', 'kvstore': kvstore}).result().read().result()
    except ValueError as e:  # tensorstore's errors: 'CODE: message'
      code = str(e).split(':', 1)[0]
      if code in _DAMAGE_CODES:
        return f'array {name} cannot be read back ({str(e)[:200]})'
      raise InspectionError(f'{name}: {str(e)[:300]}') from e
  return None


# Outcomes of reading one checkpoint on every process, agreed.
READ, DAMAGED, GONE = 'read', 'damaged', 'gone'
_OK, _FAILED, _UNKNOWN, _GONE, _DAMAGED = 0, 1, 2, 3, 4


def read_agreed(read: Callable[[], Any], directory: str, step: int, retry_seconds: float,
                what: str) -> tuple[str, Any]:
  """``read()`` of checkpoint ``step`` on every process, retried until every process has read it: returns
  ``(READ, value)``, ``(DAMAGED, reason)`` when any process's :func:`inspect` found damage, ``(GONE, None)``
  when the checkpoint was deleted meanwhile. Any other failure is retried with backoff (1, 2, 4 … 60 s) for up
  to ``retry_seconds``, then :class:`CheckpointReadError` on every process, nothing moved. (A checkpoint this
  process has inspected and found whole is not inspected again: at ImageNet scale that reads gigabytes.) A
  :class:`errors.WorkdirError` from ``read`` (another model's checkpoint) is raised at once. ``what``: the job's
  name for the checkpoint in messages. Every process must call it together."""
  started, delay, intact = time.monotonic(), 1.0, False
  while True:
    error, value = None, None
    try:
      value = read()
    except errors.WorkdirError:
      raise
    except Exception as e:  # noqa: BLE001  (judged below, by inspecting the checkpoint)
      error = e
    if not parallel.gather(np.array([error is not None])).any():
      return READ, value
    verdict, reason = _OK, None
    if error is not None and intact:  # read in full once already: no need to read it all again
      verdict = _FAILED
    elif error is not None:
      try:
        reason = inspect(directory, step)
        verdict = _FAILED if reason is None else _GONE if reason == 'gone' else _DAMAGED
        intact = reason is None
      except InspectionError as e:
        verdict, reason = _UNKNOWN, str(e)
    verdicts = parallel.gather(np.array([verdict]))
    if (verdicts == _DAMAGED).any():
      return DAMAGED, reason if verdict == _DAMAGED else 'damaged as another process found'
    if (verdicts == _GONE).any():
      return GONE, None
    waited = distributed.share_from_process_0(lambda: time.monotonic() - started)
    cause = f'{type(error).__name__}: {str(error)[:300]}' if error is not None else 'another process could not'
    judged = (f'inspecting its files failed too ({reason[:200]})' if verdict == _UNKNOWN else
              'its files show no damage')
    if waited >= retry_seconds:
      raise CheckpointReadError(
          f'cannot read {what} {step} in {directory} ({cause}); {judged}, so it was left where it is; '
          f'gave up after {waited:.0f} s of retries (restore_retry_seconds); run the same command again once '
          'the cause is fixed')
    logging.warning('Cannot read %s %d in %s (%s); %s: trying again in %.0f s.', what, step, directory, cause,
                    judged, min(delay, retry_seconds - waited))
    time.sleep(max(0.0, min(delay, retry_seconds - waited)))
    delay = min(2 * delay, 60.0)


def set_aside(mngr: ocp.CheckpointManager, step: int, workdir: str, prefix: str = '') -> Optional[str]:
  """Moves the damaged checkpoint ``step`` out of the manager's directory to
  ``workdir/damaged_checkpoints/PREFIXSTEP-TIME`` (process 0; kept for a post-mortem, and out of the way of the
  job's next save of that step), then reloads the manager's listing. Returns where it went (on every process)."""
  def move():
    where = os.path.join(workdir, 'damaged_checkpoints', f'{prefix}{step}-{int(time.time())}')
    tf.io.gfile.makedirs(os.path.dirname(where))
    tf.io.gfile.rename(os.path.join(str(mngr.directory), str(step)), where)
    return where
  where = distributed.share_from_process_0(move)
  mngr.reload()
  return where


def restore_newest(mngr: ocp.CheckpointManager, target: Any, workdir: str, retry_seconds: float,
                   what: str = 'checkpoint', check: Optional[Callable[[int], None]] = None,
                   prefix: str = '') -> Optional[Any]:
  """The newest checkpoint in ``mngr`` restored like ``target``, or None when there is none. Damaged ones are set
  aside (:func:`set_aside`, with a warning) and the one before tried; any other failure is retried, then ends
  the job (:func:`read_agreed`). ``check(step)`` runs first (e.g. :func:`check_same_model`)."""
  directory = str(mngr.directory)

  def read(step):
    if check is not None:
      check(step)
    return _restore_state(directory, step, target)

  for step in reversed(steps(mngr)):
    outcome, value = read_agreed(lambda s=step: read(s), directory, step, retry_seconds, what)
    if outcome == READ:
      logging.info('Resumed from %s at step %d.', directory, step)
      return value
    if outcome == DAMAGED:
      where = set_aside(mngr, step, workdir, prefix)
      logging.warning('%s %d in %s is damaged (%s); moved to %s, trying the one before.', what.capitalize(), step,
                      directory, value, where)
  return None


def check_same_model(directory: str, step: int, state: Any, workdir: str) -> None:
  """:class:`errors.WorkdirError` if checkpoint ``step`` (its metadata) holds arrays of other shapes or names
  than ``state``'s params and batch_stats (another model's run)."""
  def shapes(tree) -> dict:  # the model's arrays (plain dicts: the same key paths in the checkpoint and here)
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)
            if jax.tree_util.keystr(k).startswith(("['params']", "['batch_stats']"))}

  theirs, ours = shapes(item_metadata(directory, step)), shapes(flax.serialization.to_state_dict(state))
  diff = sorted((k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)),
                key=lambda k: (not k.startswith("['params']"), k))  # a parameter is the clearest example
  if diff:
    k = diff[0]
    raise errors.WorkdirError(
        f'{workdir} holds checkpoints of another model: {len(diff)} array(s) differ, e.g. {k} is '
        f'{theirs.get(k, "absent")} there and {ours.get(k, "absent")} in this config; pass a new --workdir, or '
        'the config that run was started with')


# --- the evaluation jobs' reader ------------------------------------------------------------------------------

def backbone_target(directory: str, step: int, mesh) -> dict:
  """``{'params': {'backbone': …}, 'batch_stats': {'backbone': …}}``: the shapes of pretraining checkpoint
  ``step``'s backbone (not the projector's), replicated over ``mesh``, from its metadata (this process only). A
  backbone without BatchNorm (a ViT) has no ``batch_stats`` entry."""
  meta = item_metadata(directory, step)
  sharding = parallel.replicated(mesh)
  return {k: {'backbone': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                       meta[k]['backbone'])} for k in ('params', 'batch_stats')
          if 'backbone' in (meta.get(k) or {})}


def read_backbone(directory: str, step: int, mesh, retry_seconds: float) -> tuple[str, Any]:
  """``(READ, {'params', 'batch_stats'})`` of the backbone in pretraining checkpoint ``step`` (only those two
  subtrees, laid out for this job's devices, which may differ in number from the pretraining run's), or
  ``(DAMAGED, reason)`` / ``(GONE, None)`` (:func:`read_agreed`; the pretraining run's checkpoints are never
  moved by a reader)."""
  def read():
    restored = restore_subtrees(directory, step, backbone_target(directory, step, mesh))
    return {k: restored[k]['backbone'] if k in restored else {} for k in ('params', 'batch_stats')}
  return read_agreed(read, directory, step, retry_seconds, 'pretraining checkpoint')

