"""In-memory arrays: the machinery of every source held as float images (digits builds on it), and the
``arrays`` source, an ``.npz`` file named by ``data.path``.

The file holds ``images`` ([N, H, W] or [N, H, W, C]: uint8, scaled by 1/255, or float32 in [0, 1], used as is)
and ``labels`` (integers >= 0, [N]); the number of classes is the largest training label + 1. Splits: a
``data.path`` containing ``{split}`` is formatted with the split's name (``data/mnist_{split}.npz`` serves
'train' from ``data/mnist_train.npz`` and 'test' from ``data/mnist_test.npz``); a path without it serves only
the training split (``data.train_split``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from vicreg_jax import errors
from vicreg_jax.data import sources, streams

_HOW = ('an .npz with images [N, H, W(, C)] (uint8, or float32 in [0, 1]) and int labels [N] (np.savez(FILE, '
        'images=..., labels=...))')


@dataclasses.dataclass
class ArraySplit:
  """An in-memory split: float32 images [N, H, W, C] in [0, 1] and int labels [N]."""
  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.labels)


class Arrays(sources.Source):
  """A source held in memory as an :class:`ArraySplit` per split: ``load(data, split)``; ``classes(data)``
  (default: the largest label of ``data.train_split`` + 1)."""
  file_backed = False

  def __init__(self, load: Callable[..., ArraySplit], classes: Optional[Callable[..., int]] = None):
    self.load, self.classes = load, classes

  def split(self, data, split: str) -> ArraySplit:
    """``load(data, split)``, its channels checked against ``data.channels`` (one line naming the fix)."""
    arrays = self.load(data, split)
    if arrays.images.shape[-1] != data.channels:
      raise errors.ConfigError(f'the {data.source} images have {arrays.images.shape[-1]} channels but data.channels '
                               f'is {data.channels}: pass --config.data.channels={arrays.images.shape[-1]}')
    return arrays

  def num_examples(self, data, split: str) -> int:
    return self.split(data, split).num_examples

  def num_classes(self, data) -> int:
    if self.classes is not None:
      return self.classes(data)
    return int(self.split(data, data.train_split).labels.max()) + 1

  def in_memory(self, data, split: str) -> tuple:
    arrays = self.split(data, split)
    return arrays.images, arrays.labels

  def train_stream(self, data, split, seed, start_step, local_b, process_index, process_count, fn, indices=None,
                   encoded=False):
    images, labels = self.examples(data, split, indices)
    return streams.array_stream(images, labels, seed, start_step, local_b, process_index, process_count, fn)

  def eval_batches(self, data, split, local_b, prepare, image_shape, process_index, process_count, max_examples):
    arrays = self.split(data, split)
    total = min(max_examples or arrays.num_examples, arrays.num_examples)
    a, b = streams.share_bounds(total, process_index, process_count)
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices((arrays.images[a:b], arrays.labels[a:b])),
                             tf.data.Dataset.range(a, b))
    if prepare is not None:
      ds = ds.map(lambda xy, i: ((prepare(xy[0]), xy[1]), i))
    return streams.padded_batches(ds, local_b, streams.eval_batch_count(total, local_b, process_count))


# --- the arrays source: an .npz file ---------------------------------------------------------------------

def split_path(data, split: str) -> str:
  """The file of ``split``: ``data.path`` formatted with the split's name, or as it is for the training split."""
  path = data.path
  if not path:
    raise errors.ConfigError(f'data.source is arrays but data.path is not set: pass --config.data.path=FILE, {_HOW}.')
  if '{split}' in path:
    return path.replace('{split}', split)
  if split != data.train_split:
    raise errors.ConfigError(f'data.path {path} holds only the training split ({data.train_split!r}), not '
                             f'{split!r}: put {{split}} into the path (e.g. data/x_{{split}}.npz) for one file per split.')
  return path


def _images(images: np.ndarray, path: str) -> np.ndarray:
  """float32 [N, H, W, C] in [0, 1] from the file's images, or a one-line error."""
  if images.ndim not in (3, 4):
    raise errors.DataNotFoundError(f'{path}: images have shape {images.shape}, not [N, H, W] or [N, H, W, C].')
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype == np.uint8:  # as tf.image.convert_image_dtype: times 1/255 in float32
    return images.astype(np.float32) * np.float32(1 / 255)
  if images.dtype != np.float32:
    raise errors.DataNotFoundError(f'{path}: images are {images.dtype}, not uint8 or float32 in [0, 1].')
  if images.size and not (np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1):
    raise errors.DataNotFoundError(f'{path}: float32 images must lie in [0, 1] (found values in '
                                   f'[{images.min()}, {images.max()}]); scale them, or save uint8.')
  return images


def _labels(labels: np.ndarray, n: int, path: str) -> np.ndarray:
  """int32 labels [n] from the file's labels, or a one-line error."""
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise errors.DataNotFoundError(f'{path}: labels must be integers of shape [N], not {labels.dtype} '
                                   f'{labels.shape}.')
  if len(labels) != n:
    raise errors.DataNotFoundError(f'{path}: {len(labels)} labels for {n} images.')
  if len(labels) and labels.min() < 0:
    raise errors.DataNotFoundError(f'{path}: labels must be >= 0 (found {labels.min()}).')
  return labels.astype(np.int32)


def _read(path: str) -> dict:
  """The arrays ``images`` and ``labels`` of the .npz ``path``, or a one-line error."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, np.load(f, allow_pickle=False) as npz:
      missing = [k for k in ('images', 'labels') if k not in npz.files]
      if missing:
        raise errors.DataNotFoundError(f'{path} has no array {missing[0]!r} (it has {sorted(npz.files)}): {_HOW}.')
      return {'images': npz['images'], 'labels': npz['labels']}
  except errors.DataNotFoundError:
    raise
  except Exception as e:  # not an .npz, truncated, object arrays
    raise errors.DataNotFoundError(f'{path} is not a readable .npz ({type(e).__name__}: {e}): {_HOW}.') from None


def read_split(path: str) -> ArraySplit:
  """The :class:`ArraySplit` of the .npz ``path``; read once per version of the file (cached, read-only). Its
  channels are checked against ``data.channels`` by :meth:`Arrays.split`."""
  if not tf.io.gfile.exists(path):
    raise errors.DataNotFoundError(f'data.path {path} does not exist: {_HOW}.')
  stat = tf.io.gfile.stat(path)
  return _read_split(path, stat.mtime_nsec, stat.length)


@functools.lru_cache(maxsize=8)
def _read_split(path: str, mtime_nsec: int, length: int) -> ArraySplit:
  del mtime_nsec, length  # the cache's key: a rewritten file is read again
  arrays = _read(path)
  images = _images(arrays['images'], path)
  labels = _labels(arrays['labels'], len(images), path)
  images.flags.writeable = labels.flags.writeable = False
  return ArraySplit(images, labels)


def _load(data, split: str) -> ArraySplit:
  return read_split(split_path(data, split))


SOURCE = Arrays(_load)
