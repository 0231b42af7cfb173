"""Linear probes on frozen features for small datasets (scikit-learn), and feature extraction."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.preprocessing import StandardScaler

from vicreg_jax import parallel
from vicreg_jax.data import sources

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


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


def _fit(h: np.ndarray, y: np.ndarray, folds: int, seed: int):
  """Multinomial logistic regression on (h, y), C chosen by stratified k-fold CV on (h, y) alone."""
  search = GridSearchCV(LogisticRegression(max_iter=1000), {'C': C_GRID},
                        cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    search.fit(h, y)
  return search


def standardize(h_tr: np.ndarray, h_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Scales every feature by the mean and std of the (unlabelled) training features."""
  scaler = StandardScaler().fit(h_tr)
  return scaler.transform(h_tr), scaler.transform(h_te)


def linear_probe(h_tr, y_tr, h_te, y_te, seed: int = 0) -> float:
  """Test top-1 of a linear classifier on standardised features, trained on all training labels (C by
  5-fold CV on train)."""
  h_tr, h_te = standardize(h_tr, h_te)
  return float(_fit(h_tr, y_tr, 5, seed).score(h_te, y_te))


def few_label_probe(h_tr, y_tr, h_te, y_te, per_class: int, draws: int, seed: int = 0) -> float:
  """Mean test top-1 over ``draws`` seeded draws of ``per_class`` labelled training examples per class.

  Features are standardised with all (unlabelled) training features; C is chosen by stratified CV within each
  labelled subset, so no other label is used.
  """
  h_tr, h_te = standardize(h_tr, h_te)
  accs = []
  for d in range(draws):
    idx = sources.per_class_subset(y_tr, per_class, seed + d)
    accs.append(_fit(h_tr[idx], y_tr[idx], min(per_class, 5), seed + d).score(h_te, y_te))
  return float(np.mean(accs))
