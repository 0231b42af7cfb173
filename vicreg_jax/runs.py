"""Run helpers shared by the pretraining and evaluation jobs: workdirs, the step schedule, config files and JSON
results (checkpoints: :mod:`vicreg_jax.checkpoints`)."""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_collections
import tensorflow as tf

from vicreg_jax import config as schema
from vicreg_jax import errors
from vicreg_jax.data import sources


def absolute_workdir(path: str) -> str:
  """A local ``path`` made absolute (orbax refuses relative checkpoint paths, and only when a save is already
  in flight); URLs such as gs://… unchanged."""
  return path if '://' in path else os.path.abspath(path)


def make_workdir(path: str) -> str:
  """:func:`absolute_workdir` of ``path``, created by process 0 (local path or gs://), which also checks that it
  can write there (:class:`errors.WorkdirError` otherwise, before any work)."""
  path = absolute_workdir(path)
  if jax.process_index() == 0:
    probe = os.path.join(path, f'.write_test_{os.getpid()}')
    try:
      tf.io.gfile.makedirs(path)
      with tf.io.gfile.GFile(probe, 'w') as f:
        f.write('ok')
      tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
      reason = getattr(e, 'message', None) or getattr(e, 'strerror', None) or str(e)
      raise errors.WorkdirError(f'cannot write to workdir {path} ({type(e).__name__}: {reason}); pass a '
                                '--workdir this job may create and write') from None
  return path


def steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Full global batches per pass over ``num_examples`` (at least 1)."""
  return max(num_examples // config.batch_size, 1)


def train_examples(config: ml_collections.ConfigDict) -> int:
  """Examples in a pretraining config's training split, all processes together."""
  return sources.get(config.data).num_examples(config.data, config.data.train_split)


def schedule_steps(config: ml_collections.ConfigDict, num_examples: Optional[int] = None) -> tuple[int, int, int]:
  """(total steps, warmup steps, steps per epoch) of a pretraining config: epochs over its training split
  (``num_examples`` examples; None: counted in the dataset), unless ``config.num_steps`` is set."""
  per_epoch = steps_per_epoch(config, train_examples(config) if num_examples is None else num_examples)
  total = config.num_steps or int(config.epochs * per_epoch)
  warmup = config.optim.warmup_steps or int(config.optim.warmup_epochs * per_epoch)
  return total, min(warmup, total), per_epoch


def check_splits(data: ml_collections.ConfigDict, splits) -> None:
  """Raises (one line) before any work if a split a job will read is missing or empty."""
  source = sources.get(data)
  for split in dict.fromkeys(splits):
    if not source.num_examples(data, split):
      raise errors.DataNotFoundError(f'split {split!r} of the dataset ({data.source}) has no examples')


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir/config.json`` (process 0), which the evaluation jobs read to rebuild the backbone."""
  write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))


def read_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
  """A run's ``config.json`` read through the schema (:func:`vicreg_jax.config.from_saved`: keys it lacks take
  their defaults, renamed keys their new names; an unknown key is a ConfigError naming the file), or None if the
  run has not written it yet."""
  path = os.path.join(workdir, 'config.json')
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    values = json.load(f)
  return schema.from_saved(values, origin=path)


def write_json(path: str, value) -> None:
  """Writes ``value`` as JSON to ``path`` atomically (a reader never sees half a file), on process 0 only."""
  if jax.process_index():
    return
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  tf.io.gfile.rename(tmp, path, overwrite=True)
