"""The linear-evaluation job (and, with ``finetune``, the fine-tuning job): follows a pretraining run's checkpoints
(:mod:`vicreg_jax.evaluate.watch`) and evaluates them as they land.

  python -m vicreg_jax.main --config=configs/imagenet_linear.py --workdir=EVAL --config.pretrain_workdir=PRE

For every new checkpoint in ``PRE/checkpoints`` (``checkpoints='all'``; with 'latest', the newest each time the
job is free, never one older than one evaluated; with 'final', only the last step's) it trains a linear head on
the frozen backbone (:mod:`vicreg_jax.evaluate.classifier`) and appends top-1/top-5 to ``EVAL/results.json`` and
TensorBoard. It stops once the checkpoint of the pretraining run's last step is evaluated ('all': and every
checkpoint still listed). A restart skips the checkpoints already in results.json and resumes a half-trained
head from ``EVAL/heads/<step>`` (with 'latest', while its checkpoint is still the newest). Only checkpoints orbax has finalised are listed, so a half-written one is never read.

Before anything else it reads ``PRE/config.json`` and resolves the evaluation protocol
(:func:`vicreg_jax.evaluate.protocols.resolve`: with ``protocol='auto'`` the pretraining run's method's), prints
it in one line and writes the resolved config to ``EVAL/config.json``.

``from_scratch=True`` evaluates only "checkpoint 0": the same architecture freshly initialised (seed
``config.seed``), needing only ``PRE/config.json``. With the linear job that is the random-encoder baseline;
with the fine-tuning job (all labels), the supervised-from-scratch reference for the same backbone.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import ml_collections
import tensorflow as tf
from absl import logging
from clu import metric_writers

from vicreg_jax import distributed, errors, loop, parallel, runs
from vicreg_jax import config as schema
from vicreg_jax.evaluate import classifier, protocols, watch


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
  pre_config = schema.from_saved(watch.poll(
      f'{pre}/config.json (is --config.pretrain_workdir the pretraining run\'s --workdir?)',
      lambda: _pretraining_config(pre), config, config.start_timeout_seconds), origin=f'{pre}/config.json')
  config, line = protocols.resolve(config, pre_config.method, pre_config.model.arch)
  schema.validate(config)
  print(line, flush=True)
  runs.save_config(workdir, config)
  if not config.data.image_size and pre_config.data.image_size:
    config = _with_image_size(config, pre_config.data.image_size)

  results = distributed.share_from_process_0(lambda: watch.load_results(workdir))  # what is done, as process 0 sees it
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                asynchronous=False)  # as train.py's
  mesh, preemption, preempted = parallel.make_mesh(), loop.Preemption(), False
  try:
    if not config.from_scratch:
      final_step, _, _ = runs.schedule_steps(pre_config)
      preempted = watch.follow(config, pre, final_step, results, workdir, mesh, lambda step, backbone: _evaluate(
          config, pre_config, backbone, step, workdir, writer, finetune, preemption))
    elif '0' not in results:
      backbone = classifier.init_backbone(pre_config, config.seed, mesh)
      result = _evaluate(config, pre_config, backbone, 0, workdir, writer, finetune, preemption)
      preempted = result is None
      if not preempted:
        results['0'] = result
        watch.save_results(workdir, results)
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
  config = ml_collections.ConfigDict(config.to_dict())  # a copy
  config.data.image_size = size
  return config


