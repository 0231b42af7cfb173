"""Collapse diagnostics of a matrix of representations or embeddings [N, D]."""

from __future__ import annotations

import numpy as np


def singular_values(x: np.ndarray) -> np.ndarray:
  """Singular values of ``x`` [N, D] (float64), sorted in decreasing order."""
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def rankme(x: np.ndarray, eps: float = 1e-7) -> float:
  """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values of ``x`` [N, D].

  p_k = σ_k / Σσ + eps; RankMe = exp(-Σ p_k log p_k). Between 1 (rank one) and min(N, D) (flat spectrum).
  """
  s = singular_values(x)
  p = s / max(s.sum(), 1e-12) + eps
  return float(np.exp(-np.sum(p * np.log(p))))
