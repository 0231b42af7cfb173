"""tf.data pipelines, one per process, feeding global ``jax.Array`` batches.

- :func:`pretrain_dataset`: two augmented views (and the label, for the online probe) per example.
- :func:`labelled_dataset`: one augmented view and its label, for linear evaluation and fine-tuning.
- :func:`eval_dataset`: un-augmented, centre-cropped images with labels and their index in the split, one pass
  over this process's contiguous share.

Randomness is stateless. In-memory sources (digits arrays, an image folder's file list) are one global stream:
position p = step·global_batch + row of the global batch, example p drawn from a permutation seeded by
(seed, epoch), its augmentations seeded by (seed, p); each process builds its own rows of every global batch.
So the batches are the same for any number of processes, and a run resumed at step k, on any number of
processes, sees the batches an uninterrupted one sees from step k. TFDS streams are per process (each reads
its own files): the order is a function of (seed, process, position in this process's stream), and they
resume exactly, on the same number of processes, by starting at the resume step's epoch and skipping into it.
When every view starts with a random resized crop (ImageNet), file-backed sources keep images encoded and each
view decodes only its crop window of a JPEG (:func:`augment.decode_random_resized_crop`).
"""

from __future__ import annotations

from typing import Iterator, Optional

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from vicreg_jax.data import augment, device_augment, sources


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'batch_size {global_batch} must be divisible by the number of processes ({process_count}).')
  return global_batch // process_count


def _options(data: ml_collections.ConfigDict) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = data.get('threadpool_size', 0) or 0
  opts.autotune.enabled = True
  return opts


def _encoded(data: ml_collections.ConfigDict, recipes) -> bool:
  """Whether images stay encoded until the views decode them: file-backed sources (TFDS, image folders) when
  every view starts with a random resized crop, so each view decodes only its crop window (JPEG)."""
  return sources.get(data).file_backed and all(dict(r).get('crop_size') for r in recipes)


def _stream(data: ml_collections.ConfigDict, split: str, seed: int, start_step: int, local_b: int,
            process_index: int, process_count: int, indices: Optional[np.ndarray] = None,
            encoded: bool = False) -> tf.data.Dataset:
  """Infinite shuffled ``(example seed, image, label)`` for this process's rows of the global batches of
  ``split`` from ``start_step`` on (``local_b`` rows per step); the image is float [H, W, C] in [0, 1], or its
  encoded bytes when ``encoded`` and the source is file-backed; the example seed ([2] int64) seeds its
  augmentations. ``indices`` restricts an in-memory split (digits, image folder) to those examples.

  In-memory sources: global stream position ``pos = step·global_batch + process·local_b + slot``, example
  ``index_shuffle(pos mod n)`` of a permutation of all n examples seeded by (seed, epoch = pos // n), seed
  ``fold_in((seed, 0), pos)``; the same for any number of processes and exactly resumable at any step.
  """
  source = sources.get(data)
  in_memory = source.in_memory(data, split)
  if in_memory is not None:
    items, labels = in_memory
    if indices is not None:
      items, labels = items[indices], labels[indices]
    return _global_stream(items, labels, data, seed, start_step, local_b, process_index, process_count,
                          decode=None if not source.file_backed else (not encoded))
  if indices is not None:
    raise ValueError('A labelled subset of a TFDS split is chosen by the split name (e.g. '
                     "'imagenet2012_subset/1pct'), not by data.labels_per_class.")
  return _tfds_stream(data, split, seed, start_step, local_b, process_index, process_count, encoded)


def _global_stream(items, labels, data, seed, start_step, local_b, process_index, process_count, decode):
  """:func:`_stream` of in-memory ``items`` (images, or file paths read here and decoded if ``decode``)."""
  n = len(labels)
  if n == 0:
    raise ValueError('The training split has no examples.')
  items, labels = tf.constant(items), tf.constant(labels)
  global_b = local_b * process_count
  base_seed = tf.constant([seed, 0], tf.int64)

  def load(t):
    pos = (start_step + t // local_b) * global_b + process_index * local_b + t % local_b
    idx = tf.random.experimental.index_shuffle(
        pos % n, seed=tf.stack([tf.constant(seed, tf.int64), pos // n]), max_index=n - 1)
    item = tf.gather(items, idx)
    if decode is not None:  # a file path
      item = tf.io.read_file(item)
      if decode:
        item = augment.decode(item, data.channels)
    return tf.random.experimental.stateless_fold_in(base_seed, pos), item, tf.gather(labels, idx)

  return tf.data.Dataset.counter(dtype=tf.int64).map(load, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_stream(data, split, seed, start_step, local_b, process_index, process_count, encoded):
  """:func:`_stream` of a TFDS split, per process."""
  # Exactly resumable: a fixed file order (TFDS shuffles examples into its files when it builds a dataset),
  # reshuffled per epoch by a buffer seeded with (seed, epoch). This process's stream position p =
  # start_step·local_b lies in epoch p // n at offset p % n; the stream starts at that epoch and skips the
  # offset (reading, not decoding, at most one epoch of this process's records).
  start = start_step * local_b
  base = sources.tfds_split(data.name, split, data_dir=data.data_dir, process_index=process_index,
                            process_count=process_count, decode=not encoded)
  if data.get('cache', False):  # small datasets: keep this process's examples in memory after the first epoch
    base = base.cache()
  n = max(sources.num_examples(data.name, split, data.data_dir) // process_count, 1)
  first_epoch, offset = divmod(start, n)
  seed_base = tf.constant(seed, tf.int64) * 1_000_003 + process_index * 7_919

  def epoch(e):
    return base.shuffle(data.shuffle_buffer, seed=seed_base + e, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.counter(start=first_epoch, dtype=tf.int64).flat_map(epoch).skip(offset)
  if encoded:
    ds = ds.map(lambda ex: (ex['image'], ex['label']))
  else:
    ds = ds.map(lambda ex: (tf.image.convert_image_dtype(ex['image'], tf.float32), ex['label']),
                num_parallel_calls=tf.data.AUTOTUNE)
  base_seed = tf.constant([seed, process_index], tf.int64)
  return tf.data.Dataset.zip(tf.data.Dataset.counter(start=start, dtype=tf.int64), ds).map(
      lambda pos, ex: (tf.random.experimental.stateless_fold_in(base_seed, pos), ex[0], ex[1]))


def _finish(ds, data, local_b):
  ds = ds.batch(local_b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(data.get('prefetch', 2)).with_options(_options(data))


def pretrain_dataset(config: ml_collections.ConfigDict, start_step: int = 0, process_index: int = 0,
                     process_count: int = 1) -> tf.data.Dataset:
  """This process's infinite stream of batches ``{'view1', 'view2', 'label'}`` starting at ``start_step``.

  Each batch holds ``config.batch_size / process_count`` examples: this process's rows of the global batch.
  The label only feeds the online probe; the self-supervised loss never sees it.
  With ``config.augment.on_device`` the views get only the geometric part of their recipe here
  (:func:`device_augment.host_recipe`: the same crops and flips) and come as uint8 (×255, rounded); the train
  step applies the colour part on the accelerator.
  """
  local_b = local_batch_size(config.batch_size, process_count)
  view1, view2 = dict(config.augment.view1), dict(config.augment.view2)
  on_device = bool(config.augment.get('on_device', False))
  if on_device:
    view1, view2 = device_augment.host_recipe(view1), device_augment.host_recipe(view2)
  cast = device_augment.to_uint8 if on_device else (lambda x: x)
  encoded = _encoded(config.data, (view1, view2))
  ds = _stream(config.data, config.data.train_split, config.seed, start_step, local_b, process_index,
               process_count, encoded=encoded)
  channels = config.data.channels

  def views(example_seed, image, label):
    s = tf.random.experimental.stateless_split(example_seed, 2)
    if encoded:  # one JPEG decode (the union of the two crop windows) for both views
      v1, v2 = augment.augment_views(image, (s[0], s[1]), (view1, view2), channels)
    else:
      v1, v2 = augment.augment_view(image, s[0], view1, channels), augment.augment_view(image, s[1], view2, channels)
    return {'view1': cast(v1), 'view2': cast(v2), 'label': tf.cast(label, tf.int32)}

  return _finish(ds.map(views, num_parallel_calls=tf.data.AUTOTUNE), config.data, local_b)


def labelled_dataset(data: ml_collections.ConfigDict, recipe: dict, batch_size: int, seed: int,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     indices: Optional[np.ndarray] = None) -> tf.data.Dataset:
  """Infinite batches ``{'image', 'label'}`` of ``data.train_split`` with one view augmented by ``recipe``
  (keys of :data:`augment.RECIPE_DEFAULTS`), from ``start_step`` on; same determinism as the pretraining
  stream."""
  local_b = local_batch_size(batch_size, process_count)
  ds = _stream(data, data.train_split, seed, start_step, local_b, process_index, process_count, indices,
               encoded=_encoded(data, (recipe,)))

  def view(example_seed, image, label):
    return {'image': augment.augment_view(image, example_seed, recipe, data.channels),
            'label': tf.cast(label, tf.int32)}

  return _finish(ds.map(view, num_parallel_calls=tf.data.AUTOTUNE), data, local_b)


def global_batches(ds: tf.data.Dataset, sharding: jax.sharding.Sharding) -> Iterator[dict]:
  """Turns each process-local numpy batch into a global ``jax.Array`` laid out by ``sharding``."""
  for batch in ds.as_numpy_iterator():
    yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def _resize_centre_crop(image, resize: int, crop: int):
  """Shorter side to ``resize``, then the central ``crop``×``crop``: the official evaluation transform
  (torchvision ``Resize(256)`` + ``CenterCrop(224)`` on PIL images: bilinear, antialiased when shrinking; the
  longer side ``int(resize·long/short)``; the crop's offset ``round((side - crop)/2)``)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  short, long_ = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(tf.cast(resize, tf.int64) * tf.cast(long_, tf.int64) // tf.cast(short, tf.int64), tf.int32)
  new = tf.where(h <= w, tf.stack([resize, new_long]), tf.stack([new_long, resize]))
  image = tf.clip_by_value(tf.image.resize(image, new, method='bilinear', antialias=True), 0.0, 1.0)
  top = tf.cast(tf.round(tf.cast(new[0] - crop, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new[1] - crop, tf.float32) / 2), tf.int32)
  return tf.image.crop_to_bounding_box(image, top, left, crop, crop)


def eval_dataset(data: ml_collections.ConfigDict, split: str, batch_size: int, *, crop: int, resize: int = 0,
                 mean=None, std=None, process_index: int = 0, process_count: int = 1,
                 max_examples: int = 0) -> tf.data.Dataset:
  """One pass over this process's share (:func:`sources.eval_share_bounds`) of the first ``max_examples`` (0: all) examples
  of ``split``, in batches ``{'image', 'label', 'index', 'mask'}`` of ``batch_size / process_count``; ``index``
  is the example's position in the split. Batches are padded (mask 0, index -1) so every process yields the
  same number of full batches (collectives must match).

  TFDS and image-folder images: shorter side resized to ``resize`` (0: ``crop``·8/7, i.e. 256 for 224), centre crop ``crop``.
  In-memory (digits) images are used as they are. Then normalised by ``mean``/``std`` if given.
  """
  local_b = local_batch_size(batch_size, process_count)
  source = sources.get(data)
  ds, a, b, total = source.eval_share(data, split, process_index, process_count, max_examples)
  if source.file_backed:
    resize = resize or crop * 8 // 7

    def prep(image, label):
      if image.dtype == tf.string:
        image = augment.decode(image, data.channels)
      image = _resize_centre_crop(tf.image.convert_image_dtype(image, tf.float32), resize, crop)
      return tf.ensure_shape(image, [crop, crop, data.channels]), label

    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  if mean is not None:
    ds = ds.map(lambda x, y: (augment.normalize(x, mean, std), y))
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(a, b)).map(
      lambda xy, i: {'image': xy[0], 'label': tf.cast(xy[1], tf.int32), 'index': i, 'mask': tf.constant(1.0)})
  largest_share = -(-total // process_count)
  batches = -(-largest_share // local_b)
  pad = {'image': tf.zeros(ds.element_spec['image'].shape, tf.float32), 'label': tf.constant(0),
         'index': tf.constant(-1, tf.int64), 'mask': tf.constant(0.0)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(batches * local_b)
  return ds.batch(local_b).prefetch(2).with_options(_options(data))
