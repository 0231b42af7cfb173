"""Datasets: scikit-learn's embedded digits, any TFDS dataset by name, and image folders
(``root/class_name/*.jpg|jpeg|png``)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vicreg_jax import errors


DataNotFoundError = errors.DataNotFoundError  # where callers have always found it


@dataclasses.dataclass
class ArraySplit:
  """An in-memory split: float32 images [N, H, W, C] in [0, 1] and int labels [N]."""
  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.labels)


@functools.lru_cache(maxsize=8)
def digits(split: str, size: int = 8) -> ArraySplit:
  """scikit-learn's 1,797 8×8 handwritten digits, 70/30 stratified split (``random_state=0``).

  ``split`` is 'train' (1,257 images) or 'test' (540). Pixels 0–16 are scaled to [0, 1], shape [N, 8, 8, 1];
  with ``size`` > 8, upsampled bilinearly to [N, size, size, 1] (room for a convolutional backbone's strides).
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  if split not in ('train', 'test'):
    raise errors.ConfigError(f"digits has splits 'train' and 'test', not {split!r}.")
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
  x, y = (x_tr, y_tr) if split == 'train' else (x_te, y_te)
  if size != 8:
    x = tf.image.resize(x, (size, size), method='bilinear').numpy()
  x.flags.writeable = y.flags.writeable = False  # cached: shared by every caller
  return ArraySplit(x, y)


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices of ``per_class`` examples of every class in ``labels``, drawn without replacement by ``seed``."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                         for c in np.unique(labels)])


# How to provide datasets that TFDS cannot download by itself.
_MANUAL = {
    'imagenet2012': ('download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into '
                     'DIR, run `tfds build imagenet2012 --manual_dir=DIR --data_dir=DATA`, then pass '
                     '--config.data.data_dir=DATA (a local path or gs://bucket/tensorflow_datasets)'),
}
_MANUAL['imagenet2012_subset'] = _MANUAL['imagenet2012'].replace('build imagenet2012', 'build imagenet2012_subset')


def tfds_builder(name: str, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for ``name``, or :class:`DataNotFoundError` saying how to prepare it.

  Never downloads: a dataset must have been built (``tfds build``) under ``data_dir`` (default:
  ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name, bad config name
    raise DataNotFoundError(f'TFDS has no dataset {name!r} ({type(e).__name__}).') from None
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    where = builder.data_dir
    how = _MANUAL.get(name.split('/')[0],
                      f'run `tfds build {name} --data_dir=DATA` on a machine with network access, then pass '
                      f'--config.data.data_dir=DATA')
    raise DataNotFoundError(f'Dataset {name!r} is not prepared at {where}: {how}.')
  return builder


def tfds_split(name: str, split, *, data_dir: Optional[str] = None, process_index: int = 0,
               process_count: int = 1, shuffle_files: bool = False, seed: int = 0,
               decode: bool = True) -> tf.data.Dataset:
  """This process's even share of a TFDS split (equal shares, the remainder dropped), as a dataset of
  ``{'image': uint8 [H,W,C], 'label'}``; with ``decode=False`` the image stays the encoded bytes (a string
  scalar), for fused decode-and-crop."""
  builder = tfds_builder(name, data_dir)
  if process_count > 1:
    split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16)
  decoders = None if decode else {'image': tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config, decoders=decoders)
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def tfds_share(name: str, split: str, data_dir: Optional[str] = None, process_index: int = 0,
               process_count: int = 1) -> tuple[tf.data.Dataset, int, int, int]:
  """For one pass over all of a TFDS split (``split`` may be sliced, e.g. 'validation[:1000]'): this process's
  contiguous share (``tfds.even_splits``, nothing dropped), the indices in the split of its first example and
  of the one after its last, and the split's size."""
  if '+' in split and process_count > 1:  # even_splits would split each part: shares not contiguous
    raise errors.ConfigError(f'evaluation split {split!r} on {process_count} processes: use one split (sliced if '
                     'need be), not a combination')
  builder = tfds_builder(name, data_dir)
  shares = tfds.even_splits(split, n=process_count, drop_remainder=False)
  sizes = [builder.info.splits[s].num_examples for s in shares]
  start = sum(sizes[:process_index])
  return (tfds_split(name, shares[process_index], data_dir=data_dir), start, start + sizes[process_index],
          sum(sizes))


def num_examples(name: str, split: str, data_dir: Optional[str] = None) -> int:
  """Number of examples in a TFDS split (the whole split, all processes together).

  For ``name='folder'`` (or a TFDS name not prepared under ``data_dir`` when ``data_dir`` is an image folder),
  the number of images in that split of the image folder ``data_dir`` (see :func:`folder_split`; the default
  ``val_fraction`` of 0 unless the folder has train/ and val/ subfolders). Prefer ``get(data).num_examples``,
  which knows the config's source and ``val_fraction``.
  """
  if name == 'folder':
    return folder_split(data_dir, split).num_examples
  try:
    builder = tfds_builder(name, data_dir)
  except DataNotFoundError:
    if data_dir:  # an image folder given with the default name: count it; otherwise TFDS's own message
      try:
        return folder_split(data_dir, split).num_examples
      except (DataNotFoundError, ValueError):
        pass
    raise
  return builder.info.splits[split].num_examples


# --- image folders -----------------------------------------------------------------------------------------

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
    raise DataNotFoundError(f'Image folder {root} does not exist: {_FOLDER_HOW}.')
  classes = _subdirs(root)
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = sorted(f for f in tf.io.gfile.listdir(os.path.join(root, name))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(root, name, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise DataNotFoundError(f'Image folder {root} holds no class subfolders with .jpg/.jpeg/.png images: '
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
    raise DataNotFoundError(f'data.source is folder but data.data_dir is not set: {_FOLDER_HOW}.')
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
      raise DataNotFoundError(f'Image folder {root} has no subfolder for split {split!r} (looked for '
                              f'{", ".join(_SPLIT_DIRS.get(split, (split,)))}){hint}.')
    files = _scan(own)
    classes = _scan(os.path.join(root, 'train')).classes
    if files.classes != classes:  # validation may lack classes: map by name
      index = {c: i for i, c in enumerate(classes)}
      missing = sorted(set(files.classes) - set(index))
      if missing:
        raise DataNotFoundError(f'Split {split!r} of {root} has classes not in train/: {missing[:5]}.')
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


def folder_dataset(split: FileSplit, start: int = 0, stop: Optional[int] = None) -> tf.data.Dataset:
  """One pass, in file order, over files ``[start, stop)`` of ``split`` (a process's share), as
  ``{'image': encoded bytes, 'label'}``."""
  ds = tf.data.Dataset.from_tensor_slices((split.paths[start:stop], split.labels[start:stop]))
  return ds.map(lambda p, y: {'image': tf.io.read_file(p), 'label': y}, num_parallel_calls=tf.data.AUTOTUNE)


# --- one interface over the three sources ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
  """What the pipelines and jobs need from a dataset; one record per ``data.source``, each function taking the
  config's ``data`` section.

  - ``num_examples(data, split)``: examples in the split, all processes together;
  - ``num_classes(data)``;
  - ``in_memory(data, split)``: ``(items, labels)`` for sources held in memory, one global stream over all
    processes (digits: float images [N, H, W, C] in [0, 1]; folder: file paths), else None (TFDS: each process
    reads its own files);
  - ``eval_share(data, split, process_index, process_count, max_examples)``: for one pass over the first
    ``max_examples`` (0: all) examples, this process's contiguous share as a dataset of ``(image, label)``
    (decoded float images, or encoded bytes / uint8 where ``file_backed``), the indices in the split of its
    first and one-past-last example, and the number of examples;
  - ``file_backed``: images come from encoded files (decoded per view; resized and centre-cropped to evaluate).
  """
  num_examples: Callable[[Any, str], int]
  num_classes: Callable[[Any], int]
  in_memory: Callable[[Any, str], Optional[tuple]]
  eval_share: Callable[..., tuple]
  file_backed: bool


def eval_share_bounds(total: int, process_index: int = 0, process_count: int = 1) -> tuple[int, int]:
  """This process's contiguous share ``[start, stop)`` of ``total`` examples (sizes differ by at most one)."""
  return process_index * total // process_count, (process_index + 1) * total // process_count


def _digits_split(data, split: str) -> ArraySplit:
  return digits(split, data.get('image_size', 0) or 8)


def _digits_arrays(data, split: str) -> tuple:
  arrays = _digits_split(data, split)
  return arrays.images, arrays.labels


def _digits_eval(data, split, process_index, process_count, max_examples):
  arrays = _digits_split(data, split)
  total = min(max_examples or arrays.num_examples, arrays.num_examples)
  a, b = eval_share_bounds(total, process_index, process_count)
  return tf.data.Dataset.from_tensor_slices((arrays.images[a:b], arrays.labels[a:b])), a, b, total


def _folder(data, split: str) -> FileSplit:
  return folder_split(data.data_dir, split, data.get('val_fraction', 0.0))


def _folder_files(data, split: str) -> tuple:
  files = _folder(data, split)
  return files.paths, files.labels


def _folder_eval(data, split, process_index, process_count, max_examples):
  files = _folder(data, split)
  total = min(max_examples or files.num_examples, files.num_examples)
  a, b = eval_share_bounds(total, process_index, process_count)
  return folder_dataset(files, a, b).map(lambda ex: (ex['image'], ex['label'])), a, b, total


def _tfds_eval(data, split, process_index, process_count, max_examples):
  if max_examples and ('[' in split or '+' in split):
    raise errors.ConfigError(f'max_examples with the sliced or combined split {split!r}: put the limit into the split '
                     'instead.')
  if max_examples:  # a limit above the split's size is the whole split (TFDS refuses such a slice)
    split = f'{split}[:{min(max_examples, num_examples(data.name, split, data.data_dir))}]'
  ds, a, b, total = tfds_share(data.name, split, data.data_dir, process_index, process_count)
  return ds.map(lambda ex: (ex['image'], ex['label'])), a, b, total


SOURCES = {
    'digits': Source(num_examples=lambda data, split: _digits_split(data, split).num_examples,
                     num_classes=lambda data: 10,
                     in_memory=_digits_arrays,
                     eval_share=_digits_eval, file_backed=False),
    'folder': Source(num_examples=lambda data, split: _folder(data, split).num_examples,
                     num_classes=lambda data: len(_folder(data, data.train_split).classes),
                     in_memory=_folder_files,
                     eval_share=_folder_eval, file_backed=True),
    'tfds': Source(num_examples=lambda data, split: num_examples(data.name, split, data.data_dir),
                   num_classes=lambda data: tfds_builder(data.name, data.data_dir).info.features['label'].num_classes,
                   in_memory=lambda data, split: None, eval_share=_tfds_eval, file_backed=True),
}


def get(data) -> Source:
  """The :class:`Source` for a config's ``data`` section (``data.source``)."""
  if data.source not in SOURCES:
    raise errors.ConfigError(f'Unknown data.source {data.source!r}: use one of {sorted(SOURCES)}.')
  return SOURCES[data.source]
