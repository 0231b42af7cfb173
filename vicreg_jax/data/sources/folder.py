"""Image folders (``root/class_name/*.jpg|jpeg|png``, optionally inside ``root/train`` and ``root/val``): the file
list in memory, one global stream over all processes, files read (and decoded) by the pipeline."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from vicreg_jax import errors
from vicreg_jax.data import sources, streams



IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_SPLIT_DIRS = {'train': ('train',), 'validation': ('val', 'validation'), 'test': ('test',)}
_FOLDER_HOW = ('pass --config.data.data_dir=ROOT where ROOT holds one subfolder of images per class '
               '(ROOT/CLASS/*.jpg|jpeg|png), optionally inside ROOT/train and ROOT/val')


@dataclasses.dataclass
class FileSplit:
  """A split of an image folder: file paths (sorted), int32 labels and the class names (label i = classes[i])."""
  paths: np.ndarray
  labels: np.ndarray
  classes: list

  @property
  def num_examples(self) -> int:
    return len(self.labels)


def _subdirs(root: str) -> list:
  return sorted(d.rstrip('/') for d in tf.io.gfile.listdir(root) if tf.io.gfile.isdir(os.path.join(root, d)))


@functools.lru_cache(maxsize=16)
def _scan(root: str) -> FileSplit:
  """Every image under ``root/CLASS/`` (classes = sorted subfolder names; files sorted within a class)."""
  if not tf.io.gfile.isdir(root):
    raise errors.DataNotFoundError(f'Image folder {root} does not exist: {_FOLDER_HOW}.')
  classes = _subdirs(root)
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = sorted(f for f in tf.io.gfile.listdir(os.path.join(root, name))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(root, name, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise errors.DataNotFoundError(f'Image folder {root} holds no class subfolders with .jpg/.jpeg/.png images: '
                            f'{_FOLDER_HOW}.')
  return FileSplit(np.array(paths), np.array(labels, np.int32), classes)


def _split_dir(root: str, split: str) -> Optional[str]:
  """``root/train``, ``root/val`` ... : the subfolder of ``split`` in a folder laid out by split, or None."""
  for d in _SPLIT_DIRS.get(split, (split,)):
    if tf.io.gfile.isdir(os.path.join(root, d)):
      return os.path.join(root, d)
  return None


def folder_split(root: Optional[str], split: str, val_fraction: float = 0.0) -> FileSplit:
  """The ``split`` ('train' or 'validation'; 'test' where a test/ subfolder exists) of the image folder ``root``.

  If ``root`` has a ``train/`` subfolder, splits are its subfolders (``train``; ``val`` or ``validation``;
  ``test``), each laid out ``CLASS/*.jpg``, with the training split's classes as the label set. Otherwise the
  classes are ``root``'s subfolders. Where there is no validation subfolder (a flat folder, or ``train/``
  alone), 'validation' is a fixed ``val_fraction`` of every class of the training images (the same files on
  every machine and run: a seeded permutation of the sorted file names) and 'train' is the rest.
  """
  if not root:
    raise errors.DataNotFoundError(f'data.source is folder but data.data_dir is not set: {_FOLDER_HOW}.')
  if not 0.0 <= val_fraction < 1.0:
    raise errors.ConfigError(f'data.val_fraction must be in [0, 1), not {val_fraction}.')
  if tf.io.gfile.isdir(os.path.join(root, 'train')):
    holdout = val_fraction > 0 and _split_dir(root, 'validation') is None
    if holdout and split in ('train', 'validation', 'val'):
      return _held_out(os.path.join(root, 'train'), split, val_fraction)
    own = _split_dir(root, split)
    if own is None:
      hint = (' or set --config.data.val_fraction (e.g. 0.05) to hold out part of train/'
              if split in ('validation', 'val') else '')
      raise errors.DataNotFoundError(f'Image folder {root} has no subfolder for split {split!r} (looked for '
                              f'{", ".join(_SPLIT_DIRS.get(split, (split,)))}){hint}.')
    files = _scan(own)
    classes = _scan(os.path.join(root, 'train')).classes
    if files.classes != classes:  # validation may lack classes: map by name
      index = {c: i for i, c in enumerate(classes)}
      missing = sorted(set(files.classes) - set(index))
      if missing:
        raise errors.DataNotFoundError(f'Split {split!r} of {root} has classes not in train/: {missing[:5]}.')
      files = FileSplit(files.paths, np.array([index[files.classes[y]] for y in files.labels], np.int32),
                        classes)
    return files
  if split not in ('train', 'validation', 'val'):
    raise errors.ConfigError(f"An image folder without train/ and val/ subfolders has splits 'train' and "
                             f"'validation', not {split!r}.")
  return _held_out(root, split, val_fraction)


def _held_out(root: str, split: str, val_fraction: float) -> FileSplit:
  """'train' or 'validation' of the class folders in ``root`` with ``val_fraction`` of every class held out."""
  files = _scan(root)
  if split != 'train' and val_fraction == 0.0:
    raise errors.ConfigError(f'Image folder {root} has no val/ subfolder: set --config.data.val_fraction (e.g. '
                            '0.05) to hold out part of every class as the validation split.')
  rng = np.random.default_rng(0)
  val = np.zeros(len(files.labels), bool)
  for c in range(len(files.classes)):
    idx = np.flatnonzero(files.labels == c)
    val[idx[rng.permutation(len(idx))[:int(round(val_fraction * len(idx)))]]] = True
  keep = ~val if split == 'train' else val
  return FileSplit(files.paths[keep], files.labels[keep], files.classes)


class Folder(sources.Source):
  """An image folder (``data.data_dir``; ``data.val_fraction`` held out when it has no val/): its file list in
  memory, one global stream of the files (:func:`streams.file_stream`: unreadable files replaced); evaluation
  reads batch by batch and masks unreadable files out (mask 0, zero image, their index; the batches also hold
  the :data:`streams.UNREADABLE` fields) so a metric never counts a stand-in."""
  file_backed = True

  def split(self, data, split: str) -> FileSplit:
    return folder_split(data.data_dir, split, data.val_fraction)

  def num_examples(self, data, split: str) -> int:
    return self.split(data, split).num_examples

  def num_classes(self, data) -> int:
    return len(self.split(data, data.train_split).classes)

  def in_memory(self, data, split: str) -> tuple:
    files = self.split(data, split)
    return files.paths, files.labels

  def train_stream(self, data, split, seed, start_step, local_b, process_index, process_count, fn, indices=None,
                   encoded=False):
    paths, labels = self.examples(data, split, indices)
    return streams.file_stream(paths, labels, data, seed, start_step, local_b, process_index, process_count, fn,
                               decode=not encoded)

  def eval_batches(self, data, split, local_b, prepare, image_shape, process_index, process_count, max_examples):
    files = self.split(data, split)
    total = min(max_examples or files.num_examples, files.num_examples)
    a, b = streams.share_bounds(total, process_index, process_count)
    share = _EvalShare(data, files.paths[a:b], files.labels[a:b], a, local_b, prepare, image_shape)
    ds = tf.data.Dataset.range(streams.eval_batch_count(total, local_b, process_count))
    return ds.map(share.local_batch, num_parallel_calls=2, deterministic=True)


class _EvalShare:
  """The evaluation batches of the files ``paths`` (the split's ``[start, start + len(paths))``), read here."""

  def __init__(self, data, paths, labels, start: int, local_b: int, prepare, image_shape):
    self.data, self.start, self.size, self.local_b, self.prepare = data, start, len(paths), local_b, prepare
    self.image_shape = tuple(image_shape)
    # One more entry, gathered by the padding rows.
    self.paths = tf.constant(np.append(paths, ''))
    self.labels = tf.constant(np.append(labels, 0).astype(np.int32))

  def local_batch(self, k):
    first = k * self.local_b
    count = tf.clip_by_value(tf.constant(self.size, tf.int64) - first, 0, self.local_b)  # files; then padding
    return streams.readable_batch(self.data, self.local_b, lambda i: self.row(first + i),
                                  lambda missing: self.masked(first, count, missing), count)

  def row(self, j):
    return {'image': self.prepare(tf.io.read_file(tf.gather(self.paths, j))), 'label': tf.gather(self.labels, j),
            'index': self.start + j, 'mask': tf.constant(1.0), streams.UNREADABLE: tf.constant(0),
            streams.UNREADABLE_PATH: tf.constant('')}

  def masked(self, first, count, missing):
    """Unreadable files (mask 0, their index) and the padding (index -1)."""
    real = missing < count
    j = tf.where(real, first + missing, self.size)
    m = tf.size(missing)
    return {'image': tf.zeros([m, *self.image_shape]), 'label': tf.gather(self.labels, j),
            'index': tf.where(real, self.start + j, -1), 'mask': tf.zeros([m]),
            streams.UNREADABLE: tf.cast(real, tf.int32), streams.UNREADABLE_PATH: tf.gather(self.paths, j)}


SOURCE = Folder()
