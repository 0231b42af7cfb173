"""RankMe on inputs of known spectrum."""

import numpy as np

from vicreg_jax.evaluate import diagnostics


def orthonormal(rows, cols, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
  return q


def test_rankme_of_k_equal_singular_values_is_k():
  for k in (1, 3, 10):
    x = orthonormal(200, k, 0) @ (5.0 * orthonormal(50, k, 1).T)  # singular values: k fives, then zeros
    assert abs(diagnostics.rankme(x) - k) < 0.01 * k
    s = diagnostics.singular_values(x)
    assert np.sum(s > 1e-6) == k


def test_rankme_of_a_skewed_spectrum_is_between_one_and_rank():
  s = np.array([10.0, 1.0, 0.1])
  x = orthonormal(100, 3, 2) @ np.diag(s) @ orthonormal(20, 3, 3).T
  p = s / s.sum()
  expected = np.exp(-np.sum(p * np.log(p)))  # the definition, on the known spectrum
  assert abs(diagnostics.rankme(x) - expected) < 1e-3
  assert 1.0 < expected < 2.0
