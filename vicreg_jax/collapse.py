"""Collapse measures of a matrix of representations or embeddings [N, D], pure functions used by the train step
(the collapse diagnostics of a batch) and by evaluation (the end-of-run probe, the spectra plots).

NumPy (float64, for final evaluation): :func:`singular_values`, :func:`rankme`, :func:`rankme_from_spectrum`,
:func:`unit_std`. JAX (float32, jit-able, for a global batch during training): :func:`collapse_stats`,
:func:`spectrum`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def singular_values(x: np.ndarray) -> np.ndarray:
  """Singular values of ``x`` [N, D] (float64), sorted in decreasing order."""
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def rankme_from_spectrum(s: np.ndarray, eps: float = 1e-7) -> float:
  """RankMe of the singular values ``s``: p_k = σ_k / Σσ + eps; exp(-Σ p_k log p_k)."""
  s = np.asarray(s, np.float64)
  p = s / max(s.sum(), 1e-12) + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def rankme(x: np.ndarray, eps: float = 1e-7) -> float:
  """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values of ``x`` [N, D].

  p_k = σ_k / Σσ + eps; RankMe = exp(-Σ p_k log p_k). Between 1 (rank one) and min(N, D) (flat spectrum).
  """
  return rankme_from_spectrum(singular_values(x), eps)


def unit_std(z: np.ndarray) -> float:
  """Complete-collapse score of embeddings ``z`` [N, D]: the mean per-dimension std of the rows scaled to unit
  norm, times √D. About 1 for directions spread over the sphere (each coordinate's std is then ≈ 1/√D),
  0 when every input maps to the same direction; unlike the raw std it does not depend on the embeddings'
  scale (BYOL, SimSiam and SwAV do not fix it)."""
  z = np.asarray(z, np.float64)
  unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.std(unit, axis=0)) * np.sqrt(z.shape[1]))


def spectrum(x: jax.Array) -> jax.Array:
  """Singular values of ``x`` [N, D] in float32, sorted in decreasing order (min(N, D) of them; jit-able).

  ``jnp.linalg.svd(compute_uv=False)`` rather than the eigenvalues of the smaller Gram matrix: the Gram
  matrix squares the condition number, so in float32 every singular value below ~5e-4·σ_1 reads as ~5e-4·σ_1
  (a rank-one x gets RankMe 1.3 instead of 1.0), while the SVD is accurate to ~1e-7·σ_1, which is what a
  collapse diagnostic needs. Its cost (one min(N, D)-sized SVD) is fine for a diagnostic run every few steps.
  """
  s = jnp.linalg.svd(jnp.asarray(x, jnp.float32), compute_uv=False)
  return jnp.sort(jnp.clip(s, 0.0))[::-1]


def collapse_stats(x: jax.Array, eps: float = 1e-7, block: int = 1024, s: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
  """Collapse statistics of ``x`` [N, D] (float32 scalars; jit-able).

  std_mean, std_min: mean and minimum over dimensions of the per-dimension std over the batch (ddof=0).
  corr_offdiag: mean |C_ij| over i != j of the D×D correlation matrix C, with std + 1e-6 as the normaliser
    (a constant dimension correlates 0 with everything, no NaN); 0 is decorrelated, 1 is one direction.
    C is computed ``block`` rows at a time, so no D×D matrix is held in memory.
  rankme: RankMe of ``spectrum(x)``, the same definition as ``rankme`` (p_k = σ_k / Σσ + eps); pass ``s`` if
    that spectrum is already computed.
  """
  import jax
  x = jnp.asarray(x, jnp.float32)
  n, d = x.shape
  xc = x - x.mean(0)
  std = jnp.sqrt(jnp.mean(xc * xc, 0))
  z = xc / ((std + 1e-6) * np.sqrt(n))  # C = zᵀ z
  b = min(block, d)
  nb = -(-d // b)
  rows = jnp.pad(z, ((0, 0), (0, nb * b - d))).T.reshape(nb, b, n)  # zero padding adds zeros to C
  abs_sum = jax.lax.map(lambda r: jnp.abs(jnp.matmul(r, z, precision='highest')).sum(), rows).sum()
  diag = jnp.sum(z * z)  # Σ_i C_ii, all non-negative
  s = spectrum(x) if s is None else s
  p = s / jnp.maximum(s.sum(), 1e-12) + eps
  return {
      'std_mean': std.mean(),
      'std_min': std.min(),
      'corr_offdiag': (abs_sum - diag) / max(d * (d - 1), 1),
      'rankme': jnp.exp(-jnp.sum(p * jnp.log(p))),
  }
