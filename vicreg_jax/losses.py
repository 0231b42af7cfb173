"""Self-supervised losses as pure functions of per-replica embeddings.

Every loss takes this replica's embeddings and an optional ``axis_name``. Without it the loss is computed on the
arrays given. With it, the function must run inside ``jax.shard_map`` or ``jax.pmap`` over that axis, every
example of every replica enters the batch statistics, and every replica returns the loss of the concatenated
global batch.

Gradient convention under an axis (the data-parallel one, as PyTorch DDP with an all-gather): each replica's
gradient is that of the sum of all replicas' (identical) losses, so averaging gradients over the axis
(``lax.pmean``), which the trainer does anyway, gives exactly the single-device gradient of the global loss.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def gather_batch(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Concatenates ``x`` over the replicas of ``axis_name`` along axis 0 (identity without an axis).

  The backward pass is the reduce-scatter of the cotangents, so gradients reach every replica's own rows.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def off_diagonal_sq_sum(zc: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """Sum of squared off-diagonal entries of the covariance ``zcᵀ zc / (N - 1)`` of centred ``zc`` [N, D].

  With ``axis_name`` (and D divisible by the axis size) each replica computes only its block of D / replicas
  columns of the D×D matrix and the partial sums are added with ``psum``: the 2·N·D² flops are shared out
  instead of repeated on every replica. ``zc`` must already be the gathered global batch.
  """
  n, d = zc.shape
  n_rep = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  if n_rep == 1 or d % n_rep:
    cov = zc.T @ zc / (n - 1)
    return jnp.sum(cov**2) - jnp.sum(jnp.diagonal(cov)**2)
  width = d // n_rep
  start = jax.lax.axis_index(axis_name) * width
  block = jax.lax.dynamic_slice_in_dim(zc, start, width, axis=1)  # [N, width]
  cov = zc.T @ block / (n - 1)  # rows: all dims, cols: this replica's dims
  diag = jnp.sum(block * block, axis=0) / (n - 1)  # cov[start + j, j]
  partial = jnp.sum(cov**2) - jnp.sum(diag**2)
  return jax.lax.psum(partial, axis_name)


def vicreg_loss(z_a: jax.Array,
                z_b: jax.Array,
                *,
                sim_coeff: float = 25.0,
                std_coeff: float = 25.0,
                cov_coeff: float = 1.0,
                eps: float = 1e-4,
                axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """VICReg loss (Bardes, Ponce & LeCun, 2022) with the semantics of the official implementation.

  Args:
    z_a, z_b: [n, D] embeddings of the two views on this replica (cast to float32).
    sim_coeff, std_coeff, cov_coeff: weights λ, μ, ν of the invariance, variance and covariance terms.
    eps: added to the variance before the square root.
    axis_name: replicas to gather the batch over (see the module docstring).

  Returns:
    ``(loss, metrics)``: ``loss = sim_coeff·inv + std_coeff·var + cov_coeff·cov`` over the global batch of N
    examples, where
      inv = mean((z_a - z_b)²) over all N·D entries;
      var = [mean_d relu(1 - sqrt(Var_d(z_a) + eps)) + mean_d relu(1 - sqrt(Var_d(z_b) + eps))] / 2,
            Var unbiased (divisor N - 1);
      cov = Σ_{i≠j} C(z_a)_ij² / D + Σ_{i≠j} C(z_b)_ij² / D, C(z) = (z - mean z)ᵀ(z - mean z) / (N - 1);
    ``metrics`` holds the unweighted ``invariance``, ``variance``, ``covariance`` and the weighted ``loss``.
  """
  z_a = gather_batch(z_a.astype(jnp.float32), axis_name)
  z_b = gather_batch(z_b.astype(jnp.float32), axis_name)
  n, d = z_a.shape
  if n < 2:
    raise ValueError(f'vicreg_loss needs a global batch of at least 2 examples, got {n}.')

  invariance = jnp.mean((z_a - z_b)**2)

  za_c = z_a - jnp.mean(z_a, axis=0)
  zb_c = z_b - jnp.mean(z_b, axis=0)
  std_a = jnp.sqrt(jnp.sum(za_c**2, axis=0) / (n - 1) + eps)
  std_b = jnp.sqrt(jnp.sum(zb_c**2, axis=0) / (n - 1) + eps)
  variance = (jnp.mean(jax.nn.relu(1.0 - std_a)) + jnp.mean(jax.nn.relu(1.0 - std_b))) / 2

  covariance = (off_diagonal_sq_sum(za_c, axis_name) + off_diagonal_sq_sum(zb_c, axis_name)) / d

  loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
  metrics = {'loss': loss, 'invariance': invariance, 'variance': variance, 'covariance': covariance}
  return loss, metrics


def _column_block(x: jax.Array, axis_name: Optional[str]) -> tuple[jax.Array, int]:
  """This replica's block of columns of ``x`` [N, D] (all of them without an axis or when D is not divisible by
  the axis size) and the number of blocks."""
  n_rep = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  d = x.shape[1]
  if n_rep == 1 or d % n_rep:
    return x, 1
  width = d // n_rep
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * width, width, axis=1), n_rep


def barlow_twins_loss(z_a: jax.Array,
                      z_b: jax.Array,
                      *,
                      lambd: float = 0.0051,
                      eps: float = 1e-5,
                      axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """Barlow Twins loss (Zbontar et al., 2021) with the semantics of the official implementation.

  Args:
    z_a, z_b: [n, D] embeddings of the two views on this replica (cast to float32).
    lambd: weight λ of the off-diagonal (redundancy reduction) term.
    eps: added to the variance before the square root (BatchNorm1d's 1e-5).
    axis_name: replicas to gather the batch over (see the module docstring).

  Returns:
    ``(loss, metrics)``: ``loss = Σ_i (1 - C_ii)² + λ·Σ_{i≠j} C_ij²`` over the global batch of N examples, where
    ``C = ẑ_aᵀ ẑ_b / N`` and ẑ is z standardised per dimension over the batch with the biased variance,
    ``(z - mean z) / sqrt(Var z + eps)`` (the official code's ``BatchNorm1d(affine=False)`` in training mode,
    synchronised over GPUs, then ``c / batch_size`` summed over GPUs); ``metrics`` holds ``on_diagonal`` (the
    first sum), ``off_diagonal`` (the second, unweighted) and ``loss``.

  With ``axis_name`` (and D divisible by the axis size) each replica computes only its block of D / replicas
  columns of C and the partial sums are added with ``psum``, as for VICReg's covariance.
  """
  z_a = gather_batch(z_a.astype(jnp.float32), axis_name)
  z_b = gather_batch(z_b.astype(jnp.float32), axis_name)
  n = z_a.shape[0]
  if n < 2:
    raise ValueError(f'barlow_twins_loss needs a global batch of at least 2 examples, got {n}.')

  def standardise(z):
    zc = z - jnp.mean(z, axis=0)
    return zc / jnp.sqrt(jnp.mean(zc**2, axis=0) + eps)

  a, b = standardise(z_a), standardise(z_b)
  a_block, n_blocks = _column_block(a, axis_name)
  b_block, _ = _column_block(b, axis_name)
  c = a.T @ b_block / n                        # [D, width]: this replica's columns of C
  diag = jnp.sum(a_block * b_block, axis=0) / n  # their entries on C's diagonal
  on_diag = jnp.sum((diag - 1.0)**2)
  off_diag = jnp.sum(c**2) - jnp.sum(diag**2)
  if n_blocks > 1:
    on_diag, off_diag = jax.lax.psum((on_diag, off_diag), axis_name)
  loss = on_diag + lambd * off_diag
  return loss, {'loss': loss, 'on_diagonal': on_diag, 'off_diagonal': off_diag}


def embedding_std(z: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """Mean over dimensions of the per-dimension std of the embeddings ``z`` [n, D] across the global batch.

  VICReg's variance hinge holds it near 1; a collapsing run drives it towards 0.
  """
  z = gather_batch(z.astype(jnp.float32), axis_name)
  return jnp.mean(jnp.std(z, axis=0))
