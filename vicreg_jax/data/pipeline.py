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

Unreadable images (a truncated JPEG, a text or empty file named .jpg) neither stop a run nor leave a hole in a
batch. Image folders: the example of position p is the first readable of its candidates, the examples that
positions p, p + n, p + 2n ... (n examples: the same slot of the following epochs) would show, with p's
augmentation seeds. A function of p alone, so the determinism above holds with unreadable files too. (The rows
of a batch are computed in one nested dataset that skips the rows that raise; only those get a sub-dataset
that tries the further candidates: :func:`_readable_batch`.) Evaluation of a folder masks an unreadable file
out (mask 0) instead, so a metric never counts a stand-in. TFDS streams drop a record that fails to decode
(``ignore_errors``): the batches stay full and a run is reproducible, but a run resumed after d dropped records
of this process sees its stream shifted by d examples. Batches of file-backed sources carry per row the number
of unreadable images met (key :data:`UNREADABLE`, and the first one's path under :data:`UNREADABLE_PATH`);
:func:`global_batches` strips them and logs a running count.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from vicreg_jax import errors
from vicreg_jax.data import augment, device_augment, sources


# Per-row fields of the batches of file-backed sources: how many unreadable images the row stands for (int32;
# replaced ones in training, 1 on a masked-out row in evaluation, records dropped just before it in a TFDS
# stream) and the path of the first (b'' when none or unknown).
UNREADABLE = 'unreadable'
UNREADABLE_PATH = 'unreadable_path'
# Candidates tried for one position of an image folder before giving up (all unreadable: the folder is broken).
MAX_TRIES = 32


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise errors.ConfigError(f'batch_size {global_batch} must be divisible by the number of processes '
                             f'({process_count}).')
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
            process_index: int, process_count: int, fn: Callable, indices: Optional[np.ndarray] = None,
            encoded: bool = False) -> tf.data.Dataset:
  """This process's infinite batches (``local_b`` rows each) of ``fn(example seed, image, label)`` (a dict) over
  the shuffled examples of ``split``, from ``start_step`` on; the image is float [H, W, C] in [0, 1], or its
  encoded bytes when ``encoded`` and the source is file-backed; the example seed ([2] int64) seeds its
  augmentations. ``indices`` restricts an in-memory split (digits, image folder) to those examples. Batches of
  file-backed sources also hold the :data:`UNREADABLE` and :data:`UNREADABLE_PATH` rows.

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
    return _global_stream(items, labels, data, seed, start_step, local_b, process_index, process_count, fn,
                          decode=None if not source.file_backed else (not encoded))
  if indices is not None:
    raise ValueError('A labelled subset of a TFDS split is chosen by the split name (e.g. '
                     "'imagenet2012_subset/1pct'), not by data.labels_per_class.")
  return _tfds_stream(data, split, seed, start_step, local_b, process_index, process_count, fn, encoded)


def _batch_of(rows: tf.data.Dataset, size: int):
  """The elements of the finite ``rows`` (at most ``size``) as one batch, empty (0 rows) if there are none."""
  batched = rows.batch(size)
  empty = tf.nest.map_structure(lambda s: tf.zeros([0] + [d or 0 for d in s.shape[1:]], s.dtype),
                                batched.element_spec)
  return batched.concatenate(tf.data.Dataset.from_tensors(empty)).take(1).get_single_element()


def _missing(ids, size: int):
  """The ids in [0, ``size``) that ``ids`` lacks, ascending (int64)."""
  present = tf.scatter_nd(ids[:, None], tf.ones_like(ids, tf.int32), [size])
  return tf.where(present == 0)[:, 0]


def _merge(ids, batch, fill_ids, fill, size: int):
  """The rows of ``batch`` (ids ``ids``) and ``fill`` (``fill_ids``) together, in the order of their ids."""
  order = tf.argsort(tf.concat([ids, fill_ids], 0))
  return tf.nest.map_structure(lambda a, b: tf.ensure_shape(tf.gather(tf.concat([a, b], 0), order),
                                                            [size] + a.shape[1:]), batch, fill)


def _threads(data) -> int:
  """The parallelism of the nested datasets (which tf.data does not autotune): the thread pool's size."""
  return data.get('threadpool_size', 0) or os.cpu_count() or 1


def _readable_batch(data, size: int, row: Callable, fill: Callable, count=None):
  """A batch of ``size`` rows: ``row(i)`` (a dict) for i in [0, ``count``) (default: all), computed in parallel,
  except those that raise (an unreadable image), which, with the rows from ``count`` on, are ``fill(their ids)``
  (a batch of as many rows).

  The rows of one batch run in one nested dataset (a sub-dataset per row would instantiate the row's function,
  the whole augmentation, once per row: 2 ms)."""
  rows = tf.data.Dataset.range(size if count is None else count).map(
      lambda i: (i, row(i)), num_parallel_calls=_threads(data), deterministic=True)
  ids, batch = _batch_of(rows.ignore_errors(), size)
  missing = _missing(ids, size)

  def complete():
    return tf.nest.map_structure(lambda x: tf.ensure_shape(x, [size] + x.shape[1:]), batch)

  return tf.cond(tf.size(missing) > 0, lambda: _merge(ids, batch, missing, fill(missing), size), complete)


def _global_stream(items, labels, data, seed, start_step, local_b, process_index, process_count, fn, decode):
  """:func:`_stream` of in-memory ``items`` (images, or file paths read here and decoded if ``decode``).

  File paths: the rows of a batch are computed together (:func:`_readable_batch`); position ``pos`` whose file is
  unreadable shows the first readable of its further candidates j = 1, 2, ... (the examples of positions
  ``pos + j·n``, the same slot of later epochs), still with the augmentation seed of ``pos``."""
  n = len(labels)
  if n == 0:
    raise ValueError('The training split has no examples.')
  items, labels = tf.constant(items), tf.constant(labels)
  global_b = local_b * process_count
  base_seed = tf.constant([seed, 0], tf.int64)

  def example_index(pos):
    return tf.random.experimental.index_shuffle(
        pos % n, seed=tf.stack([tf.constant(seed, tf.int64), pos // n]), max_index=n - 1)

  def example(pos, idx):
    item = tf.gather(items, idx)
    if decode is not None:  # a file path
      item = tf.io.read_file(item)
      if decode:
        item = augment.decode(item, data.channels)
    return fn(tf.random.experimental.stateless_fold_in(base_seed, pos), item, tf.gather(labels, idx))

  if decode is None:  # arrays: nothing to fail
    def load(t):
      pos = (start_step + t // local_b) * global_b + process_index * local_b + t % local_b
      return example(pos, example_index(pos))

    return tf.data.Dataset.counter(dtype=tf.int64).map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(
        local_b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)

  # One trace, and one function to optimise, for the first and the further candidates.
  example = tf.function(example, input_signature=[tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)])

  def local_batch(k):
    first = (start_step + k) * global_b + process_index * local_b

    def row(i):
      pos = first + i
      return dict(example(pos, example_index(pos)), **{UNREADABLE: tf.constant(0), UNREADABLE_PATH: tf.constant('')})

    def first_readable(i):  # row i of a later candidate: a sub-dataset per unreadable row (rare)
      pos = first + i
      first_path = tf.gather(items, example_index(pos))

      def attempt(j):
        out = example(pos, example_index(pos + j * n))
        return i, dict(out, **{UNREADABLE: tf.cast(j, tf.int32), UNREADABLE_PATH: first_path})

      def give_up(_):  # reached only when every candidate failed: an error that says so
        fail = tf.debugging.Assert(pos < 0, [f'{MAX_TRIES} images in a row are unreadable (stream position', pos,
                                             'first', first_path, '); is data.data_dir a folder of images?'])
        with tf.control_dependencies([fail]):
          return tf.nest.map_structure(tf.identity, placeholder)

      tries = tf.data.Dataset.range(1, MAX_TRIES).map(attempt).ignore_errors()
      placeholder = tf.nest.map_structure(lambda s: tf.zeros([d or 1 for d in s.shape], s.dtype),
                                          tries.element_spec)
      return tries.concatenate(tf.data.Dataset.from_tensors(0).map(give_up)).take(1)

    def replacements(missing):
      rows = tf.data.Dataset.from_tensor_slices(missing).interleave(
          first_readable, cycle_length=_threads(data), num_parallel_calls=_threads(data), deterministic=True)
      return _batch_of(rows, local_b)[1]

    return _readable_batch(data, local_b, row, replacements)

  # Two batches at a time: each batch's rows already run in parallel; the second fills the first one's tail.
  return tf.data.Dataset.counter(dtype=tf.int64).map(local_batch, num_parallel_calls=2, deterministic=True)


def _tfds_stream(data, split, seed, start_step, local_b, process_index, process_count, fn, encoded):
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
  base_seed = tf.constant([seed, process_index], tf.int64)

  def example(pos, ex):
    image = ex['image'] if encoded else tf.image.convert_image_dtype(ex['image'], tf.float32)
    return pos, fn(tf.random.experimental.stateless_fold_in(base_seed, pos), image, ex['label'])

  # A record that fails to read or decode is dropped (positions, hence seeds, are fixed before); the row after
  # a gap counts the records dropped since the previous row.
  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start=start, dtype=tf.int64), ds)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)

  def count_dropped(previous, pos_out):
    pos, out = pos_out
    return pos, dict(out, **{UNREADABLE: tf.cast(pos - previous - 1, tf.int32), UNREADABLE_PATH: tf.constant('')})

  ds = ds.scan(tf.constant(start - 1, tf.int64), count_dropped)
  return ds.batch(local_b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)


def _finish(ds, data):
  return ds.prefetch(data.get('prefetch', 2)).with_options(_options(data))


def pretrain_dataset(config: ml_collections.ConfigDict, start_step: int = 0, process_index: int = 0,
                     process_count: int = 1) -> tf.data.Dataset:
  """This process's infinite stream of batches ``{'view1', 'view2', 'label'}`` starting at ``start_step``.

  Each batch holds ``config.batch_size / process_count`` examples: this process's rows of the global batch.
  The label only feeds the online probe; the self-supervised loss never sees it.
  With ``config.augment.on_device`` the views get only the geometric part of their recipe here
  (:func:`device_augment.host_recipe`: the same crops and flips) and come as uint8 (×255, rounded); the train
  step applies the colour part on the accelerator. Batches of image folders and TFDS also hold the
  :data:`UNREADABLE` counts (:func:`global_batches` removes them).
  """
  local_b = local_batch_size(config.batch_size, process_count)
  view1, view2 = dict(config.augment.view1), dict(config.augment.view2)
  on_device = bool(config.augment.get('on_device', False))
  if on_device:
    view1, view2 = device_augment.host_recipe(view1), device_augment.host_recipe(view2)
  cast = device_augment.to_uint8 if on_device else (lambda x: x)
  encoded = _encoded(config.data, (view1, view2))
  channels = config.data.channels

  def views(example_seed, image, label):
    s = tf.random.experimental.stateless_split(example_seed, 2)
    if encoded:  # one JPEG decode (the union of the two crop windows) for both views
      v1, v2 = augment.augment_views(image, (s[0], s[1]), (view1, view2), channels)
    else:
      v1, v2 = augment.augment_view(image, s[0], view1, channels), augment.augment_view(image, s[1], view2, channels)
    return {'view1': cast(v1), 'view2': cast(v2), 'label': tf.cast(label, tf.int32)}

  ds = _stream(config.data, config.data.train_split, config.seed, start_step, local_b, process_index,
               process_count, views, encoded=encoded)
  return _finish(ds, config.data)


def labelled_dataset(data: ml_collections.ConfigDict, recipe: dict, batch_size: int, seed: int,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     indices: Optional[np.ndarray] = None) -> tf.data.Dataset:
  """Infinite batches ``{'image', 'label'}`` of ``data.train_split`` with one view augmented by ``recipe``
  (keys of :data:`augment.RECIPE_DEFAULTS`), from ``start_step`` on; same determinism, unreadable images and
  :data:`UNREADABLE` counts as the pretraining stream."""
  local_b = local_batch_size(batch_size, process_count)

  def view(example_seed, image, label):
    return {'image': augment.augment_view(image, example_seed, recipe, data.channels),
            'label': tf.cast(label, tf.int32)}

  ds = _stream(data, data.train_split, seed, start_step, local_b, process_index, process_count, view, indices,
               encoded=_encoded(data, (recipe,)))
  return _finish(ds, data)


class UnreadableCount:
  """Running count of the unreadable images behind this process's batches (their :data:`UNREADABLE` fields),
  logged as a WARNING when it grows: at once the first time, then at most every ``every_s`` seconds, and by
  :meth:`flush`."""

  def __init__(self, every_s: float = 60.0):
    self.total, self.first, self.every_s = 0, None, every_s
    self._logged, self._last_log, self._how = 0, -float('inf'), ''

  def add(self, counts: np.ndarray, paths: Optional[np.ndarray], masked: bool) -> None:
    """Counts one batch's rows (``counts`` [B], ``paths`` [B] bytes); ``masked``: an evaluation batch."""
    new = int(np.sum(counts))
    if not new:
      return
    self.total += new
    if self.first is None and paths is not None:
      named = [p for p in paths.tolist() if p]
      self.first = named[0].decode(errors='replace') if named else None
    self._how = 'masked out of the evaluation' if masked else 'replaced by other examples'
    if time.monotonic() - self._last_log >= self.every_s:
      self.flush()

  def flush(self) -> None:
    """Logs the count if it grew since the last log line."""
    if self.total > self._logged:
      logging.warning('%d unreadable images so far, %s (first: %s).', self.total, self._how,
                      self.first or 'path unknown')
      self._logged, self._last_log = self.total, time.monotonic()


def global_batches(ds: tf.data.Dataset, sharding: jax.sharding.Sharding,
                   counter: Optional[UnreadableCount] = None) -> Iterator:
  """Turns each process-local numpy batch into a global ``jax.Array`` laid out by ``sharding``.

  The :data:`UNREADABLE` fields of dict batches (file-backed sources) are removed and counted in ``counter``
  (a new :class:`UnreadableCount` if None), which logs how many images were unreadable so far.
  """
  counter = counter or UnreadableCount()
  try:
    for batch in ds.as_numpy_iterator():
      if isinstance(batch, dict) and UNREADABLE in batch:
        batch = dict(batch)
        counter.add(batch.pop(UNREADABLE), batch.pop(UNREADABLE_PATH, None), masked='mask' in batch)
      yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
  finally:
    counter.flush()


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

  Unreadable images: an image folder's keep their row, masked out (mask 0, zero image, their index; the batches
  also hold the :data:`UNREADABLE` fields); a TFDS record that fails to decode is dropped (logged by tf.data),
  its place taken by the padding at the end.
  """
  local_b = local_batch_size(batch_size, process_count)
  source = sources.get(data)
  ds, a, b, total = source.eval_share(data, split, process_index, process_count, max_examples)
  resize = resize or crop * 8 // 7
  in_memory = source.in_memory(data, split) if source.file_backed else None

  def prep(image):
    if image.dtype == tf.string:
      image = augment.decode(image, data.channels)
    image = _resize_centre_crop(tf.image.convert_image_dtype(image, tf.float32), resize, crop)
    image = tf.ensure_shape(image, [crop, crop, data.channels])
    return image if mean is None else augment.normalize(image, mean, std)

  largest_share = -(-total // process_count)
  batches = -(-largest_share // local_b)
  if in_memory is not None:  # an image folder: read here, batch by batch, unreadable files masked out
    paths, labels = (x[a:b] for x in in_memory)
    # One more entry, gathered by the padding rows.
    paths_t, labels_t = tf.constant(np.append(paths, '')), tf.constant(np.append(labels, 0).astype(np.int32))

    def local_batch(k):
      first = k * local_b
      count = tf.clip_by_value(tf.constant(b - a, tf.int64) - first, 0, local_b)  # files in this batch; then padding

      def row(i):
        j = first + i
        return {'image': prep(tf.io.read_file(tf.gather(paths_t, j))), 'label': tf.gather(labels_t, j),
                'index': a + j, 'mask': tf.constant(1.0), UNREADABLE: tf.constant(0),
                UNREADABLE_PATH: tf.constant('')}

      def masked(missing):  # unreadable files (mask 0, their index) and the padding (index -1)
        real = missing < count
        j = tf.where(real, first + missing, len(paths))
        m = tf.size(missing)
        return {'image': tf.zeros([m, crop, crop, data.channels]), 'label': tf.gather(labels_t, j),
                'index': tf.where(real, a + j, -1), 'mask': tf.zeros([m]), UNREADABLE: tf.cast(real, tf.int32),
                UNREADABLE_PATH: tf.gather(paths_t, j)}

      return _readable_batch(data, local_b, row, masked, count)

    ds = tf.data.Dataset.range(batches).map(local_batch, num_parallel_calls=2, deterministic=True)
    return ds.prefetch(2).with_options(_options(data))
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(a, b))
  if source.file_backed:  # TFDS: a record that fails to decode is dropped, its place taken by the padding
    ds = ds.map(lambda xy, i: ((prep(xy[0]), xy[1]), i), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
  elif mean is not None:
    ds = ds.map(lambda xy, i: ((augment.normalize(xy[0], mean, std), xy[1]), i))
  ds = ds.map(lambda xy, i: {'image': xy[0], 'label': tf.cast(xy[1], tf.int32), 'index': i, 'mask': tf.constant(1.0)})
  pad = {'image': tf.zeros(ds.element_spec['image'].shape, tf.float32), 'label': tf.constant(0),
         'index': tf.constant(-1, tf.int64), 'mask': tf.constant(0.0)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(batches * local_b)
  return ds.batch(local_b).prefetch(2).with_options(_options(data))
