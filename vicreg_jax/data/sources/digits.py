"""scikit-learn's embedded handwritten digits, served as in-memory arrays (:class:`arrays.Arrays`)."""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from vicreg_jax import errors
from vicreg_jax.data.sources import arrays


@functools.lru_cache(maxsize=8)
def load(split: str, size: int = 8) -> arrays.ArraySplit:
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
  return arrays.ArraySplit(x, y)


def _load(data, split: str) -> arrays.ArraySplit:
  return load(split, data.image_size or 8)  # image_size 0: the native 8×8


SOURCE = arrays.Arrays(_load, classes=lambda data: 10)
