"""Datasets, one module per ``data.source``, each owning its train stream and its evaluation share:

- ``arrays`` (arrays.py): an ``.npz`` of images and labels (``data.path``), held in memory;
- ``digits`` (digits.py): scikit-learn's embedded digits, served by the arrays machinery;
- ``folder`` (folder.py): an image folder (``root/class_name/*.jpg|jpeg|png``), its file list in memory;
- ``tfds`` (tfds.py): any prepared TFDS dataset by name, each process reading its own files.

A new source is a module with a ``SOURCE`` (a :class:`Source`) and its name in :data:`_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from vicreg_jax import errors


class Source:
  """What the pipelines and jobs need from a dataset; every method takes the config's ``data`` section.

  ``file_backed``: images come from encoded files (decoded per view; resized and centre-cropped to evaluate).
  """
  file_backed: bool = False

  def num_examples(self, data, split: str) -> int:
    """Examples in ``split``, all processes together."""
    raise NotImplementedError

  def num_classes(self, data) -> int:
    raise NotImplementedError

  def in_memory(self, data, split: str) -> Optional[tuple]:
    """``(items, labels)`` for sources held in memory, one global stream over all processes (arrays: float
    images [N, H, W, C] in [0, 1]; folder: file paths), else None (TFDS: each process reads its own files)."""
    return None

  def examples(self, data, split: str, indices: Optional[np.ndarray] = None) -> tuple:
    """:meth:`in_memory`'s ``(items, labels)``, restricted to ``indices`` when given."""
    items, labels = self.in_memory(data, split)
    return (items, labels) if indices is None else (items[indices], labels[indices])

  def train_stream(self, data, split: str, seed: int, start_step: int, local_b: int, process_index: int,
                   process_count: int, fn: Callable, indices: Optional[np.ndarray] = None,
                   encoded: bool = False) -> tf.data.Dataset:
    """This process's infinite batches (``local_b`` rows each) of ``fn(example seed, image, label)`` (a dict)
    over the shuffled examples of ``split``, from ``start_step`` on; the image is float [H, W, C] in [0, 1], or
    its encoded bytes when ``encoded`` and the source is file-backed; the example seed ([2] int64) seeds its
    augmentations. ``indices`` restricts an in-memory split to those examples. Batches of file-backed sources
    also hold the :data:`streams.UNREADABLE` and :data:`streams.UNREADABLE_PATH` rows. Determinism: see
    :mod:`vicreg_jax.data.pipeline`."""
    raise NotImplementedError

  def eval_batches(self, data, split: str, local_b: int, prepare: Optional[Callable], image_shape: tuple,
                   process_index: int, process_count: int, max_examples: int) -> tf.data.Dataset:
    """One pass over this process's contiguous share (:func:`streams.share_bounds`) of the first
    ``max_examples`` (0: all) examples of ``split``: batches ``{'image', 'label', 'index', 'mask'}`` of
    ``local_b`` rows, ``index`` the example's position in the split, padded (mask 0, index -1) so every process
    yields the same number of full batches. ``prepare`` (None: nothing to do) maps an image as read (encoded
    bytes or uint8 where ``file_backed``, else float in [0, 1]) to the evaluated one, of shape ``image_shape``
    where ``file_backed``."""
    raise NotImplementedError


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices of ``per_class`` examples of every class in ``labels``, drawn without replacement by ``seed``."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                         for c in np.unique(labels)])


# The registry: data.source -> the module (in this package) whose SOURCE serves it.
_MODULES = ('arrays', 'digits', 'folder', 'tfds')
SOURCES: dict[str, Source] = {name: importlib.import_module(f'{__name__}.{name}').SOURCE for name in _MODULES}


def get(data) -> Source:
  """The :class:`Source` for a config's ``data`` section (``data.source``)."""
  if data.source not in SOURCES:
    raise errors.ConfigError(f'Unknown data.source {data.source!r}: use one of {sorted(SOURCES)}.')
  return SOURCES[data.source]
