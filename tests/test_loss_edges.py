"""Edge inputs to every loss of :mod:`vicreg_jax.losses`, as hypothesis properties: a global batch of 2, one
dimension, identical rows (all examples equal), identical views, zeros, huge values and bfloat16 inputs give a
finite loss and finite gradients with respect to the inputs, on one device and under ``shard_map``. The one case
a method leaves undefined, W-MSE's whitening of a sub-batch with a singular covariance at eps = 0, raises a
ValueError on concrete values and is NaN under jit (for the train step's non-finite guard).

The bound on the values, ``|x| ≤ BOUND = 1e6``: the largest terms are quartic in the embeddings. VICReg's (and the
regularised BYOL / SimSiam's) covariance term sums squared covariances with |C_ij| ≤ N/(N - 1)·(2B)² ≤ 8B² for
|x| ≤ B, so with D ≤ 2 it is at most 2·64·(D - 1)·B⁴ ≈ 1.3e26 at B = 1e6, twelve orders of magnitude below
float32's 3.4e38 (which it would reach near B ≈ 1e9), and its gradient at most ~64·B³ ≈ 6e19. The squared norms of
SimCLR, BYOL and SimSiam are at most D·B² = 2e12 and SwAV's scores / T at most 1e7. bfloat16 has float32's
exponent range and every loss computes in float32, so the bound is the same for it. A projector's embeddings (a
linear map of BatchNorm'd features) are orders of magnitude smaller.

Shapes come from a small fixed set, so each (loss, shape, dtype) compiles once (jit's cache, one jitted
value-and-grad per loss).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import PartitionSpec as P

from vicreg_jax import losses

BOUND = 1e6
KEY = jax.random.key(0)
# (global shape, dtype): a global batch of 2 with D = 1; a batch of 4 with off-diagonal covariances, in bfloat16
# (every loss casts to float32 first, so bf16 inputs are float32 values of 8 significant bits: one case covers both).
CASES = (((2, 1), jnp.float32), ((4, 2), jnp.bfloat16))
STRUCTURES = ('bounded', 'huge', 'identical_rows', 'identical_views', 'zeros', 'zero_view')
WMSE_STRUCTURES = ('well_conditioned', 'identical_views', 'identical_rows', 'zeros', 'zero_view')
WMSE_SINGULAR = ('identical_rows', 'zeros', 'zero_view')  # a sub-batch whose covariance is singular
# Centred designs with orthogonal columns (XᵀX = n·I): a full-rank sub-batch for W-MSE's whitening.
DESIGN = {(2, 1): np.array([[1], [-1]], np.float32),
          (4, 2): np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)}


def _wmse(a, b, axis_name, eps):
  """W-MSE with one whitening sub-batch of the whole global batch."""
  n = a.shape[0] * (1 if axis_name is None else jax.lax.axis_size(axis_name))
  return losses.wmse_loss(a, b, key=KEY, w_size=n, eps=eps, axis_name=axis_name)[0]


# name -> objective(a, b, axis_name, eps) of the two views' rows: each loss as its method calls it (BYOL and SimSiam
# with the views themselves as stop-gradient targets; eps is W-MSE's shrinkage, a traced argument so that both
# values share one compilation).
OBJECTIVES = {
    'vicreg': lambda a, b, ax, eps: losses.vicreg_loss(a, b, axis_name=ax)[0],
    'barlow_twins': lambda a, b, ax, eps: losses.barlow_twins_loss(a, b, axis_name=ax)[0],
    'simclr': lambda a, b, ax, eps: losses.simclr_loss(a, b, axis_name=ax)[0],
    'wmse': _wmse,
    'byol': lambda a, b, ax, eps: losses.byol_loss(a, b, a, b, axis_name=ax)[0],
    'simsiam': lambda a, b, ax, eps: losses.simsiam_loss(a, b, a, b, axis_name=ax)[0],
    'swav': lambda a, b, ax, eps: losses.swav_loss(a, b, axis_name=ax)[0],
    'variance_covariance': lambda a, b, ax, eps: sum(losses.variance_covariance(a, b, axis_name=ax)),
    'embedding_std': lambda a, b, ax, eps: losses.embedding_std(a, ax) + losses.embedding_std(b, ax),
}
NOT_WMSE = sorted(set(OBJECTIVES) - {'wmse'})


def zeros_value(name, n, d):
  """The loss of two all-zero views [n, d] at the default coefficients, from the definitions: VICReg's variance
  hinge 1 - sqrt(0 + 1e-4) = 0.99 on every dimension; Barlow Twins' C = 0, so Σ_i (1 - 0)² = d; SimCLR's logits all
  0, so 2·log(2n - 1); cosines of zero vectors 0; SwAV's uniform codes against log softmax(0) = -log d."""
  return {'vicreg': 25 * 0.99, 'barlow_twins': d, 'simclr': 2 * math.log(2 * n - 1), 'byol': 4.0, 'simsiam': 0.0,
          'swav': math.log(d), 'variance_covariance': 0.99, 'embedding_std': 0.0}[name]


@functools.cache
def single(name):
  """jit(value_and_grad) of objective ``name`` w.r.t. both views, ``f(a, b, eps) -> (loss, (da, db))``."""
  f = OBJECTIVES[name]
  return jax.jit(jax.value_and_grad(lambda a, b, eps: f(a, b, None, eps), argnums=(0, 1)))


@functools.cache
def sharded(name, devices):
  """Objective ``name`` under ``shard_map`` over ``devices`` simulated devices, the views' rows split between them:
  ``f(a, b, eps) -> (every replica's loss [devices], the gradients w.r.t. a and b, each replica its rows)``."""
  f = OBJECTIVES[name]

  def body(a, b, eps):
    value, grads = jax.value_and_grad(lambda a, b: f(a, b, 'data', eps), argnums=(0, 1))(a, b)
    return value[None], grads

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ('data',))
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P('data'), P('data'), P()),
                               out_specs=(P('data'), (P('data'), P('data'))), check_vma=False))


def _floats(low, high):
  """float32 values in [low, high] (the bounds rounded to float32)."""
  return st.floats(float(np.float32(low)), float(np.float32(high)), width=32, allow_nan=False, allow_infinity=False)


@st.composite
def views(draw, shape, structure, base='bounded'):
  """Two float32 views of ``shape`` with |x| ≤ BOUND in ``structure``: 'bounded' (any such values), 'huge' (every
  magnitude in [BOUND / 100, BOUND], random signs), 'identical_rows' (each view one bounded row repeated),
  'identical_views' (b = a), 'zeros', 'zero_view' (a = 0). The views that are not degenerate by construction are
  drawn as ``base``: 'bounded', or 'well_conditioned' for W-MSE (an orthogonal design plus noise of ±0.2, shifted
  by up to 4 per column, at a scale from 1e-6 to BOUND / 8: a full-rank covariance at any magnitude)."""
  n, d = shape

  def bounded(rows=n):
    return draw(hnp.arrays(np.float32, (rows, d), elements=_floats(-BOUND, BOUND)))

  def huge():
    magnitude = draw(hnp.arrays(np.float32, shape, elements=_floats(BOUND / 100, BOUND)))
    return magnitude * draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([-1.0, 1.0])))

  def well_conditioned():
    scale = draw(_floats(1e-6, BOUND / 8))
    shift = draw(hnp.arrays(np.float32, (1, d), elements=_floats(-4, 4)))
    noise = draw(hnp.arrays(np.float32, shape, elements=_floats(-0.2, 0.2)))
    return (scale * (DESIGN[shape] + noise + shift)).astype(np.float32)

  view = {'bounded': bounded, 'well_conditioned': well_conditioned}[base]
  if structure in ('bounded', 'well_conditioned'):
    return view(), view()
  if structure == 'huge':
    return huge(), huge()
  if structure == 'identical_rows':
    return np.repeat(bounded(1), n, axis=0), np.repeat(bounded(1), n, axis=0)
  if structure == 'identical_views':
    a = view()
    return a, a.copy()
  if structure == 'zeros':
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
  if structure == 'zero_view':
    return np.zeros(shape, np.float32), view()
  raise ValueError(structure)


def _finite(x) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x, np.float32))))


def _noise_floor(name, a, b) -> float:
  """The size of float32 noise in a gradient that is exactly 0 (e.g. a cosine's for D = 1, Barlow Twins' for a
  batch of 2 with D = 1): the cosine-, standardisation- and whitening-based losses are scale-invariant, their
  gradients of order 1 / ‖row‖ for the smallest row; the others' gradients scale with their inputs and are
  compared relative to their largest entry alone."""
  if name not in ('simclr', 'byol', 'simsiam', 'wmse', 'barlow_twins'):
    return 0.0
  norms = np.linalg.norm(np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)]), axis=1)
  return 1.0 / max(norms.min(), 1e-12)


def _draw_case(data, structures, base='bounded'):
  """(shape, structure, a, b) drawn from CASES and ``structures``, the views in the case's dtype."""
  shape, dtype = data.draw(st.sampled_from(CASES), label='case')
  structure = data.draw(st.sampled_from(structures), label='structure')
  a, b = data.draw(views(shape, structure, base), label='views')
  return shape, structure, jnp.asarray(a, dtype), jnp.asarray(b, dtype)


# ------------------------------------------------------------------------------------------------ one device


@pytest.mark.parametrize('name', NOT_WMSE)
@settings(max_examples=20, deadline=None, database=None)
@given(data=st.data())
def test_finite_loss_and_gradients(name, data):
  """Every loss but W-MSE (below) is defined on every edge input: a finite float32 loss, finite gradients; on
  zeros the value its definition gives; embedding_std of identical rows exactly 0."""
  shape, structure, a, b = _draw_case(data, STRUCTURES)
  value, grads = single(name)(a, b, 0.0)
  assert value.dtype == jnp.float32
  assert _finite(value), f'{name} = {value} on {structure} {shape} {a.dtype}'
  assert all(_finite(g) for g in grads), f'{name}: non-finite gradients on {structure} {shape} {a.dtype}'
  if structure == 'zeros':
    np.testing.assert_allclose(float(value), zeros_value(name, *shape), rtol=1e-6, atol=1e-7)
  if structure == 'identical_rows' and name == 'embedding_std':
    assert float(value) == 0.0


@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data(), eps=st.sampled_from([0.0, 0.1]))
def test_wmse_finite_or_one_clear_error(data, eps):
  """W-MSE on well-conditioned views (any scale, bf16, identical views: loss 0) is finite with finite gradients,
  with or without shrinkage. A sub-batch with a singular covariance (identical rows, zeros, one zero view) whitens
  to zeros with eps > 0 (cosine 0: loss exactly 2, finite gradients); with eps = 0 the concrete call raises the
  ValueError that says to set wmse.eps > 0, and under jit (no Python control flow on values) the loss is NaN."""
  shape, structure, a, b = _draw_case(data, WMSE_STRUCTURES, base='well_conditioned')
  value, grads = single('wmse')(a, b, eps)
  if structure in WMSE_SINGULAR and eps == 0:
    with pytest.raises(ValueError, match=r'singular.*Set wmse\.eps > 0'):
      _wmse(a, b, None, eps)
    assert np.isnan(float(value))
    return
  assert _finite(value) and all(_finite(g) for g in grads), f'wmse = {value} on {structure} {shape} {a.dtype}'
  assert float(_wmse(a, b, None, eps)) == pytest.approx(float(value), rel=1e-5, abs=1e-6)  # concrete: no error
  if structure in WMSE_SINGULAR:
    assert float(value) == pytest.approx(2.0, abs=1e-6)
  if structure == 'identical_views':
    assert abs(float(value)) < 1e-5


def test_whiten_of_a_singular_sub_batch():
  """Concrete ``whiten``: zeros with eps = 0 raise the ValueError saying to set eps > 0, with eps > 0 they whiten to
  zeros; non-finite embeddings are named as such."""
  x = jnp.zeros((4, 2), jnp.float32)
  with pytest.raises(ValueError, match=r'singular.*Set wmse\.eps > 0'):
    losses.whiten(x)
  np.testing.assert_array_equal(losses.whiten(x, eps=0.1), np.zeros((4, 2)))
  with pytest.raises(ValueError, match='not finite'):
    losses.whiten(x.at[0, 0].set(jnp.nan))


def test_wmse_of_a_huge_rank_deficient_sub_batch_with_eps_is_finite_or_one_clear_error():
  """Shrinkage eps = 0.1 cannot rescue a rank-1 sub-batch at |z| ~ 1e6 in float32 (eps is lost in rounding against
  C ~ 1e12; most such draws fail the Cholesky): the concrete call returns a finite loss or raises the ValueError
  that says so, never a silent NaN."""
  rng = np.random.default_rng(0)
  raised = 0
  for _ in range(4):
    column = (rng.normal(size=4) * BOUND).astype(np.float32)
    z = np.stack([column, column * np.float32(rng.uniform(0.3, 3))], axis=1)
    try:
      value = _wmse(jnp.asarray(z), jnp.asarray(z[::-1]), None, 0.1)
    except ValueError as e:
      assert 'not positive definite in float32 with eps = 0.1' in str(e) and 'Raise wmse.eps' in str(e)
      raised += 1
    else:
      assert _finite(value)
  assert raised  # the message was checked: these draws include Cholesky failures


def test_sinkhorn_of_widely_spread_scores_matches_float64():
  """Scores spread by 30 (600 / ε: exp underflows float32 for most of Q, and whole rows of the linear-domain
  iteration became 0 / 0) give the float64 codes of the official iteration, each row a distribution."""
  scores = np.random.default_rng(0).uniform(-15, 15, size=(16, 5)).astype(np.float32)
  q = np.exp(np.asarray(scores, np.float64) / 0.05 - np.max(scores) / 0.05).T
  q /= q.sum()
  for _ in range(3):
    q /= q.sum(axis=1, keepdims=True) * 5
    q /= q.sum(axis=0, keepdims=True) * 16
  codes = np.asarray(jax.jit(losses.sinkhorn)(scores), np.float64)
  np.testing.assert_allclose(codes, 16 * q.T, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-6)


def test_vicreg_covariance_keeps_its_precision_at_huge_scale():
  """Variances of 1.3e12 with covariances of ~3e5: the off-diagonal sum (~2e11) is within 20 % of float64's, where
  subtracting the diagonal's ~1e24 from the sum over all entries left 0."""
  z = np.array([[1e6, 1e6 + 1], [-1e6, 1e6], [1e6, -1e6], [-1e6, -1e6]], np.float32)
  want = np.cov(z.astype(np.float64), rowvar=False)[0, 1]**2 * 2 / 2  # Σ_{i≠j} C_ij² / D, D = 2
  covariance = float(jax.jit(losses.vicreg_loss)(z, z)[1]['covariance']) / 2  # both views' terms
  assert covariance == pytest.approx(want, rel=0.2)


# ----------------------------------------------------------------------------------------------- shard_map

SHARDED = [(name, (2, 1)) for name in sorted(OBJECTIVES)]  # a global batch of 2 over 2 devices: one row each
SHARDED += [(name, (4, 2)) for name in ('barlow_twins', 'vicreg')]  # bf16; D split over the replicas


@pytest.mark.parametrize('name,shape', SHARDED)
@settings(max_examples=6, deadline=None, database=None)
@given(data=st.data(), eps=st.sampled_from([0.0, 0.1]))
def test_sharded_edges_match_one_device(name, shape, data, eps):
  """Under shard_map over 2 devices every replica returns the one-device loss of the edge input, and each replica's
  gradient w.r.t. its rows is 2 × the one-device gradient (the module's convention), finite where the loss is
  defined; W-MSE's singular sub-batch at eps = 0 is NaN on every replica. eps is W-MSE's only."""
  wmse = name == 'wmse'
  structure = data.draw(st.sampled_from(WMSE_STRUCTURES if wmse else STRUCTURES), label='structure')
  a, b = data.draw(views(shape, structure, 'well_conditioned' if wmse else 'bounded'), label='views')
  a, b = (jnp.asarray(x, dict(CASES)[shape]) for x in (a, b))
  values, grads = sharded(name, 2)(a, b, eps)
  value, want = single(name)(a, b, eps)
  if wmse and structure in WMSE_SINGULAR and eps == 0:
    assert np.all(np.isnan(np.asarray(values)))
    return
  assert _finite(values) and all(_finite(g) for g in grads), f'{name} on {structure}: {values}'
  np.testing.assert_allclose(values, np.full(2, value), rtol=1e-5, atol=1e-6)
  atol = 1e-4 * _noise_floor(name, a, b)
  rtol = 1e-4 if a.dtype == jnp.float32 else 1e-2  # bf16 gradients: rounded to 8 bits after the float32 maths
  for got, single_grad in zip(grads, want):
    scale = float(np.abs(np.asarray(single_grad, np.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), 2 * np.asarray(single_grad, np.float32), rtol=rtol,
                               atol=rtol / 100 * scale + atol)
