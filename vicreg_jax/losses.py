"""Self-supervised losses as pure functions of per-replica embeddings.

Every loss takes this replica's embeddings and an optional ``axis_name``. Without it the loss is computed on the
arrays given. With it, the function must run inside ``jax.shard_map`` or ``jax.pmap`` over that axis, every
example of every replica enters the batch statistics, and every replica returns the loss of the concatenated
global batch.

Gradient convention under an axis (the data-parallel one, as PyTorch DDP with an all-gather): each replica's
gradient is that of the sum of all replicas' (identical) losses, so averaging gradients over the axis
(``lax.pmean``), which the trainer does anyway, gives exactly the single-device gradient of the global loss.

Every sum over replicas (the all-gather's backward pass, the covariance blocks' ``psum``) goes through
:mod:`vicreg_jax.collectives`, so its modes (a fixed order of addition) cover the losses too.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Optional

import jax
import jax.numpy as jnp

from vicreg_jax import collectives, errors

Metrics = dict[str, jax.Array]


GATHER_DTYPES = ('float32', 'bfloat16')


def _check_gather_dtype(name: str, gather_dtype: str) -> None:
  if gather_dtype not in GATHER_DTYPES:
    raise errors.ConfigError(f"{name}: gather_dtype must be one of {GATHER_DTYPES}, got {gather_dtype!r}.")


def gather_batch(x: jax.Array, axis_name: Optional[str], dtype=None) -> jax.Array:
  """Concatenates ``x`` over the replicas of ``axis_name`` along axis 0 (identity without an axis).

  The backward pass is the reduce-scatter of the cotangents, so gradients reach every replica's own rows.

  ``dtype`` (e.g. ``'bfloat16'``; None: ``x``'s own): with an axis, ``x`` is cast to it for the all-gather only
  and the result cast back to ``x``'s dtype, so every gathered row, this replica's included, is rounded to
  ``dtype`` (half the bytes on the wire for bfloat16). The gradient flows through both casts: the backward
  reduce-scatter of the cotangents runs in ``dtype`` as well. Without an axis nothing is gathered or cast.
  """
  if axis_name is None:
    return x
  if dtype is None or jnp.dtype(dtype) == x.dtype:
    return collectives.all_gather(x, axis_name)
  return collectives.all_gather(x.astype(dtype), axis_name).astype(x.dtype)


def _column_block(x: jax.Array, axis_name: Optional[str]) -> tuple[jax.Array, jax.Array, int]:
  """This replica's block of columns of ``x`` [N, D], the indices in ``x`` of the block's columns, and the number
  of blocks (replicas).

  Without an axis (or with one replica) the block is all of ``x``, its indices ``0 … D - 1``. Otherwise the
  columns are split into one block of ``w = ⌈D / replicas⌉`` per replica, replica r taking columns
  ``r·w … r·w + w - 1``; when D is not a multiple of the replicas, ``x`` is first padded on the right with zero
  columns to ``w·replicas``, so the last block(s) end in zero columns, whose indices are ``≥ D`` (a replica's
  block can be padding only when D < replicas). A zero column adds nothing to a sum of products of columns, but
  callers must keep the padding out of any term per column (e.g. ``(1 - C_ii)²``): its index says which it is.
  """
  d = x.shape[1]
  n_rep = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  if n_rep == 1:
    return x, jnp.arange(d), 1
  width = -(-d // n_rep)
  if width * n_rep > d:
    x = jnp.pad(x, ((0, 0), (0, width * n_rep - d)))
  start = jax.lax.axis_index(axis_name) * width
  return jax.lax.dynamic_slice_in_dim(x, start, width, axis=1), start + jnp.arange(width), n_rep


def off_diagonal_sq_sum(zc: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """Sum of squared off-diagonal entries of the covariance ``zcᵀ zc / (N - 1)`` of centred ``zc`` [N, D].

  With ``axis_name`` each replica computes only its block of ⌈D / replicas⌉ columns of the D×D matrix (for any
  D: when D is not a multiple of the replicas the columns are zero-padded to one, see :func:`_column_block`; a
  padded column's entries are 0 and none of them is on the diagonal) and the partial sums are added with
  ``psum``: the 2·N·D² flops are shared out instead of repeated on every replica. ``zc`` must already be the
  gathered global batch.

  The diagonal is masked out rather than subtracted from the sum over all entries, so the result is ≥ 0, exactly
  0 for D = 1, and keeps its precision when the variances dwarf the covariances (|z| ~ 1e6: a subtraction of
  two sums of ~1e24 loses an off-diagonal sum of ~1e11 entirely).
  """
  n, d = zc.shape
  block, columns, n_blocks = _column_block(zc, axis_name)  # [N, width] and the block's column indices
  cov = zc.T @ block / (n - 1)  # rows: all dims, cols: this replica's dims
  on_diagonal = jnp.arange(d)[:, None] == columns[None, :]  # cov[columns[j], j]
  partial = jnp.sum(jnp.where(on_diagonal, 0.0, cov**2))
  return partial if n_blocks == 1 else collectives.psum(partial, axis_name)


def vicreg_loss(z_a: jax.Array,
                z_b: jax.Array,
                *,
                sim_coeff: float = 25.0,
                std_coeff: float = 25.0,
                cov_coeff: float = 1.0,
                eps: float = 1e-4,
                gather_dtype: str = 'float32',
                axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """VICReg loss (Bardes, Ponce & LeCun, 2022) with the semantics of the official implementation.

  Args:
    z_a, z_b: [n, D] embeddings of the two views on this replica (cast to float32).
    sim_coeff, std_coeff, cov_coeff: weights λ, μ, ν of the invariance, variance and covariance terms.
    eps: added to the variance before the square root.
    gather_dtype: the dtype of the embeddings in the all-gather over ``axis_name``: 'float32', or 'bfloat16'
      (half the bytes; every entry of the global batch is rounded to bfloat16, then the statistics are computed
      in float32 as always; the gradients' reduce-scatter is in bfloat16 too). No effect without an axis.
    axis_name: replicas to gather the batch over (see the module docstring).

  Returns:
    ``(loss, metrics)``: ``loss = sim_coeff·inv + std_coeff·var + cov_coeff·cov`` over the global batch of N
    examples, where
      inv = mean((z_a - z_b)²) over all N·D entries;
      var = [mean_d relu(1 - sqrt(Var_d(z_a) + eps)) + mean_d relu(1 - sqrt(Var_d(z_b) + eps))] / 2,
            Var unbiased (divisor N - 1);
      cov = Σ_{i≠j} C(z_a)_ij² / D + Σ_{i≠j} C(z_b)_ij² / D, C(z) = (z - mean z)ᵀ(z - mean z) / (N - 1);
    ``metrics`` holds the unweighted ``invariance``, ``variance``, ``covariance`` and the weighted ``loss``.

  With ``axis_name`` each replica computes only its ⌈D / replicas⌉ columns of the two covariance matrices
  (:func:`off_diagonal_sq_sum`), for any D; the O(N·D) terms are computed whole on every replica.
  """
  _check_gather_dtype('vicreg_loss', gather_dtype)
  z_a = gather_batch(z_a.astype(jnp.float32), axis_name, gather_dtype)
  z_b = gather_batch(z_b.astype(jnp.float32), axis_name, gather_dtype)
  n, d = z_a.shape
  if n < 2:
    raise errors.ConfigError(f'vicreg_loss needs a global batch of at least 2 examples, got {n}.')

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


def barlow_twins_loss(z_a: jax.Array,
                      z_b: jax.Array,
                      *,
                      lambd: float = 0.0051,
                      eps: float = 1e-5,
                      gather_dtype: str = 'float32',
                      axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """Barlow Twins loss (Zbontar et al., 2021) with the semantics of the official implementation.

  Args:
    z_a, z_b: [n, D] embeddings of the two views on this replica (cast to float32).
    lambd: weight λ of the off-diagonal (redundancy reduction) term.
    eps: added to the variance before the square root (BatchNorm1d's 1e-5).
    gather_dtype: the dtype of the embeddings in the all-gather, as for :func:`vicreg_loss`.
    axis_name: replicas to gather the batch over (see the module docstring).

  Returns:
    ``(loss, metrics)``: ``loss = Σ_i (1 - C_ii)² + λ·Σ_{i≠j} C_ij²`` over the global batch of N examples, where
    ``C = ẑ_aᵀ ẑ_b / N`` and ẑ is z standardised per dimension over the batch with the biased variance,
    ``(z - mean z) / sqrt(Var z + eps)`` (the official code's ``BatchNorm1d(affine=False)`` in training mode,
    synchronised over GPUs, then ``c / batch_size`` summed over GPUs); ``metrics`` holds ``on_diagonal`` (the
    first sum), ``off_diagonal`` (the second, unweighted) and ``loss``.

  With ``axis_name`` each replica computes only its block of ⌈D / replicas⌉ columns of C and the partial sums
  are added with ``psum``, as for VICReg's covariance (for any D: the zero columns that pad D to a multiple of the
  replicas add nothing to the off-diagonal sum and are left out of the on-diagonal one).
  """
  _check_gather_dtype('barlow_twins_loss', gather_dtype)
  z_a = gather_batch(z_a.astype(jnp.float32), axis_name, gather_dtype)
  z_b = gather_batch(z_b.astype(jnp.float32), axis_name, gather_dtype)
  n, d = z_a.shape
  if n < 2:
    raise errors.ConfigError(f'barlow_twins_loss needs a global batch of at least 2 examples, got {n}.')

  def standardise(z):
    zc = z - jnp.mean(z, axis=0)
    return zc / jnp.sqrt(jnp.mean(zc**2, axis=0) + eps)

  a, b = standardise(z_a), standardise(z_b)
  a_block, columns, n_blocks = _column_block(a, axis_name)
  b_block, _, _ = _column_block(b, axis_name)
  c = a.T @ b_block / n                        # [D, width]: this replica's columns of C (padding: zero columns)
  diag = jnp.sum(a_block * b_block, axis=0) / n  # their entries on C's diagonal (padding: 0)
  on_diag = jnp.sum(jnp.where(columns < d, (diag - 1.0)**2, 0.0))  # a padded column is no dimension
  off_diag = jnp.sum(c**2) - jnp.sum(diag**2)
  if n_blocks > 1:
    on_diag, off_diag = collectives.psum((on_diag, off_diag), axis_name)
  loss = on_diag + lambd * off_diag
  return loss, {'loss': loss, 'on_diagonal': on_diag, 'off_diagonal': off_diag}


def variance_covariance(z_a: jax.Array, z_b: jax.Array, axis_name: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
  """VICReg's unweighted variance and covariance terms of two views' embeddings (see :func:`vicreg_loss`), for
  the regularised BYOL and SimSiam of the VICReg paper's Table 4. ``z_a``, ``z_b`` are this replica's rows."""
  z_a = gather_batch(z_a.astype(jnp.float32), axis_name)
  z_b = gather_batch(z_b.astype(jnp.float32), axis_name)
  n, d = z_a.shape
  za_c, zb_c = z_a - jnp.mean(z_a, axis=0), z_b - jnp.mean(z_b, axis=0)
  hinge = lambda zc: jnp.mean(jax.nn.relu(1.0 - jnp.sqrt(jnp.sum(zc**2, axis=0) / (n - 1) + 1e-4)))
  variance = (hinge(za_c) + hinge(zb_c)) / 2
  covariance = (off_diagonal_sq_sum(za_c, axis_name) + off_diagonal_sq_sum(zb_c, axis_name)) / d
  return variance, covariance


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(‖x‖, eps)`` along the last axis (PyTorch's ``F.normalize``), as ``x / sqrt(max(‖x‖², eps²))``.

  The same value, but a zero row gets the finite gradient ``1 / eps`` of the clamped branch (as in PyTorch),
  where differentiating ``jnp.linalg.norm`` at 0 gives 0 · inf = NaN.
  """
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine similarity, each row scaled by ``1 / max(‖row‖, 1e-12)`` (PyTorch's F.normalize)."""
  return jnp.sum(_l2_normalize(a) * _l2_normalize(b), axis=-1)


def _check_batch(name: str, n: int, minimum: int = 2):
  if n < minimum:
    raise errors.ConfigError(f'{name} needs a global batch of at least {minimum} examples, got {n}.')


def simclr_loss(z_a: jax.Array, z_b: jax.Array, *, temperature: float = 0.1,
                axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """SimCLR's NT-Xent loss (Chen et al., 2020) with the semantics of the official TF code.

  The embeddings are L2-normalised. For each of the N examples of the global batch, view a's row is scored
  against every row of view b and every other row of view a (``cos / temperature``; its own row of a excluded),
  with cross-entropy towards its positive (the same example in b), and symmetrically for view b:
  ``loss = mean_i CE_a(i) + mean_i CE_b(i)`` (the official sum of the two directions' means). Negatives come
  from every replica's rows. ``metrics``: ``loss`` and ``top1`` (share of anchors whose positive scores highest).
  """
  a = gather_batch(z_a.astype(jnp.float32), axis_name)
  b = gather_batch(z_b.astype(jnp.float32), axis_name)
  n = a.shape[0]
  _check_batch('simclr_loss', n)
  a, b = _l2_normalize(a), _l2_normalize(b)
  self_mask = jnp.eye(n, dtype=bool)

  def direction(x, y):  # anchors x against [y, x without itself]; positive at column i of the first block
    logits = jnp.concatenate([x @ y.T, jnp.where(self_mask, -jnp.inf, x @ x.T)], axis=1) / temperature
    ce = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
    return jnp.mean(ce), jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(n))

  (ce_a, top1_a), (ce_b, top1_b) = direction(a, b), direction(b, a)
  loss = ce_a + ce_b
  return loss, {'loss': loss, 'top1': (top1_a + top1_b) / 2}


def moco_v3_loss(q_a: jax.Array, q_b: jax.Array, k_a: jax.Array, k_b: jax.Array, *, temperature: float = 1.0,
                 axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """MoCo v3's symmetric InfoNCE (Chen, Xie & He, 2021), with the semantics of the official code
  (facebookresearch/moco-v3@c349e6e:moco/builder.py:L63-L73, L96).

  The queries ``q`` (the online predictions) and the keys ``k`` (the momentum encoder's embeddings, no gradient)
  are L2-normalised; each query of view a is scored against every key of view b in the global batch
  (``cos / temperature``), its positive the same example's key, and the cross-entropy is averaged over the global
  batch and scaled by ``2·temperature``; the same for the queries of view b against the keys of view a, summed:
  ``loss = 2τ·(mean_i CE(q_a,i; k_b) + mean_i CE(q_b,i; k_a))``. The official code scores each GPU's queries
  against the gathered keys with labels ``arange(n) + n·rank`` and lets DDP average the GPUs' means: the same
  global mean. ``metrics``: ``loss`` and ``top1`` (share of queries whose own key scores highest, both views).
  """
  q_a, q_b = (_l2_normalize(gather_batch(x.astype(jnp.float32), axis_name)) for x in (q_a, q_b))
  k_a, k_b = (jax.lax.stop_gradient(_l2_normalize(gather_batch(x.astype(jnp.float32), axis_name)))
              for x in (k_a, k_b))
  n = q_a.shape[0]
  _check_batch('moco_v3_loss', n)

  def direction(q, k):
    logits = q @ k.T / temperature
    ce = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
    return jnp.mean(ce), jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(n))

  (ce_a, top1_a), (ce_b, top1_b) = direction(q_a, k_b), direction(q_b, k_a)
  loss = 2 * temperature * (ce_a + ce_b)
  return loss, {'loss': loss, 'top1': (top1_a + top1_b) / 2}


def moco_v2_loss(q: jax.Array, k: jax.Array, queue: jax.Array, *, temperature: float = 0.2,
                 axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """MoCo's InfoNCE against a queue (He et al., 2020; Chen et al., 2020, v2), with the semantics of the official
  code (facebookresearch/moco@132aea9:moco/builder.py:L147-L178; main_moco.py:L291).

  The queries ``q`` (the online embeddings of view 1) and the keys ``k`` (the momentum encoder's of view 2, no
  gradient) are L2-normalised; each query's logits are its positive ``q·k`` (the same example's key) and its
  negatives ``q·queue`` (``queue`` [K, dim]: unit keys of earlier batches, no gradient), over ``temperature``;
  the loss is the cross-entropy towards the positive, averaged over the global batch (the official criterion
  averages each GPU's batch and DDP averages the GPUs: the same mean). Asymmetric: one direction, as the
  official. ``metrics``: ``loss`` and ``top1`` (share of queries whose positive scores above every negative).
  """
  q = _l2_normalize(gather_batch(q.astype(jnp.float32), axis_name))
  k = jax.lax.stop_gradient(_l2_normalize(gather_batch(k.astype(jnp.float32), axis_name)))
  queue = jax.lax.stop_gradient(queue.astype(jnp.float32))
  logits = jnp.concatenate([jnp.sum(q * k, axis=1, keepdims=True), q @ queue.T], axis=1) / temperature
  ce = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  loss = jnp.mean(ce)
  return loss, {'loss': loss, 'top1': jnp.mean(jnp.argmax(logits, axis=1) == 0)}


def _check_whitening(result: jax.Array, inputs: tuple, eps: float, name: str) -> None:
  """Raises a ValueError that says why and what to do when ``result`` (of whitening ``inputs`` with shrinkage
  ``eps``) is concrete and not finite; does nothing on traced values (under jit, vmap or grad)."""
  if isinstance(result, jax.core.Tracer) or bool(jnp.all(jnp.isfinite(result))):
    return
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in inputs):
    raise ValueError(f'{name}: the embeddings are not finite.')
  if eps > 0:
    raise ValueError(f'{name}: the shrunk covariance (1 - eps)·C + eps·I of a whitening sub-batch is not positive '
                     f'definite in float32 with eps = {eps}: C is (nearly) singular and so large that eps is lost '
                     f'in rounding. Raise wmse.eps or keep the embeddings smaller.')
  raise ValueError(f'{name}: the covariance C of a whitening sub-batch is singular (e.g. all its rows are equal, or '
                   f'they span fewer dimensions than the embedding has), so its Cholesky factor is undefined with '
                   f'eps = 0. Set wmse.eps > 0: the shrunk (1 - eps)·C + eps·I is positive definite.')


def whiten(x: jax.Array, eps: float = 0.0) -> jax.Array:
  """W-MSE's whitening of a sub-batch ``x`` [w, D]: ``(x - mean) · L⁻ᵀ`` where ``L Lᵀ = (1 - eps)·C + eps·I`` is
  the Cholesky factor of the unbiased covariance C (divisor w - 1); the output's covariance is the identity.

  Needs w > D and, with eps = 0, a full-rank C: for a singular one (identical rows, rows in a subspace) the
  Cholesky factor is undefined and the output is NaN, which on concrete values raises a ValueError (traced, the
  NaN stays: the caller's non-finite guard sees it). With eps > 0 the shrunk covariance is positive definite
  (identical rows whiten to zeros) as long as float32 can resolve eps against the covariance's scale."""
  w, d = x.shape
  xc = x - jnp.mean(x, axis=0)
  cov = xc.T @ xc / (w - 1)
  cov = (1 - eps) * cov + eps * jnp.eye(d, dtype=x.dtype)
  chol = jnp.linalg.cholesky(cov)
  inv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(d, dtype=x.dtype), lower=True)  # L⁻¹
  out = xc @ inv.T
  _check_whitening(out, (x,), eps, 'whiten')
  return out


def wmse_loss(z_a: jax.Array, z_b: jax.Array, *, key: jax.Array, w_size: int = 128, w_iter: int = 1,
              eps: float = 0.0, axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """W-MSE (Ermolov et al., 2021) for two views, with the semantics of the authors' code (htdt/self-supervised).

  ``w_iter`` times: a random permutation (from ``key``, the same on every replica) splits the global batch of N
  into N / w_size sub-batches; each view's rows of each sub-batch are whitened on their own (:func:`whiten`);
  the loss is the normalised MSE ``2 - 2·mean_i cos(ŵ_a,i, ŵ_b,i)`` over all rows. The result is the mean over
  the ``w_iter`` repetitions. N must be a multiple of ``w_size`` and the embedding dimension below it.
  ``metrics``: ``loss`` and ``cosine`` (the mean cosine of the whitened pairs).

  Degenerate sub-batches: with ``eps = 0`` the whitening of a sub-batch whose covariance is singular (all rows
  equal, e.g. all zeros; rows spanning fewer than D dimensions) is undefined. Called on concrete arrays the loss
  then raises a ValueError that says so and to set ``wmse.eps > 0``; traced (under jit or grad, as in the train
  step) it cannot raise, and the loss is NaN for the step's non-finite guard to catch. With ``eps > 0`` a sub-batch
  of identical rows whitens to zero rows, whose cosine is 0 (loss 2) with finite gradients, and a full-rank one is
  fine at any scale; but float32 must resolve eps against C: a rank-deficient, non-constant sub-batch whose
  variances exceed ~eps·2²⁴ (|z| ≳ 1e3 at eps = 0.1) fails the Cholesky all the same, with the same ValueError
  (concrete) or NaN (traced). A near-singular covariance with ``eps = 0`` can give a finite loss with huge or
  non-finite gradients: ``eps > 0`` is the remedy there too.
  """
  a = gather_batch(jnp.asarray(z_a, jnp.float32), axis_name)
  b = gather_batch(jnp.asarray(z_b, jnp.float32), axis_name)
  n, d = a.shape
  if n % w_size or d >= w_size:
    raise errors.ConfigError(f'wmse_loss needs the global batch ({n}) to be a multiple of w_size ({w_size}) and '
                             f'the embedding dimension ({d}) below w_size.')
  cosines = []
  for it in range(w_iter):
    groups = jax.random.permutation(jax.random.fold_in(key, it), n).reshape(-1, w_size)
    wa = jax.vmap(lambda idx: whiten(a[idx], eps))(groups)
    wb = jax.vmap(lambda idx: whiten(b[idx], eps))(groups)
    cosines.append(jnp.mean(_cosine(wa, wb)))
  cosine = jnp.mean(jnp.stack(cosines))
  loss = 2 - 2 * cosine
  _check_whitening(loss, (a, b), eps, 'wmse_loss')
  return loss, {'loss': loss, 'cosine': cosine}


def byol_loss(p_a: jax.Array, p_b: jax.Array, t_a: jax.Array, t_b: jax.Array, *,
              axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """BYOL's symmetrised regression loss (Grill et al., 2020; deepmind-research/byol): the online predictions
  ``p`` of each view regress the target projections ``t`` of the other view (stop-gradient),
  ``loss = mean_i (2 - 2 cos(p_a,i, t_b,i)) + mean_i (2 - 2 cos(p_b,i, t_a,i))`` over the global batch.
  ``metrics``: ``loss`` and ``cosine`` (mean of the two mean cosines)."""
  p_a, p_b = (gather_batch(x.astype(jnp.float32), axis_name) for x in (p_a, p_b))
  t_a, t_b = (jax.lax.stop_gradient(gather_batch(x.astype(jnp.float32), axis_name)) for x in (t_a, t_b))
  cosine = (jnp.mean(_cosine(p_a, t_b)) + jnp.mean(_cosine(p_b, t_a))) / 2
  loss = 4 - 4 * cosine
  return loss, {'loss': loss, 'cosine': cosine}


def simsiam_loss(p_a: jax.Array, p_b: jax.Array, z_a: jax.Array, z_b: jax.Array, *,
                 axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """SimSiam's loss (Chen & He, 2021; facebookresearch/simsiam): negative cosine of each view's prediction
  ``p`` with the other view's stop-gradient projection ``z``, halved per direction,
  ``loss = -(mean_i cos(p_a,i, sg z_b,i) + mean_i cos(p_b,i, sg z_a,i)) / 2``. Without a predictor, pass
  ``p = z`` (the collapsing "stop-gradient only" ablation). ``metrics``: ``loss`` and ``cosine`` (= -loss)."""
  p_a, p_b = (gather_batch(x.astype(jnp.float32), axis_name) for x in (p_a, p_b))
  z_a, z_b = (jax.lax.stop_gradient(gather_batch(x.astype(jnp.float32), axis_name)) for x in (z_a, z_b))
  cosine = (jnp.mean(_cosine(p_a, z_b)) + jnp.mean(_cosine(p_b, z_a))) / 2
  return -cosine, {'loss': -cosine, 'cosine': cosine}


def sinkhorn(scores: jax.Array, *, epsilon: float = 0.05, iterations: int = 3) -> jax.Array:
  """SwAV's Sinkhorn-Knopp codes for scores [B, K] (the official ``distributed_sinkhorn`` on the global batch):
  ``Q = exp(scores / ε)ᵀ`` scaled to sum 1, then ``iterations`` times rows to sum 1/K and columns to sum 1/B;
  returns ``B·Qᵀ`` [B, K] (each row a distribution over prototypes). No gradient flows through it.

  Computed on ``log Q``, each normalisation a ``logsumexp``: the same codes (to a few float32 roundings), but
  scores spread by more than ~87·ε (float32's exp range; unit-norm prototypes keep them within 2, arbitrary
  scores need not) no longer underflow whole rows or columns of Q to 0, whose normalisation would be
  0 / 0 = NaN, and after an iteration each row of the result sums to 1 at any spread."""
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  b, k = scores.shape
  log_q = (scores - jnp.max(scores)).T / epsilon  # log exp(scores / ε)ᵀ up to a constant, ≤ 0
  if not iterations:  # otherwise the first row normalisation absorbs the scaling to sum 1
    log_q = log_q - jax.nn.logsumexp(log_q)
  for _ in range(iterations):
    log_q = log_q - (jax.nn.logsumexp(log_q, axis=1, keepdims=True) + math.log(k))  # rows sum to 1/K
    log_q = log_q - (jax.nn.logsumexp(log_q, axis=0, keepdims=True) + math.log(b))  # columns sum to 1/B
  return (jnp.exp(log_q) * b).T


# SwAV's crops whose codes are computed (official ``--crops_for_assign 0 1``: the two large crops).
CROPS_FOR_ASSIGN = (0, 1)


def swav_loss(*scores: jax.Array, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
              queue_scores: Optional[jax.Array] = None, axis_name: Optional[str] = None) -> tuple[jax.Array, Metrics]:
  """SwAV's swapped prediction (Caron et al., 2020; facebookresearch/swav) for two or more crops.

  ``scores[v]`` [n, K] are this replica's prototype scores of crop v: the two large crops first, then any small
  crops (multi-crop). For each crop i of :data:`CROPS_FOR_ASSIGN` the codes ``q_i`` are the Sinkhorn-Knopp
  assignment (:func:`sinkhorn`) of the global batch's scores of that crop, with ``queue_scores[i]`` [Q, K] (the
  queued embeddings of that crop against the current prototypes) prepended when given and dropped after; every
  other crop v predicts them, and the loss averages as the official training loop does
  (facebookresearch/swav@06b1b7c:main_swav.py:L289-L315):
  ``loss = mean_{i ∈ crops_for_assign} [ Σ_{v ≠ i} -mean_rows Σ_k q_i log softmax(s_v / T) / (V - 1) ]``,
  V the number of crops; with two crops ``-(mean q_0 log p_1 + mean q_1 log p_0) / 2``. ``metrics``: ``loss`` and
  ``entropy`` (mean entropy of crop 0's codes; low = confident).
  """
  if len(scores) < 2:
    raise ValueError(f'swav_loss needs at least two crops, got {len(scores)}')
  s = [gather_batch(x.astype(jnp.float32), axis_name) for x in scores]
  n = s[0].shape[0]

  def codes(s, i):
    if queue_scores is not None:
      s = jnp.concatenate([queue_scores[i], s], axis=0)
    return sinkhorn(s, epsilon=epsilon, iterations=sinkhorn_iterations)[-n:]

  q = [codes(s[crop], i) for i, crop in enumerate(CROPS_FOR_ASSIGN)]
  ce = lambda q, s: -jnp.mean(jnp.sum(q * jax.nn.log_softmax(s / temperature, axis=1), axis=1))
  subloss = []
  for i, crop in enumerate(CROPS_FOR_ASSIGN):
    sub = functools.reduce(operator.add, [ce(q[i], s[v]) for v in range(len(s)) if v != crop])
    subloss.append(sub / (len(s) - 1) if len(s) > 2 else sub)  # the official / (crops - 1); two crops: / 1
  loss = functools.reduce(operator.add, subloss) / len(CROPS_FOR_ASSIGN)
  entropy = -jnp.mean(jnp.sum(q[0] * jnp.log(q[0] + 1e-12), axis=1))
  return loss, {'loss': loss, 'entropy': entropy}


def embedding_std(z: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """Mean over dimensions of the per-dimension std of the embeddings ``z`` [n, D] across the global batch.

  VICReg's variance hinge holds it near 1; a collapsing run drives it towards 0. A dimension of zero variance
  (identical rows) contributes 0 with gradient 0, where ``jnp.std``'s square root would give 0 · inf = NaN.
  With ``axis_name`` the batch is not gathered: the global mean, then the global sum of squared deviations from
  it, are two sums of [D] vectors over the replicas (the same two passes as ``jnp.var`` on the whole batch).
  """
  z = z.astype(jnp.float32)
  n = z.shape[0] if axis_name is None else z.shape[0] * jax.lax.psum(1, axis_name)
  total = jnp.sum(z, axis=0)
  mean = (total if axis_name is None else collectives.psum(total, axis_name)) / n
  squares = jnp.sum((z - mean)**2, axis=0)
  var = (squares if axis_name is None else collectives.psum(squares, axis_name)) / n
  positive = var > 0
  return jnp.mean(jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0))
