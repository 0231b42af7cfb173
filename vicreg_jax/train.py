"""Pretraining: the loop and its periodic actions (the step itself is in :mod:`vicreg_jax.step`), the final
probe."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from vicreg_jax import errors, methods, parallel, runs
from vicreg_jax.data import pipeline, sources
from vicreg_jax.evaluate import classifier, diagnostics, knn, probe
from vicreg_jax.metrics import IntervalMean
from vicreg_jax.step import TrainState, build_model, init_state, make_diagnostics, make_train_step  # noqa: F401


def make_probe(config, num_classes: int):
  """The online probe's head and optimiser (SGD with momentum, constant lr), or (None, None) when disabled."""
  if not config.online_probe.enabled:
    return None, None
  return (classifier.Head(num_classes),
          optax.sgd(config.online_probe.lr, momentum=config.online_probe.momentum))


# --- the loop's periodic actions ------------------------------------------------------------------------------

@dataclasses.dataclass
class StepOutput:
  """What one step returned; the collapse diagnostics are computed at most once, by the first action asking."""
  state: TrainState
  metrics: dict
  h1: jax.Array
  z1: jax.Array
  diagnose: Any
  _collapse: Any = None

  def collapse(self):
    if self._collapse is None:
      self._collapse = self.diagnose(self.h1, self.z1)
    return self._collapse


def _every(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


class OnlineProbeEpoch:
  """At the end of every epoch: the online probe's mean train top-1 over the epoch (an early collapse
  warning), summed on the device meanwhile and copied one step later (when that step has finished anyway)."""

  def __init__(self, writer, epoch_steps: int, total_steps: int):
    self.writer, self.epoch_steps, self.total_steps = writer, epoch_steps, total_steps
    self.mean = IntervalMean()

  def __call__(self, step: int, out: StepOutput):
    self.flush(step)
    self.mean.add({k: out.metrics[k] for k in ('online_probe_top1', 'finite')})
    if _every(step, self.epoch_steps, self.total_steps):
      self.mean.end(step)

  def flush(self, step: int) -> None:
    """Reports the epoch that ended before ``step``, if any."""
    del step
    if (done := self.mean.pending()) is not None:
      end, means = done
      self.writer.write_scalars(end, {'online_probe/epoch_top1': means['online_probe_top1']})
      logging.info('epoch %d: online linear probe train top-1 %.3f', math.ceil(end / self.epoch_steps),
                   means['online_probe_top1'])


class StepMetrics:
  """Every ``every`` steps, at every ``log_every``-th and at the last: each step metric's mean over the steps
  since the last write (summed on the device meanwhile: one copy to the host per write; the learning rate and
  EMA decay as at the step) to the writer. Between progress lines an interval's means are copied one step later,
  once the loop has waited for its last step anyway, so that writing them never stalls the loop; at a progress
  line (whose diagnostics wait for the step) at once. :attr:`last` holds the latest means, for that line."""

  def __init__(self, writer, every: int, log_every: int, total_steps: int):
    if every < 1:
      raise errors.ConfigError(f'metrics_every_steps must be at least 1, not {every}')
    self.writer, self.every, self.log_every, self.total_steps = writer, every, log_every, total_steps
    self.mean = IntervalMean(latest=('learning_rate', 'ema_decay'))
    self.last: dict = {}

  def __call__(self, step: int, out: StepOutput):
    self._write_pending()
    self.mean.add(out.metrics)
    if _every(step, self.log_every, self.total_steps):
      self.flush(step)
    elif _every(step, self.every, self.total_steps):
      self.mean.end(step)

  def _write_pending(self) -> None:
    if (done := self.mean.pending()) is not None:
      self.writer.write_scalars(*done)

  def flush(self, step: int) -> None:
    """Writes what is not written yet: the pending interval, and the means of the steps since, at ``step`` (also
    where a run stops early)."""
    self._write_pending()
    if self.mean.steps:
      self.last = self.mean.take()
      self.writer.write_scalars(step, self.last)


class LogMetrics:
  """Every ``every`` steps: the collapse diagnostics to the writer and one progress line with the step metrics'
  latest means (loss, the method's terms, embedding std, learning rate; from :class:`StepMetrics`, which runs
  before), RankMe of the embeddings, and the share of the time since the last line spent waiting for input, when
  ``input_wait`` is an :class:`InputWait`."""

  def __init__(self, writer, every: int, total_steps: int, terms, step_metrics: StepMetrics, input_wait=None):
    self.writer, self.every, self.total_steps, self.terms = writer, every, total_steps, terms
    self.step_metrics, self.input_wait = step_metrics, input_wait

  def __call__(self, step: int, out: StepOutput):
    if not _every(step, self.every, self.total_steps):
      return
    m = jax.device_get(out.collapse()[0])
    if self.input_wait is not None:
      m['input_wait_share'] = self.input_wait.share()
    self.writer.write_scalars(step, m)  # the writer may be asynchronous: m is not changed after this
    m = {**m, **self.step_metrics.last}
    wait = f'  input_wait {m["input_wait_share"]:.0%}' if self.input_wait is not None else ''
    terms = '  '.join(f'{t} {m[t]:.4f}' for t in self.terms)
    logging.info(f'step {step}/{self.total_steps}  loss {m["loss"]:.4f}  {terms}  emb_std {m["embedding_std"]:.3f}  '
                 f'emb_rankme {m["emb/rankme"]:.1f}  lr {m["learning_rate"]:.4g}{wait}')


class SpectrumImage:
  """Every ``every`` steps: the singular-value spectra of the batch's representations and embeddings as a
  TensorBoard image."""

  def __init__(self, writer, every: int, total_steps: int):
    self.writer, self.every, self.total_steps = writer, every, total_steps

  def __call__(self, step: int, out: StepOutput):
    if _every(step, self.every, self.total_steps):
      s_h, s_z = jax.device_get(out.collapse()[1])
      image = diagnostics.spectrum_plot({'representations': s_h, 'embeddings': s_z}, title=f'step {step}')
      self.writer.write_images(step, {'spectrum': image[None]})


class NonFiniteGuard:
  """Reads each step's ``finite`` flag once the step has finished anyway (the loop keeps at most two steps in
  flight), so without a host sync of its own. A non-finite step (whose update the step itself dropped) ends the
  run with :class:`errors.NonFiniteError` naming the step and the term (``nonfinite='stop'``), or is counted
  and logged (``'skip'``)."""

  def __init__(self, mode: str, terms, writer):
    if mode not in ('stop', 'skip'):
      raise errors.ConfigError(f"nonfinite must be 'stop' or 'skip', not {mode!r}")
    self.mode, self.terms, self.writer = mode, terms, writer
    self.skipped, self.checked = 0, 0

  def check(self, step: int, metrics) -> None:
    """Checks step ``step`` (once; ``metrics`` of that step, finished or not)."""
    if metrics is None or step <= self.checked:
      return
    self.checked = step
    if bool(jax.device_get(metrics['finite'])):
      return
    m = jax.device_get(metrics)
    bad = [t for t in (*self.terms, 'loss') if t in m and not math.isfinite(float(m[t]))]  # the culprit first
    what = f'{bad[0]} became {float(m[bad[0]])}' if bad else 'the gradients became non-finite (the loss did not)'
    if self.mode == 'stop':
      raise errors.NonFiniteError(
          f'step {step}: {what}; stopped, the update not applied and the checkpoints intact. Lower optim.base_lr, '
          'check the data, or pass --config.nonfinite=skip to skip such steps')
    self.skipped += 1
    self.writer.write_scalars(step, {'nonfinite_skipped': self.skipped})
    logging.warning('step %d: %s; update skipped (%d step(s) skipped so far)', step, what, self.skipped)


class Preemption:
  """SIGTERM (a preempted TPU VM, SLURM's time limit, ``kill``) asks the run to stop after the current step.

  One process: a signal handler sets a flag. Several: JAX's preemption service (which handles SIGTERM itself,
  on whichever processes receive it) makes every process answer True at the same step, the one after the
  highest step any process had reached."""

  def __init__(self):
    self.several = jax.process_count() > 1
    self.received, self._previous = False, None
    if not self.several:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self.received = True

  def reached(self, step: int) -> bool:
    if self.several:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Checkpoint:
  """Every ``every`` steps and at this invocation's last step: an orbax checkpoint (asynchronous; every process
  joins); never of a step the guard has not cleared."""

  def __init__(self, mngr, every: int, stop_step: int, guard: NonFiniteGuard):
    self.mngr, self.every, self.stop_step, self.guard = mngr, every, stop_step, guard

  def __call__(self, step: int, out: StepOutput, force: bool = False):
    if force or _every(step, self.every, self.stop_step):
      self.guard.check(step, out.metrics)
      self.mngr.save(step, args=ocp.args.StandardSave(out.state), force=force)


# --- the run --------------------------------------------------------------------------------------------------

def _initial_state(config, tx, online, mesh, mngr, workdir: str) -> TrainState:
  """A fresh replicated state, or that of the newest checkpoint that can be read: a damaged one (truncated,
  files missing) is set aside with a warning (:func:`runs.set_aside_checkpoint`) and the one before tried. A
  checkpoint of another model (other shapes) is :class:`errors.WorkdirError`."""
  init = functools.partial(init_state, config, build_model(config, None), tx, online_probe=online)
  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
  for step in sorted(mngr.all_steps(), reverse=True):
    error, restored = None, None
    try:
      _check_same_model(mngr, step, state, workdir)
      restored = mngr.restore(step, args=ocp.args.StandardRestore(state))
    except errors.WorkdirError:
      raise
    except Exception as e:  # noqa: BLE001  (any reading error: try the previous checkpoint)
      error = e
    if all(parallel.gather(np.array([error is None]))):  # every process could read it
      logging.info('Resumed from %s at step %d.', mngr.directory, int(restored.step))
      return restored
    where = parallel.share_from_process_0(lambda s=step: runs.set_aside_checkpoint(mngr, s, workdir))
    mngr.reload()
    logging.warning('Checkpoint %d in %s cannot be read (%s); moved to %s, trying the one before.', step,
                    mngr.directory, f'{type(error).__name__}: {str(error)[:300]}' if error else 'on another process',
                    where)
  return state


def _check_same_model(mngr, step: int, state: TrainState, workdir: str) -> None:
  """:class:`errors.WorkdirError` if checkpoint ``step`` (its metadata) holds arrays of other shapes or names
  than this config's model and optimiser state."""
  meta = ocp.StandardCheckpointer().metadata(os.path.join(str(mngr.directory), str(step), 'default')).item_metadata
  if meta is None:
    raise OSError('its metadata cannot be read')

  def shapes(tree) -> dict:  # the model's arrays (plain dicts: the same key paths in the checkpoint and here)
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)
            if jax.tree_util.keystr(k).startswith(("['params']", "['batch_stats']"))}

  theirs, ours = shapes(dict(meta)), shapes(flax.serialization.to_state_dict(state))
  diff = sorted((k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)),
                key=lambda k: (not k.startswith("['params']"), k))  # a parameter is the clearest example
  if diff:
    k = diff[0]
    raise errors.WorkdirError(
        f'{workdir} holds checkpoints of another model: {len(diff)} array(s) differ, e.g. {k} is '
        f'{theirs.get(k, "absent")} there and {ours.get(k, "absent")} in this config; pass a new --workdir, or '
        'the config that run was started with')


class InputWait:
  """The batches iterator, timed: the share of wall time the loop spent waiting for the next batch since the last
  :meth:`share` (shown on the progress line: near 0 when the input keeps up, near 1 when it limits the run)."""

  def __init__(self, batches):
    self.batches, self.waited, self.since = batches, 0.0, time.perf_counter()

  def __next__(self):
    t0 = time.perf_counter()
    batch = next(self.batches)
    self.waited += time.perf_counter() - t0
    return batch

  def share(self) -> float:
    now = time.perf_counter()
    share = self.waited / max(now - self.since, 1e-9)
    self.waited, self.since = 0.0, now
    return share


class Profile:
  """``profile_steps`` 'FIRST-LAST': a profiler trace (``jax.profiler``, for TensorBoard's profile plugin or
  Perfetto) of steps FIRST … LAST in ``WORKDIR/profile``; '' for none."""

  def __init__(self, steps: str, workdir: str):
    self.first = self.last = 0
    if steps:
      try:
        first, last = (int(v) for v in str(steps).split('-')) if '-' in str(steps) else (int(steps),) * 2
      except ValueError:
        first = last = 0
      if not 0 < first <= last:
        raise errors.ConfigError(f"profile_steps {steps!r} must be 'FIRST-LAST' with 0 < FIRST <= LAST, e.g. '20-25'")
      self.first, self.last = first, last
    self.directory, self.active = os.path.join(workdir, 'profile'), False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info('Profile of steps %d-%d written to %s.', self.first, self.last, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _run_steps(train_step, state, batches, actions, start_step: int, stop_step: int, guard: NonFiniteGuard,
               preemption: Preemption, checkpoint: Checkpoint, diagnose, profile: Profile) -> tuple[TrainState, bool]:
  """Steps ``start_step + 1 … stop_step``, each followed by the periodic ``actions``; stops early, with a
  checkpoint of the step reached, when preempted. Returns the state and whether it was preempted."""
  metrics = None
  for step in range(start_step + 1, stop_step + 1):
    profile.before(step)
    previous = metrics
    state, metrics, (h1, z1) = train_step(state, next(batches))
    # At most two steps in flight: the host prepares the next batch while the devices run, without an
    # unbounded dispatch queue (which can also starve XLA:CPU's collective threads on small machines).
    jax.block_until_ready(previous)
    guard.check(step - 1, previous)
    out = StepOutput(state, metrics, h1, z1, diagnose)
    for action in actions:
      action(step, out)
    profile.after(step, state)
    if preemption.reached(step) and step < stop_step:
      if not _every(step, checkpoint.every, checkpoint.stop_step):  # else the action above saved it
        checkpoint(step, out, force=True)
      return state, True
  guard.check(stop_step, metrics)
  return state, False


def _compilation_cache(config, workdir: str) -> None:
  """Turns on JAX's persistent compilation cache where ``config.compilation_cache`` says: 'workdir' is
  WORKDIR/compilation_cache unless JAX already has a cache directory (``JAX_COMPILATION_CACHE_DIR``), which
  it then keeps; another value is the directory itself; '' leaves JAX's setting alone."""
  where = config.get('compilation_cache', '')
  if not where or (where == 'workdir' and jax.config.jax_compilation_cache_dir):
    return
  path = os.path.join(workdir, 'compilation_cache') if where == 'workdir' else where
  parallel.enable_compilation_cache(path, config.get('compilation_cache_min_seconds', 1.0))
  logging.info('Compilation cache: %s.', path)


def _reporting_actions(config, writer, total_steps: int, epoch_steps: int, online_probe: bool,
                       input_wait: InputWait) -> list:
  """The loop's reporting actions, in the order they run after a step: steps/s, the online probe's epoch top-1,
  the step metrics' interval means, the progress line with the collapse diagnostics, the spectrum. Those with a
  ``flush(step)`` hold something back until a later step: the loop flushes them where it stops."""
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  actions = [lambda step, out: progress(step)]
  if online_probe:
    actions.append(OnlineProbeEpoch(writer, epoch_steps, total_steps))
  step_metrics = StepMetrics(writer, config.metrics_every_steps, config.log_every_steps, total_steps)
  actions += [step_metrics,
              LogMetrics(writer, config.log_every_steps, total_steps, methods.get(config).terms, step_metrics,
                         input_wait),
              SpectrumImage(writer, config.spectrum_every_steps or config.checkpoint_every_steps, total_steps)]
  return actions


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains (resuming from the latest checkpoint in ``workdir``), then probes; returns the summary."""
  start_time = time.time()
  methods.get(config)  # an unknown method fails before anything is written
  workdir = runs.make_workdir(workdir)
  _compilation_cache(config, workdir)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  runs.check_splits(config.data, [config.data.train_split] + ([config.eval.test_split] if config.eval.final_probe
                                                              else []))
  total_steps, warmup_steps, epoch_steps = runs.schedule_steps(config)
  tx, schedule = methods.make_optimizer(config, total_steps, warmup_steps)
  online = make_probe(config, sources.get(config.data).num_classes(config.data))
  mngr = runs.checkpoint_manager(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  state = _initial_state(config, tx, online, mesh, mngr, workdir)
  runs.save_config(workdir, config)
  start_step = int(state.step)
  stop_step = min(total_steps, start_step + config.max_steps_per_run) if config.max_steps_per_run else total_steps

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  batches = InputWait(parallel.prefetch_to_device(pipeline.global_batches(
      pipeline.pretrain_dataset(config, start_step, jax.process_index(), jax.process_count()),
      parallel.data_sharding(mesh)), config.get('prefetch_to_device', 0)))
  guard = NonFiniteGuard(config.get('nonfinite', 'stop'), methods.get(config).terms, writer)
  checkpoint = Checkpoint(mngr, config.checkpoint_every_steps, stop_step, guard)
  actions = _reporting_actions(config, writer, total_steps, epoch_steps, online[0] is not None, batches)
  actions.append(checkpoint)
  logging.info('Training %s for %d steps (%d warmup) of global batch %d on %d devices of %d process(es).',
               config.method, total_steps, warmup_steps, config.batch_size, mesh.devices.size, jax.process_count())
  preemption, profile = Preemption(), Profile(config.get('profile_steps', ''), workdir)
  try:
    train_step = make_train_step(config, build_model(config), tx, schedule, mesh, online, total_steps)
    diagnose = make_diagnostics(mesh, config.get('diagnostics_max_rows', 1024))
    state, preempted = _run_steps(train_step, state, batches, actions, start_step, stop_step, guard, preemption,
                                  checkpoint, diagnose, profile)
    for action in actions:  # what the reporting actions hold back for a step that never came
      if hasattr(action, 'flush'):
        action.flush(int(state.step))
  finally:  # also on interruption: let the checkpoint in flight land
    profile.close()
    preemption.close()
    mngr.wait_until_finished()
    writer.flush()
  if jax.config.jax_compilation_cache_dir:
    logging.info('%d program(s) loaded from the compilation cache.', parallel.compilation_cache_hits())
  if preempted or stop_step < total_steps:
    step = int(state.step)
    why = 'preempted (SIGTERM)' if preempted else 'max_steps_per_run'
    logging.info('Stopped at step %d of %d (%s), checkpoint saved in %s; the same command continues from there.',
                 step, total_steps, why, mngr.directory)
    print(f'Stopped at step {step} of {total_steps} ({why}); checkpoint {step} saved in {mngr.directory}; the same '
          'command continues from there.', flush=True)
    writer.close()
    return {'steps': step, 'preempted': preempted}
  return _summarise(config, state, mesh, workdir, writer, start_time)


def _summarise(config, state: TrainState, mesh, workdir: str, writer, start_time: float) -> dict:
  """The final probe's figures (if enabled) and the wall time: to the writer, ``summary.json`` and stdout."""
  summary = {'steps': int(state.step)}
  if config.eval.final_probe:
    summary.update(final_probe(config, state, mesh, workdir))
    writer.write_scalars(int(state.step), {f'final/{k}': v for k, v in summary.items() if k != 'steps'})
  summary['wall_seconds'] = round(time.time() - start_time, 1)
  runs.write_json(os.path.join(workdir, 'summary.json'), summary)
  logging.info('Summary: %s', json.dumps(summary))
  print(json.dumps(summary), flush=True)
  writer.close()
  return summary


def final_probe(config, state: TrainState, mesh, workdir: str) -> dict:
  """Linear probes on frozen representations (all labels; k labels per class over several draws), weighted
  k-NN (k = 20, 200), RankMe of representations and embeddings, the std of the embeddings and of the embeddings
  scaled to unit norm (:func:`diagnostics.unit_std`), on the
  train/test splits named in ``config.eval``. Writes the singular values of the training set's
  representations and embeddings to ``workdir/spectra.npz`` (for ``python -m vicreg_jax.evaluate.diagnostics``).

  Each process extracts the features of its share of the images; k-NN runs on all devices; the host-side work
  (scikit-learn probes, spectra) runs on process 0, which hands the figures to the others."""
  model = build_model(config, axis_name=None)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = parallel.jit(functools.partial(model.apply, train=False))
  recipe = dict(config.augment.view1)
  n_dev = mesh.devices.size
  batch = max(n_dev, config.eval.batch_size // n_dev * n_dev)

  def features(split: str, max_examples: int):
    ds = pipeline.eval_dataset(config.data, split, batch, crop=config.data.image_size, mean=recipe.get('mean'),
                               std=recipe.get('std'), process_index=jax.process_index(),
                               process_count=jax.process_count(), max_examples=max_examples)
    return probe.extract(apply, variables, pipeline.global_batches(ds, parallel.data_sharding(mesh)))

  (h_tr, z_tr), y_tr = features(config.data.train_split, config.eval.max_train_examples)
  (h_te, _), y_te = features(config.eval.test_split, config.eval.max_test_examples)
  knn_acc = knn.knn_accuracy(h_tr, y_tr, h_te, y_te, ks=(20, 200), mesh=mesh)

  def host_side() -> dict:
    s_h, s_z = diagnostics.singular_values(h_tr), diagnostics.singular_values(z_tr)
    buffer = io.BytesIO()  # np.savez seeks, which GFile (gs://) does not support for writing
    np.savez(buffer, representations=s_h, embeddings=s_z)
    with tf.io.gfile.GFile(os.path.join(workdir, 'spectra.npz'), 'wb') as f:
      f.write(buffer.getvalue())
    result = {
        'linear_top1': probe.linear_probe(h_tr, y_tr, h_te, y_te),
        f'linear_top1_{config.eval.labels_per_class}_per_class': probe.few_label_probe(
            h_tr, y_tr, h_te, y_te, config.eval.labels_per_class, config.eval.draws, config.seed),
        'knn_top1_20': knn_acc[20],
        'knn_top1_200': knn_acc[200],
        'rankme': diagnostics.rankme_from_spectrum(s_h),
        'rankme_embeddings': diagnostics.rankme_from_spectrum(s_z),
        'embedding_std': float(np.mean(np.std(z_tr, axis=0))),
        'embedding_std_unit': diagnostics.unit_std(z_tr),
    }
    return {k: float(f'{float(v):.4g}') for k, v in result.items()}  # 4 significant digits: a collapsed std stays visible

  return parallel.share_from_process_0(host_side)
