"""Two-view tf.data pipelines, one per process, feeding global ``jax.Array`` batches.

Randomness is stateless: the example order and every augmentation are functions of (seed, process, position
in this process's example stream), where position = step·local_batch + slot. In-memory sources (digits) are
therefore exactly resumable: a pipeline started at step k yields the batches an uninterrupted one yields from
step k. Streaming TFDS sources restart their file order and shuffle buffer from a seed folded with k.
"""

from __future__ import annotations

from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from vicreg_jax.data import augment, sources


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'batch_size {global_batch} must be divisible by the number of processes ({process_count}).')
  return global_batch // process_count


def _options(config: ml_collections.ConfigDict) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = config.data.get('threadpool_size', 0) or 0
  opts.autotune.enabled = True
  return opts


def _two_views(image, seed, config):
  s = tf.random.experimental.stateless_split(seed, 2)
  return {'view1': augment.augment_view(image, s[0], dict(config.augment.view1)),
          'view2': augment.augment_view(image, s[1], dict(config.augment.view2))}


def pretrain_dataset(config: ml_collections.ConfigDict, start_step: int = 0, process_index: int = 0,
                     process_count: int = 1) -> tf.data.Dataset:
  """This process's infinite stream of two-view batches ``{'view1', 'view2'}`` starting at ``start_step``.

  Each batch holds ``config.batch_size / process_count`` examples: this process's rows of the global batch.
  """
  local_b = local_batch_size(config.batch_size, process_count)
  start = start_step * local_b
  base_seed = tf.constant([config.seed, process_index], tf.int64)
  parallel = tf.data.AUTOTUNE

  if config.data.source == 'digits':
    arrays = sources.digits(config.data.train_split)
    images = tf.constant(arrays.images[process_index::process_count])
    n = int(images.shape[0])

    def load(pos):
      epoch = pos // n
      idx = tf.random.experimental.index_shuffle(
          pos % n, seed=tf.stack([tf.constant(config.seed, tf.int64), epoch * process_count + process_index]),
          max_index=n - 1)
      return pos, tf.gather(images, idx)

    ds = tf.data.Dataset.counter(start=start, dtype=tf.int64).map(load, num_parallel_calls=parallel)
  elif config.data.source == 'tfds':
    ds = sources.tfds_split(config.data.name, config.data.train_split, data_dir=config.data.data_dir,
                            process_index=process_index, process_count=process_count, shuffle_files=True,
                            seed=config.seed + start_step)
    ds = ds.repeat().shuffle(config.data.shuffle_buffer, seed=config.seed + start_step)
    ds = ds.map(lambda ex: tf.image.convert_image_dtype(ex['image'], tf.float32), num_parallel_calls=parallel)
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start=start, dtype=tf.int64), ds)
  else:
    raise ValueError(f"Unknown data.source {config.data.source!r}: use 'digits' or 'tfds'.")

  def views(pos, image):
    return _two_views(image, tf.random.experimental.stateless_fold_in(base_seed, pos), config)

  ds = ds.map(views, num_parallel_calls=parallel)
  ds = ds.batch(local_b, drop_remainder=True, num_parallel_calls=parallel)
  return ds.prefetch(config.data.get('prefetch', 2)).with_options(_options(config))


def global_batches(ds: tf.data.Dataset, sharding: jax.sharding.Sharding) -> Iterator[dict]:
  """Turns each process-local numpy batch into a global ``jax.Array`` laid out by ``sharding``."""
  for batch in ds.as_numpy_iterator():
    yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def eval_images(config: ml_collections.ConfigDict, split: str, max_examples: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Un-augmented images and labels of a whole split, normalised as the views are, for probes on frozen features.

  At most ``max_examples`` (0: all). digits: the arrays; TFDS: resize the shorter side to ``image_size·8/7`` and centre-crop ``image_size``.
  """
  recipe = dict(config.augment.view1)
  mean, std = recipe.get('mean'), recipe.get('std')
  if config.data.source == 'digits':
    arrays = sources.digits(split)
    x, y = arrays.images[:max_examples or None], arrays.labels[:max_examples or None]
  else:
    size = config.data.image_size

    def prep(ex):
      img = tf.image.convert_image_dtype(ex['image'], tf.float32)
      h, w = tf.shape(img)[0], tf.shape(img)[1]
      scale = tf.cast(size * 8 // 7, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
      new = tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * scale), tf.int32)
      img = tf.clip_by_value(tf.image.resize(img, new, method='bicubic'), 0.0, 1.0)
      return tf.image.resize_with_crop_or_pad(img, size, size), ex['label']

    ds = sources.tfds_split(config.data.name, split, data_dir=config.data.data_dir)
    if max_examples:
      ds = ds.take(max_examples)
    xs, ys = zip(*ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator())
    x, y = np.stack(xs), np.asarray(ys)
  if mean is not None:
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return x.astype(np.float32), y.astype(np.int32)
