"""The linear-evaluation job: watches a pretraining run's checkpoints and evaluates each one as it lands.

  python -m vicreg_jax.main --config=configs/imagenet_linear.py --workdir=EVAL --config.pretrain_workdir=PRE

For every new checkpoint in ``PRE/checkpoints`` (or only the newest, ``checkpoints='latest'``, or only the
last step's, ``'final'``) it trains a
linear head on the frozen backbone (:mod:`vicreg_jax.evaluate.classifier`) and appends top-1/top-5 to
``EVAL/results.json`` and TensorBoard. It stops once the checkpoint of the pretraining run's last step is
evaluated. A restart skips the checkpoints already in results.json and resumes a half-trained head from
``EVAL/heads/<step>``. Only checkpoints orbax has finalised are listed, so a half-written one is never read.

``from_scratch=True`` evaluates only "checkpoint 0": the same architecture freshly initialised (seed
``config.seed``), needing only ``PRE/config.json``. With the linear job that is the random-encoder baseline;
with the fine-tuning job (all labels), the supervised-from-scratch reference for the same backbone.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import tensorflow as tf
from absl import logging
from clu import metric_writers

from vicreg_jax import checkpoints, distributed, errors, loop, parallel, runs
from vicreg_jax import config as schema
from vicreg_jax.evaluate import classifier


def load_results(workdir: str) -> dict:
  path = os.path.join(workdir, 'results.json')
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def save_results(workdir: str, results: dict) -> None:
  """Writes results.json atomically (a reader never sees half a file), by step."""
  runs.write_json(os.path.join(workdir, 'results.json'), dict(sorted(results.items(), key=lambda kv: int(kv[0]))))


def _poll(what: str, find: Callable[[], Any], config, timeout: Optional[float]) -> Any:
  """``find()`` on process 0 every ``config.poll_seconds`` until it returns something other than None; that
  value, on every process. :class:`errors.WaitTimeoutError` (on every process) once ``timeout`` seconds have
  passed (0: after the first try; None: never)."""
  started = time.time()
  while True:
    found = distributed.share_from_process_0(lambda: {'value': find(), 'waited': time.time() - started})
    if found['value'] is not None:
      return found['value']
    if timeout is not None and found['waited'] >= timeout:
      raise errors.WaitTimeoutError(f'gave up after {timeout:g} s waiting for {what}')
    logging.log_every_n_seconds(logging.INFO, 'Waiting for %s ...', 60, what)
    time.sleep(config.poll_seconds)


def _evaluate(config, pre_config, backbone: dict, step: int, workdir: str, writer, finetune: bool,
              preemption) -> Optional[dict]:
  """Trains and tests the classifier on ``backbone`` (checkpoint ``step``); logs and returns its result (None:
  preempted, the head's state saved)."""
  t0 = time.time()
  result = classifier.train_classifier(config, pre_config, backbone, workdir, step, writer, finetune, preemption)
  if result is None:
    return None
  result.update(seconds=round(time.time() - t0, 1), finished_at=round(time.time(), 1))
  writer.write_scalars(step, {'top1': result['top1'], 'top5': result['top5']})
  writer.flush()
  logging.info('Checkpoint %d: top-1 %.4f, top-5 %.4f (%.0f s).', step, result['top1'], result['top5'],
               result['seconds'])
  return result


def run(config: ml_collections.ConfigDict, workdir: str, finetune: bool = False) -> dict:
  """Evaluates the checkpoints of ``config.pretrain_workdir`` until its last step (with ``from_scratch``, only a
  freshly initialised backbone); returns results by step."""
  if not config.pretrain_workdir:
    raise errors.ConfigError('set --config.pretrain_workdir to the pretraining run\'s --workdir')
  schema.validate(config)
  if config.checkpoints not in ('all', 'latest', 'final'):
    raise errors.ConfigError(f"checkpoints must be 'all', 'latest' or 'final', not {config.checkpoints!r}")
  runs.check_splits(config.data, [config.data.train_split, config.data.test_split])
  workdir = runs.make_workdir(workdir)
  pre = runs.absolute_workdir(config.pretrain_workdir)
  pre_config = schema.from_saved(_poll(
      f'{pre}/config.json (is --config.pretrain_workdir the pretraining run\'s --workdir?)',
      lambda: _pretraining_config(pre), config, config.start_timeout_seconds), origin=f'{pre}/config.json')
  runs.save_config(workdir, config)
  if not config.data.image_size and pre_config.data.image_size:
    config = _with_image_size(config, pre_config.data.image_size)

  results = distributed.share_from_process_0(lambda: load_results(workdir))  # what is done, as process 0 sees it
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  mesh, preemption, preempted = parallel.make_mesh(), loop.Preemption(), False
  try:
    if not config.from_scratch:
      preempted = _evaluate_checkpoints(config, pre, pre_config, results, workdir, writer, mesh, finetune, preemption)
    elif '0' not in results:
      backbone = classifier.init_backbone(pre_config, config.seed, mesh)
      result = _evaluate(config, pre_config, backbone, 0, workdir, writer, finetune, preemption)
      preempted = result is None
      if not preempted:
        results['0'] = result
        save_results(workdir, results)
  finally:
    preemption.close()
    writer.close()
  if preempted:  # the classifier said where it stopped
    return dict(results, preempted=True)
  print(json.dumps(results), flush=True)
  return results


def _pretraining_config(pre: str) -> Optional[dict]:
  """The pretraining run's config (read through the schema, as a dict to share between processes), None while it has not written one, or :class:`errors.WorkdirError`
  for a folder that can never become one (checkpoints without a config, or a finished run without
  checkpoints)."""
  config = runs.read_config(pre)
  checkpoints = os.path.join(pre, 'checkpoints')
  has_checkpoints = tf.io.gfile.isdir(checkpoints) and any(d.rstrip('/').isdigit()
                                                            for d in tf.io.gfile.listdir(checkpoints))
  if config is None:
    if has_checkpoints:
      raise errors.WorkdirError(f'{pre} has checkpoints but no config.json: not the --workdir of a vicreg_jax '
                                'pretraining run')
    return None
  if tf.io.gfile.exists(os.path.join(pre, 'summary.json')) and not has_checkpoints:
    raise errors.WorkdirError(f'the pretraining run in {pre} has finished and left no checkpoints to evaluate')
  return config.to_dict()


def _with_image_size(config, size: int):
  """``config`` with ``data.image_size`` set to the pretraining run's (in-memory digits: the size it trained at)."""
  config = ml_collections.ConfigDict(config.to_dict())  # a copy, unlocked
  config.data.image_size = size
  return config


def _next_checkpoint(mngr, results: dict, config, final_step: int) -> Optional[int]:
  """The step of the next checkpoint to evaluate (``config.checkpoints`` picks which), or None for none yet."""
  todo = [s for s in checkpoints.steps(mngr) if str(s) not in results]
  if config.checkpoints == 'latest':
    todo = todo[-1:]
  elif config.checkpoints == 'final':
    todo = [s for s in todo if s == final_step]
  return int(min(todo)) if todo else None


def _evaluate_checkpoints(config, pre: str, pre_config, results: dict, workdir: str, writer, mesh,
                          finetune: bool, preemption) -> bool:
  """Evaluates the checkpoints of the pretraining run in ``pre`` as they land, adding each to ``results`` and
  results.json, until the run's last step is in it; True if preempted first. Process 0 lists the checkpoints and
  chooses; every process reads and evaluates the one it chose (:func:`checkpoints.read_backbone`: an error that
  is not the checkpoint's is retried for ``restore_retry_seconds``; a checkpoint deleted meanwhile is skipped;
  a damaged one is skipped with a warning, or ends the job if it is the last step's: the reader never moves the
  pretraining run's files)."""
  final_step, _, _ = runs.schedule_steps(pre_config)
  directory = os.path.join(pre, 'checkpoints')
  mngr, skipped = checkpoints.reader(directory), {}
  while str(final_step) not in results:
    step = _poll(f'checkpoint {final_step} in {directory}',
                 lambda: _next_checkpoint(mngr, {**results, **skipped}, config, final_step), config,
                 config.timeout_seconds or None)
    outcome, value = checkpoints.read_backbone(directory, step, mesh, config.restore_retry_seconds)
    if outcome == checkpoints.DAMAGED:
      if step == final_step:
        raise errors.WorkdirError(
            f'checkpoint {step} of {pre} is damaged ({value}); run the pretraining command again (it sets the '
            'checkpoint aside and redoes its steps), then this one')
      logging.warning('Checkpoint %d of %s is damaged (%s); skipped.', step, pre, value)
      skipped[str(step)] = value
      continue
    if outcome == checkpoints.GONE:  # deleted by the run's max_to_keep meanwhile
      logging.info('Checkpoint %d of %s was deleted before it could be read; skipped.', step, pre)
      skipped[str(step)] = 'gone'
      continue
    logging.info('Evaluating checkpoint %d of %s (final: %d).', step, pre, final_step)
    if (result := _evaluate(config, pre_config, value, step, workdir, writer, finetune, preemption)) is None:
      return True
    results[str(step)] = result
    save_results(workdir, results)
  return False
