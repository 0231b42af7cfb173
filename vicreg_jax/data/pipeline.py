"""tf.data pipelines, one per process, feeding global ``jax.Array`` batches.

- :func:`pretrain_dataset`: two augmented views (and the label, for the online probe) per example, plus the
  small crops of multi-crop (``augment.small_crops``).
- :func:`labelled_dataset`: one augmented view and its label, for linear evaluation and fine-tuning.
- :func:`eval_dataset`: un-augmented, centre-cropped images with labels and their index in the split, one pass
  over this process's contiguous share.

Randomness is stateless. The sources own their streams (:mod:`vicreg_jax.data.sources`); in-memory sources
(arrays and digits, an image folder's file list) are one global stream (:mod:`vicreg_jax.data.streams`):
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
that tries the further candidates: :func:`streams.readable_batch`.) Evaluation of a folder masks an unreadable file
out (mask 0) instead, so a metric never counts a stand-in. TFDS streams drop a record that fails to decode
(``ignore_errors``): the batches stay full and a run is reproducible, but a run resumed after d dropped records
of this process sees its stream shifted by d examples. Batches of file-backed sources carry per row the number
of unreadable images met (key :data:`streams.UNREADABLE`, and the first one's path under :data:`streams.UNREADABLE_PATH`);
:func:`global_batches` strips them and logs a running count.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from vicreg_jax import errors
from vicreg_jax.data import augment, device_augment, sources, streams


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise errors.ConfigError(f'batch_size {global_batch} must be divisible by the number of processes '
                             f'({process_count}).')
  return global_batch // process_count


def _options(data: ml_collections.ConfigDict) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = data.threadpool_size
  opts.autotune.enabled = True
  return opts


def _encoded(source: sources.Source, recipes) -> bool:
  """Whether images stay encoded until the views decode them: file-backed sources (TFDS, image folders) when
  every view starts with a random resized crop, so each view decodes only its crop window (JPEG)."""
  return source.file_backed and all(dict(r).get('crop_size') for r in recipes)


def _finish(ds, data):
  return ds.prefetch(data.prefetch).with_options(_options(data))


# Folded into an example's seed to seed its small crops (the views keep the seeds they have without multi-crop).
SMALL_CROPS_SEED = 0x736d616c


def _crop_seeds(example_seed, small_crops: int) -> list:
  """The seeds of an example's crops: the two views' from ``stateless_split(example_seed, 2)`` (as without
  multi-crop, so two-view runs see the same views), then ``small_crops`` from the example seed folded with
  :data:`SMALL_CROPS_SEED` and split."""
  s = tf.random.experimental.stateless_split(example_seed, 2)
  seeds = [s[0], s[1]]
  if small_crops:
    small = tf.random.experimental.stateless_fold_in(example_seed, SMALL_CROPS_SEED)
    seeds += list(tf.unstack(tf.random.experimental.stateless_split(small, small_crops)))
  return seeds


def _pretrain_recipes(augment) -> tuple[list, bool]:
  """The recipe of every crop (view 1, view 2, then ``augment.small_crops`` times ``augment.small_view``), only
  their geometric part with ``augment.on_device``; and whether the crops are sent as uint8."""
  recipes = [dict(augment.view1), dict(augment.view2)] + [dict(augment.small_view)] * augment.small_crops
  on_device = bool(augment.on_device)
  if on_device:
    recipes = [device_augment.host_recipe(r) for r in recipes]
  return recipes, on_device


def pretrain_dataset(config: ml_collections.ConfigDict, start_step: int = 0, process_index: int = 0,
                     process_count: int = 1) -> tf.data.Dataset:
  """This process's infinite stream of batches ``{'view1', 'view2', 'label'}`` starting at ``start_step``, and
  with multi-crop (``augment.small_crops`` = k > 0) ``'small'`` [B, k, s, s, C]: k crops of ``augment.small_view``.

  Each batch holds ``config.batch_size / process_count`` examples: this process's rows of the global batch.
  The label only feeds the online probe; the self-supervised loss never sees it. Every crop of an example is
  computed in the same tf.data graph from its own stateless seed (:func:`_crop_seeds`); encoded JPEGs are
  decoded once, the union of all the crops' windows (:func:`augment.augment_views`), as the official SwAV's
  dataset loads each image once for all its crops (facebookresearch/swav@06b1b7c:src/multicropdataset.py:L55-L58).
  With ``config.augment.on_device`` the crops get only the geometric part of their recipe here
  (:func:`device_augment.host_recipe`: the same crops and flips) and come as uint8 (×255, rounded); the train
  step applies the colour part on the accelerator. Batches of image folders and TFDS also hold the
  :data:`streams.UNREADABLE` counts (:func:`global_batches` removes them).
  """
  local_b = local_batch_size(config.batch_size, process_count)
  small_crops = config.augment.small_crops
  recipes, on_device = _pretrain_recipes(config.augment)
  if not on_device and jax.default_backend() == 'tpu':
    logging.warning('augment.on_device is off on a TPU: the colour ops run on the host CPUs, several times slower '
                    'than on the chips (docs/performance.md); --config.augment.on_device=True moves them there.')
  cast = device_augment.to_uint8 if on_device else (lambda x: x)
  source = sources.get(config.data)
  encoded = _encoded(source, recipes)
  channels = config.data.channels

  def views(example_seed, image, label):
    seeds = _crop_seeds(example_seed, small_crops)
    if encoded:  # one JPEG decode (the union of the crop windows) for every crop
      crops = augment.augment_views(image, seeds, recipes, channels)
    else:
      crops = [augment.augment_view(image, seed, r, channels) for seed, r in zip(seeds, recipes)]
    out = {'view1': cast(crops[0]), 'view2': cast(crops[1]), 'label': tf.cast(label, tf.int32)}
    if small_crops:
      out['small'] = cast(tf.stack(crops[2:]))
    return out

  ds = source.train_stream(config.data, config.data.train_split, config.seed, start_step, local_b, process_index,
                           process_count, views, encoded=encoded)
  return _finish(ds, config.data)


def labelled_dataset(data: ml_collections.ConfigDict, recipe: dict, batch_size: int, seed: int,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     indices: Optional[np.ndarray] = None) -> tf.data.Dataset:
  """Infinite batches ``{'image', 'label'}`` of ``data.train_split`` with one view augmented by ``recipe``
  (keys of :data:`recipes.RECIPE_DEFAULTS`), from ``start_step`` on; same determinism, unreadable images and
  :data:`streams.UNREADABLE` counts as the pretraining stream."""
  local_b = local_batch_size(batch_size, process_count)

  def view(example_seed, image, label):
    return {'image': augment.augment_view(image, example_seed, recipe, data.channels),
            'label': tf.cast(label, tf.int32)}

  source = sources.get(data)
  ds = source.train_stream(data, data.train_split, seed, start_step, local_b, process_index, process_count, view,
                           indices, encoded=_encoded(source, (recipe,)))
  return _finish(ds, data)


class UnreadableCount:
  """Running count of the unreadable images behind this process's batches (their :data:`streams.UNREADABLE` fields),
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

  The :data:`streams.UNREADABLE` fields of dict batches (file-backed sources) are removed and counted in ``counter``
  (a new :class:`UnreadableCount` if None), which logs how many images were unreadable so far.
  """
  counter = counter or UnreadableCount()
  try:
    for batch in ds.as_numpy_iterator():
      if isinstance(batch, dict) and streams.UNREADABLE in batch:
        batch = dict(batch)
        counter.add(batch.pop(streams.UNREADABLE), batch.pop(streams.UNREADABLE_PATH, None),
                    masked='mask' in batch)
      yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
  finally:
    counter.flush()


def _resize_centre_crop(image, resize: int, crop: int, method: str = 'bilinear'):
  """Shorter side to ``resize`` (interpolation ``method``), then the central ``crop``×``crop``: the official
  evaluation transform (torchvision ``Resize(256)`` + ``CenterCrop(224)`` on PIL images: bilinear by default
  (BYOL's and SimCLR's protocols: bicubic), antialiased when shrinking; the
  longer side ``int(resize·long/short)``; the crop's offset ``round((side - crop)/2)``)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  short, long_ = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(tf.cast(resize, tf.int64) * tf.cast(long_, tf.int64) // tf.cast(short, tf.int64), tf.int32)
  new = tf.where(h <= w, tf.stack([resize, new_long]), tf.stack([new_long, resize]))
  image = tf.clip_by_value(tf.image.resize(image, new, method=method, antialias=True), 0.0, 1.0)
  top = tf.cast(tf.round(tf.cast(new[0] - crop, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new[1] - crop, tf.float32) / 2), tf.int32)
  return tf.image.crop_to_bounding_box(image, top, left, crop, crop)


def eval_dataset(data: ml_collections.ConfigDict, split: str, batch_size: int, *, crop: int, resize: int = 0,
                 mean=None, std=None, process_index: int = 0, process_count: int = 1,
                 max_examples: int = 0, method: str = 'bilinear') -> tf.data.Dataset:
  """One pass over this process's share (:func:`streams.share_bounds`) of the first ``max_examples`` (0: all)
  examples of ``split`` (:meth:`sources.Source.eval_batches`), in batches ``{'image', 'label', 'index', 'mask'}`` of ``batch_size / process_count``; ``index``
  is the example's position in the split. Batches are padded (mask 0, index -1) so every process yields the
  same number of full batches (collectives must match).

  TFDS and image-folder images: shorter side resized to ``resize`` (0: ``crop``·8/7, i.e. 256 for 224) with
  interpolation ``method``, centre crop ``crop``. In-memory (arrays, digits) images are used as they are. Then
  normalised by ``mean``/``std`` if given.

  Unreadable images: an image folder's keep their row, masked out (mask 0, zero image, their index; the batches
  also hold the :data:`streams.UNREADABLE` fields); a TFDS record that fails to decode is dropped (logged by
  tf.data), its place taken by the padding at the end.
  """
  local_b = local_batch_size(batch_size, process_count)
  source = sources.get(data)
  resize = resize or crop * 8 // 7
  if source.file_backed:
    prepare = functools.partial(_prepare, channels=data.channels, resize=resize, crop=crop, mean=mean, std=std,
                                method=method)
  else:
    prepare = None if mean is None else functools.partial(augment.normalize, mean=mean, std=std)
  ds = source.eval_batches(data, split, local_b, prepare, (crop, crop, data.channels), process_index,
                           process_count, max_examples)
  return ds.prefetch(2).with_options(_options(data))


def _prepare(image, *, channels: int, resize: int, crop: int, mean, std, method: str = 'bilinear'):
  """A file-backed source's evaluation image (encoded bytes or uint8): decoded, shorter side resized to
  ``resize``, the central ``crop``×``crop``, normalised by ``mean``/``std`` if given."""
  if image.dtype == tf.string:
    image = augment.decode(image, channels)
  image = _resize_centre_crop(tf.image.convert_image_dtype(image, tf.float32), resize, crop, method)
  image = tf.ensure_shape(image, [crop, crop, channels])
  return image if mean is None else augment.normalize(image, mean, std)
