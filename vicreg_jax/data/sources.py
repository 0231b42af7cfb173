"""Datasets: scikit-learn's embedded digits, and any TFDS dataset by name."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


class DataNotFoundError(RuntimeError):
  """A dataset the config names is not available; the message says how to provide it."""


@dataclasses.dataclass
class ArraySplit:
  """An in-memory split: float32 images [N, H, W, C] in [0, 1] and int labels [N]."""
  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.labels)


def digits(split: str) -> ArraySplit:
  """scikit-learn's 1,797 8×8 handwritten digits, 70/30 stratified split (``random_state=0``).

  ``split`` is 'train' (1,257 images) or 'test' (540). Pixels 0–16 are scaled to [0, 1], shape [N, 8, 8, 1].
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
  if split == 'train':
    return ArraySplit(x_tr, y_tr)
  if split == 'test':
    return ArraySplit(x_te, y_te)
  raise ValueError(f"digits has splits 'train' and 'test', not {split!r}.")


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


def tfds_split(name: str, split: str, *, data_dir: Optional[str] = None, process_index: int = 0,
               process_count: int = 1, shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
  """This process's even share of a TFDS split, as a dataset of ``{'image': uint8 [H,W,C], 'label'}``."""
  builder = tfds_builder(name, data_dir)
  if process_count > 1:
    split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16)
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def num_examples(name: str, split: str, data_dir: Optional[str] = None) -> int:
  """Number of examples in a TFDS split (the whole split, all processes together)."""
  return tfds_builder(name, data_dir).info.splits[split].num_examples
