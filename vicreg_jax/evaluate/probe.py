"""Linear probes on frozen features for small datasets (scikit-learn), and feature extraction."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vicreg_jax import parallel
from vicreg_jax.data import sources

# Fixed, scikit-learn's default: on the digits benchmark, choosing C from (0.001 … 100) by 5-fold CV on the
# training split picked 0.1, 1 or 10 from run to run and added about ±0.004 of noise to the test top-1.
C = 1.0


def extract(apply_fn, variables, batches) -> tuple[Any, np.ndarray]:
  """Runs ``apply_fn(variables, images)`` over global ``batches`` of ``{'image', 'label', 'index', 'mask'}``
  (:func:`pipeline.eval_dataset` per process, through :func:`pipeline.global_batches`); returns numpy
  ``(outputs, labels)`` of every real example (mask 1) in the order of ``index``, on every process.

  Each process feeds only its own share of the images; the outputs (features, not images) of every batch are
  gathered to every process once.
  """
  outs, labels, index = [], [], []
  for batch in batches:
    out, y, i, m = parallel.gather((apply_fn(variables, batch['image']), batch['label'], batch['index'],
                                    batch['mask']))
    keep = m > 0
    outs.append(jax.tree.map(lambda o, keep=keep: o[keep], out))
    labels.append(y[keep])
    index.append(i[keep])
  order = np.argsort(np.concatenate(index), kind='stable')
  return jax.tree.map(lambda *o: np.concatenate(o)[order], *outs), np.concatenate(labels)[order]


def _fit(h: np.ndarray, y: np.ndarray, c: float):
  """Multinomial logistic regression on (h, y) with inverse L2 strength ``c``."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    return LogisticRegression(C=c, max_iter=1000).fit(h, y)


def standardize(h_tr: np.ndarray, h_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Scales every feature by the mean and std of the (unlabelled) training features."""
  scaler = StandardScaler().fit(h_tr)
  return scaler.transform(h_tr), scaler.transform(h_te)


def linear_probe(h_tr, y_tr, h_te, y_te, c: float = C) -> float:
  """Test top-1 of a logistic-regression classifier (``C = c``) on standardised features, trained on all
  training labels."""
  h_tr, h_te = standardize(h_tr, h_te)
  return float(_fit(h_tr, y_tr, c).score(h_te, y_te))


def few_label_probe(h_tr, y_tr, h_te, y_te, per_class: int, draws: int, seed: int = 0, c: float = C) -> float:
  """Mean test top-1 over ``draws`` seeded draws of ``per_class`` labelled training examples per class.

  Features are standardised with all (unlabelled) training features; the classifier (``C = c``) sees only the
  labelled subset.
  """
  h_tr, h_te = standardize(h_tr, h_te)
  accs = []
  for d in range(draws):
    idx = sources.per_class_subset(y_tr, per_class, seed + d)
    accs.append(_fit(h_tr[idx], y_tr[idx], c).score(h_te, y_te))
  return float(np.mean(accs))
