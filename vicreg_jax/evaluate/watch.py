"""The checkpoint follower of the evaluation jobs: waits for a pretraining run's checkpoints and hands each one
it picks (``config.checkpoints``: 'all', 'latest' or 'final') to an evaluation function, keeping the results in
``WORKDIR/results.json`` by step, until the run's last step is evaluated. What is evaluated, and how, is the
caller's (:mod:`vicreg_jax.evaluate.linear` trains a classifier on each).

'latest' is the cadence for an evaluation slower than the run's checkpoints (a pod): each time the job is free
it takes the newest checkpoint, polling every ``config.poll_seconds`` until there is one newer than every step
it has evaluated, so it never evaluates a checkpoint older than one it has, and always evaluates the final one.
'all' takes every checkpoint still on disk, oldest first (with the run's ``keep_checkpoints_every``, the kept
ones survive for it); a checkpoint deleted between listing and reading is skipped."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import tensorflow as tf
from absl import logging

from vicreg_jax import checkpoints, distributed, errors, runs


def load_results(workdir: str) -> dict:
  path = os.path.join(workdir, 'results.json')
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def save_results(workdir: str, results: dict) -> None:
  """Writes results.json atomically (a reader never sees half a file), by step."""
  runs.write_json(os.path.join(workdir, 'results.json'), dict(sorted(results.items(), key=lambda kv: int(kv[0]))))


def poll(what: str, find: Callable[[], Any], config, timeout: Optional[float]) -> Any:
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


def next_checkpoint(mngr, done: dict, config, final_step: int) -> Optional[int]:
  """The step of the next checkpoint in ``mngr`` to evaluate, or None for none yet; ``done``: the steps (keys)
  evaluated or skipped. ``config.checkpoints`` picks: 'all', the oldest not done (the final one last); 'latest',
  the newest, and only if it is newer than every step done (a follower that fell behind skips ahead, never
  back), or the final one whenever it is listed and not done; 'final', ``final_step`` only."""
  todo = [s for s in checkpoints.steps(mngr) if str(s) not in done]
  if config.checkpoints == 'latest':
    newest_done = max((int(k) for k in done if str(k).isdigit()), default=-1)
    todo = [final_step] if final_step in todo else [s for s in todo[-1:] if s > newest_done]
  elif config.checkpoints == 'final':
    todo = [s for s in todo if s == final_step]
  return int(min(todo)) if todo else None


def follow(config, pre: str, final_step: int, results: dict, workdir: str, mesh,
           evaluate: Callable[[int, dict], Optional[dict]]) -> bool:
  """Evaluates the checkpoints of the pretraining run in ``pre`` as they land, those :func:`next_checkpoint`
  picks (``evaluate(step, backbone)``: its result, or None when preempted), adding each to ``results`` and
  results.json, until ``final_step`` is in it (with 'all', until every step still listed is in it too: a job
  that followed the run with 'latest', run again with 'all', adds the checkpoints it skipped); True if preempted
  first. Process 0 lists the checkpoints and chooses; every process reads and evaluates the one it chose
  (:func:`checkpoints.read_backbone`: an error that is not the checkpoint's is retried for
  ``restore_retry_seconds``; a checkpoint deleted meanwhile is skipped; a damaged one is skipped with a warning,
  or ends the job if it is the last step's: the reader never moves the pretraining run's files)."""
  directory = os.path.join(pre, 'checkpoints')
  mngr, skipped = checkpoints.reader(directory), {}
  while True:
    done = {**results, **skipped}
    if str(final_step) not in results:
      step = poll(f'checkpoint {final_step} in {directory}', lambda: next_checkpoint(mngr, done, config, final_step),
                  config, config.timeout_seconds or None)
    elif config.checkpoints == 'all':  # the final one done: those still listed that an earlier 'latest' skipped
      step = distributed.share_from_process_0(lambda: next_checkpoint(mngr, done, config, final_step))
    else:
      step = None
    if step is None:
      return False
    outcome, value = checkpoints.read_backbone(directory, step, mesh, config.restore_retry_seconds)
    if outcome == checkpoints.DAMAGED:
      if step == final_step:
        raise errors.WorkdirError(
            f'checkpoint {step} of {pre} is damaged ({value}); run the pretraining command again (it sets the '
            'checkpoint aside and redoes its steps), then this one')
      logging.warning('Checkpoint %d of %s is damaged (%s); skipped.', step, pre, value)
      skipped[str(step)] = value
      continue
    if outcome == checkpoints.GONE:  # deleted by the run's keep_checkpoints meanwhile
      logging.info('Checkpoint %d of %s was deleted before it could be read; skipped.', step, pre)
      skipped[str(step)] = 'gone'
      continue
    logging.info('Evaluating checkpoint %d of %s (final: %d).', step, pre, final_step)
    if (result := evaluate(step, value)) is None:
      return True
    results[str(step)] = result
    save_results(workdir, results)
