"""Tests of vicreg_jax.losses (VICReg, Barlow Twins) against independent float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import sharded_value_and_grad
from vicreg_jax.losses import barlow_twins_loss, vicreg_loss

N_DEV = 8
COEFFS = [
    dict(),  # defaults: 25, 25, 1, eps 1e-4
    dict(sim_coeff=3.0, std_coeff=7.5, cov_coeff=0.4, eps=1e-3),
]
DEFAULTS = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4)


# ----------------------------------------------------------------------------------------- NumPy reference


def ref_terms(za, zb, eps=1e-4):
  """(invariance, variance, covariance) in float64, straight from the VICReg equations."""
  za = np.asarray(za, np.float64)
  zb = np.asarray(zb, np.float64)
  n, d = za.shape
  inv = np.mean((za - zb)**2)

  def var_term(z):
    std = np.sqrt(np.var(z, axis=0, ddof=1) + eps)
    return np.mean(np.maximum(0.0, 1.0 - std))

  def cov_term(z):
    c = np.cov(z, rowvar=False)  # unbiased, centred
    off = sum(c[i, j]**2 for i in range(d) for j in range(d) if i != j)
    return off / d

  var = (var_term(za) + var_term(zb)) / 2
  cov = cov_term(za) + cov_term(zb)
  return inv, var, cov


def ref_loss(za, zb, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4):
  inv, var, cov = ref_terms(za, zb, eps)
  return sim_coeff * inv + std_coeff * var + cov_coeff * cov


def ref_grad(za, zb, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4):
  """Hand-derived gradient of the loss w.r.t. (z_a, z_b), float64.

  inv: d/dza = 2(za - zb)/(N D).
  var (per branch, weight 1/(2D) per dim): d/dz_nd = -1[std_d < 1] · zc_nd / ((N - 1) std_d) / (2 D).
  cov (per branch): d/dz Σ_{i≠j} C_ij² / D = 4 zc C_off / ((N - 1) D), C_off = C with its diagonal zeroed.
  The centring z -> z - mean(z) has Jacobian I - 11ᵀ/N on each column; both gradients above are linear in zc
  on the left, whose columns sum to zero, so the centring leaves them unchanged.
  """
  za = np.asarray(za, np.float64)
  zb = np.asarray(zb, np.float64)
  n, d = za.shape

  def branch(z):
    zc = z - z.mean(0)
    std = np.sqrt((zc**2).sum(0) / (n - 1) + eps)
    g_var = -(std < 1.0).astype(np.float64) * zc / ((n - 1) * std) / (2 * d)
    c = zc.T @ zc / (n - 1)
    c_off = c - np.diag(np.diag(c))
    g_cov = 4 * zc @ c_off / ((n - 1) * d)
    return std_coeff * g_var + cov_coeff * g_cov

  g_inv = 2 * (za - zb) / (n * d)
  return sim_coeff * g_inv + branch(za), -sim_coeff * g_inv + branch(zb)


def make_inputs(n, d, seed=0):
  """Two correlated views whose per-dim std straddles 1, so the variance hinge is active on some dims only."""
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.4, 1.6, size=(1, d))
  za = rng.normal(size=(n, d)) * scale
  zb = za + 0.5 * rng.normal(size=(n, d)) * scale
  mix = rng.normal(size=(d, d)) / np.sqrt(d)  # non-trivial off-diagonal covariance
  za = za + 0.3 * za @ mix
  return za.astype(np.float32), zb.astype(np.float32)


def assert_metrics(loss, metrics, za, zb, coeffs, rtol=1e-5, atol=1e-7):
  kw = {**DEFAULTS, **coeffs}
  inv, var, cov = ref_terms(za, zb, kw['eps'])
  assert set(metrics) == {'loss', 'invariance', 'variance', 'covariance'}
  np.testing.assert_allclose(metrics['invariance'], inv, rtol=rtol, atol=atol)
  np.testing.assert_allclose(metrics['variance'], var, rtol=rtol, atol=atol)
  np.testing.assert_allclose(metrics['covariance'], cov, rtol=rtol, atol=atol)
  expected = kw['sim_coeff'] * inv + kw['std_coeff'] * var + kw['cov_coeff'] * cov
  np.testing.assert_allclose(metrics['loss'], expected, rtol=rtol, atol=atol)
  np.testing.assert_allclose(loss, expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ reference self-checks


def test_reference_terms_by_explicit_loops():
  """The NumPy reference agrees with a loop-by-loop evaluation of the definitions (guards np.cov/ddof use)."""
  za, zb = make_inputs(7, 5, seed=3)
  za64, zb64 = za.astype(np.float64), zb.astype(np.float64)
  n, d = za.shape
  eps = 1e-4

  def stats(z):
    mean = [sum(z[k, j] for k in range(n)) / n for j in range(d)]
    cov = [[sum((z[k, i] - mean[i]) * (z[k, j] - mean[j]) for k in range(n)) / (n - 1) for j in range(d)]
           for i in range(d)]
    var = sum(max(0.0, 1.0 - np.sqrt(cov[j][j] + eps)) for j in range(d)) / d
    off = sum(cov[i][j]**2 for i in range(d) for j in range(d) if i != j) / d
    return var, off

  inv = sum((za64[k, j] - zb64[k, j])**2 for k in range(n) for j in range(d)) / (n * d)
  va, ca = stats(za64)
  vb, cb = stats(zb64)
  np.testing.assert_allclose(ref_terms(za, zb, eps), (inv, (va + vb) / 2, ca + cb), rtol=1e-12)


def test_reference_gradient_by_finite_differences():
  """The hand-derived gradient matches central differences of the float64 reference loss."""
  za, zb = make_inputs(6, 4, seed=4)
  za, zb = za.astype(np.float64), zb.astype(np.float64)
  coeffs = COEFFS[1]
  ga, gb = ref_grad(za, zb, **coeffs)
  h = 1e-6
  for z, g, which in ((za, ga, 0), (zb, gb, 1)):
    num = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
      zp, zm = z.copy(), z.copy()
      zp[idx] += h
      zm[idx] -= h
      args_p = (zp, zb) if which == 0 else (za, zp)
      args_m = (zm, zb) if which == 0 else (za, zm)
      num[idx] = (ref_loss(*args_p, **coeffs) - ref_loss(*args_m, **coeffs)) / (2 * h)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------ single device


@pytest.mark.parametrize('n,d', [(16, 8), (32, 24), (5, 3)])
@pytest.mark.parametrize('coeffs', COEFFS, ids=['default', 'weighted'])
def test_loss_and_metrics_match_reference(n, d, coeffs):
  za, zb = make_inputs(n, d, seed=n + d)
  loss, metrics = jax.jit(functools.partial(vicreg_loss, **coeffs))(za, zb)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert_metrics(loss, metrics, za, zb, coeffs)


def test_variance_hinge_inactive_for_wide_embeddings():
  """With every per-dim std well above 1 the variance term is exactly zero."""
  za, zb = make_inputs(16, 8, seed=1)
  za, zb = 10 * za, 10 * zb
  _, metrics = vicreg_loss(za, zb)
  assert float(metrics['variance']) == 0.0
  assert_metrics(metrics['loss'], metrics, za, zb, {})


def test_identical_views_have_zero_invariance():
  za, _ = make_inputs(16, 8, seed=2)
  _, metrics = vicreg_loss(za, za)
  assert float(metrics['invariance']) == 0.0


def test_accepts_bfloat16_inputs():
  za, zb = make_inputs(16, 8, seed=5)
  za16, zb16 = jnp.asarray(za, jnp.bfloat16), jnp.asarray(zb, jnp.bfloat16)
  loss, metrics = vicreg_loss(za16, zb16)
  assert loss.dtype == jnp.float32
  # Reference on the bf16-rounded values: the loss itself is computed in float32.
  assert_metrics(loss, metrics, np.asarray(za16, np.float32), np.asarray(zb16, np.float32), {})


@pytest.mark.parametrize('n,d', [(16, 8), (32, 24)])
@pytest.mark.parametrize('coeffs', COEFFS, ids=['default', 'weighted'])
def test_gradient_matches_analytic(n, d, coeffs):
  za, zb = make_inputs(n, d, seed=10 * n + d)
  ga, gb = jax.jit(jax.grad(lambda a, b: vicreg_loss(a, b, **coeffs)[0], argnums=(0, 1)))(za, zb)
  ra, rb = ref_grad(za, zb, **coeffs)
  np.testing.assert_allclose(ga, ra, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gb, rb, rtol=1e-4, atol=1e-5)


def test_batch_of_one_raises():
  z = np.ones((1, 4), np.float32)
  with pytest.raises(ValueError):
    vicreg_loss(z, z)
  with pytest.raises(ValueError):
    jax.jit(vicreg_loss)(z, z)


def test_global_batch_of_one_per_replica_is_fine_under_axis():
  """A local batch of 1 is allowed when the gathered global batch has ≥ 2 examples."""
  za, zb = make_inputs(N_DEV, 4, seed=6)
  losses = jax.pmap(lambda a, b: vicreg_loss(a, b, axis_name='data')[0], axis_name='data')(
      za.reshape(N_DEV, 1, 4), zb.reshape(N_DEV, 1, 4))
  np.testing.assert_allclose(losses, np.full(N_DEV, ref_loss(za, zb)), rtol=1e-5)


# ------------------------------------------------------------------------------------------- multi-device


def _mesh():
  assert jax.device_count() >= N_DEV, 'tests/conftest.py should give 8 simulated CPU devices'
  # Auto axis (as the trainer's ``parallel.make_mesh``): jax.make_mesh defaults to Explicit axes, under which
  # shard_map insists that its inputs already carry the P('data') sharding.
  return jax.make_mesh((N_DEV,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def _split(x):
  return x.reshape(N_DEV, x.shape[0] // N_DEV, *x.shape[1:])


def _per_replica_loss_shard_map(za, zb, coeffs):

  def body(a, b):
    loss, metrics = vicreg_loss(a, b, axis_name='data', **coeffs)
    return loss[None], {k: v[None] for k, v in metrics.items()}

  f = jax.shard_map(body, mesh=_mesh(), in_specs=(P('data'), P('data')), out_specs=P('data'),
                    check_vma=False)
  return jax.jit(f)(za, zb)


def _per_replica_loss_pmap(za, zb, coeffs):
  f = jax.pmap(lambda a, b: vicreg_loss(a, b, axis_name='data', **coeffs), axis_name='data')
  return f(_split(za), _split(zb))


RUNNERS = {'shard_map': _per_replica_loss_shard_map, 'pmap': _per_replica_loss_pmap}
# D = 16, 32: divisible by 8, 2 or 4 covariance columns per replica; D = 12: padded to 16, 2 columns each.
SHAPES = [(32, 16), (64, 32), (32, 12)]
GRAD_SHAPES = [(32, 16), (32, 12)]


@pytest.mark.parametrize('runner', RUNNERS)
@pytest.mark.parametrize('n,d', SHAPES)
@pytest.mark.parametrize('coeffs', COEFFS, ids=['default', 'weighted'])
def test_every_replica_returns_global_loss(runner, n, d, coeffs):
  za, zb = make_inputs(n, d, seed=n * d)
  single_loss, single_metrics = vicreg_loss(za, zb, **coeffs)
  assert_metrics(single_loss, single_metrics, za, zb, coeffs)

  losses, metrics = RUNNERS[runner](za, zb, coeffs)
  assert losses.shape == (N_DEV,)
  for r in range(N_DEV):
    np.testing.assert_allclose(losses[r], single_loss, rtol=1e-5)
    for k in single_metrics:
      np.testing.assert_allclose(metrics[k][r], single_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)


def _local_z_grads(za, zb, coeffs, runner):
  """Per-replica gradients w.r.t. each replica's own rows, concatenated in replica order: [N, D] each."""
  grad = jax.grad(lambda a, b: vicreg_loss(a, b, axis_name='data', **coeffs)[0], argnums=(0, 1))
  if runner == 'shard_map':
    f = jax.shard_map(grad, mesh=_mesh(), in_specs=(P('data'), P('data')), out_specs=P('data'),
                      check_vma=False)
    return jax.jit(f)(za, zb)
  ga, gb = jax.pmap(grad, axis_name='data')(_split(za), _split(zb))
  return ga.reshape(za.shape), gb.reshape(zb.shape)


@pytest.mark.parametrize('runner', RUNNERS)
@pytest.mark.parametrize('n,d', GRAD_SHAPES)
@pytest.mark.parametrize('coeffs', COEFFS, ids=['default', 'weighted'])
def test_local_embedding_gradient_is_axis_size_times_global(runner, n, d, coeffs):
  """Convention: each replica's gradient is that of the sum of the 8 identical losses."""
  za, zb = make_inputs(n, d, seed=n + 7 * d)
  sa, sb = jax.grad(lambda a, b: vicreg_loss(a, b, **coeffs)[0], argnums=(0, 1))(za, zb)
  ra, rb = ref_grad(za, zb, **coeffs)
  np.testing.assert_allclose(sa, ra, rtol=1e-4, atol=1e-5)

  ga, gb = _local_z_grads(za, zb, coeffs, runner)
  np.testing.assert_allclose(np.asarray(ga) / N_DEV, sa, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gb) / N_DEV, sb, rtol=1e-5, atol=1e-6)


def _linear_loss(w, xa, xb, coeffs, axis_name=None):
  return vicreg_loss(xa @ w, xb @ w, axis_name=axis_name, **coeffs)[0]


@pytest.mark.parametrize('runner', RUNNERS)
@pytest.mark.parametrize('n,d', GRAD_SHAPES)
@pytest.mark.parametrize('coeffs', COEFFS, ids=['default', 'weighted'])
def test_pmean_of_replicated_weight_gradient_is_single_device_gradient(runner, n, d, coeffs):
  rng = np.random.default_rng(n * 100 + d)
  d_in = 6
  xa = rng.normal(size=(n, d_in)).astype(np.float32)
  xb = (xa + 0.3 * rng.normal(size=(n, d_in))).astype(np.float32)
  w = (rng.normal(size=(d_in, d)) / np.sqrt(d_in)).astype(np.float32)

  single = jax.grad(_linear_loss)(w, xa, xb, coeffs)
  # The same through the analytic embedding gradient: dL/dW = xaᵀ dL/dza + xbᵀ dL/dzb.
  ra, rb = ref_grad(xa @ w.astype(np.float64), xb @ w.astype(np.float64), **coeffs)
  np.testing.assert_allclose(single, xa.T @ ra + xb.T @ rb, rtol=1e-4, atol=1e-5)

  def body(w, xa, xb):
    g = jax.grad(_linear_loss)(w, xa, xb, coeffs, 'data')
    return jax.lax.pmean(g, 'data')

  if runner == 'shard_map':
    f = jax.shard_map(body, mesh=_mesh(), in_specs=(P(), P('data'), P('data')), out_specs=P(),
                      check_vma=False)
    averaged = jax.jit(f)(w, xa, xb)
  else:
    per_replica = jax.pmap(body, axis_name='data', in_axes=(None, 0, 0))(w, _split(xa), _split(xb))
    for r in range(1, N_DEV):  # pmean leaves the same value on every replica
      np.testing.assert_allclose(per_replica[r], per_replica[0], rtol=1e-6, atol=1e-7)
    averaged = per_replica[0]
  np.testing.assert_allclose(averaged, single, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- Barlow Twins


def ref_barlow_twins(za, zb, lambd=0.0051, eps=1e-5):
  """The official Barlow Twins forward in float64: BatchNorm1d(affine=False) in training mode (biased variance)
  on each view, c = bn(z1)ᵀ bn(z2) / batch_size, on-diagonal Σ (c_ii - 1)², off-diagonal Σ_{i≠j} c_ij²."""
  za = np.asarray(za, np.float64)
  zb = np.asarray(zb, np.float64)
  n, d = za.shape

  def bn(z):
    return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)  # np.var: ddof=0, as BatchNorm normalises

  c = bn(za).T @ bn(zb) / n
  on = sum((c[i, i] - 1)**2 for i in range(d))
  off = sum(c[i, j]**2 for i in range(d) for j in range(d) if i != j)
  return on + lambd * off, on, off


def ref_barlow_twins_grad(za, zb, lambd=0.0051, h=1e-6):
  """Central differences of the float64 reference loss w.r.t. every entry of za and zb."""
  za = np.asarray(za, np.float64)
  zb = np.asarray(zb, np.float64)
  grads = []
  for which in (0, 1):
    z = (za, zb)[which]
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
      zp, zm = z.copy(), z.copy()
      zp[idx] += h
      zm[idx] -= h
      lp = ref_barlow_twins(*((zp, zb) if which == 0 else (za, zp)), lambd)[0]
      lm = ref_barlow_twins(*((zm, zb) if which == 0 else (za, zm)), lambd)[0]
      g[idx] = (lp - lm) / (2 * h)
    grads.append(g)
  return grads


@pytest.mark.parametrize('n,d', [(16, 8), (32, 12)])
@pytest.mark.parametrize('lambd', [0.0051, 0.3])
def test_barlow_twins_value_and_gradient_match_reference(n, d, lambd):
  za, zb = make_inputs(n, d, seed=3 * n + d)
  loss, metrics = jax.jit(functools.partial(barlow_twins_loss, lambd=lambd))(za, zb)
  ref, on, off = ref_barlow_twins(za, zb, lambd)
  assert set(metrics) == {'loss', 'on_diagonal', 'off_diagonal'}
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics['on_diagonal'], on, rtol=1e-5)
  np.testing.assert_allclose(metrics['off_diagonal'], off, rtol=1e-5)
  ga, gb = jax.jit(jax.grad(lambda a, b: barlow_twins_loss(a, b, lambd=lambd)[0], argnums=(0, 1)))(za, zb)
  ra, rb = ref_barlow_twins_grad(za, zb, lambd)
  scale = max(np.abs(ra).max(), np.abs(rb).max())
  np.testing.assert_allclose(ga, ra, rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(gb, rb, rtol=1e-3, atol=1e-4 * scale)


def test_barlow_twins_of_identical_decorrelated_views_is_zero():
  """Whitened identical views: C = I, both terms vanish (up to eps)."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(64, 8)))
  z = (q * np.sqrt(64)).astype(np.float32)  # orthogonal columns of mean ~0
  z = z - z.mean(0)
  loss, metrics = barlow_twins_loss(z, z, eps=0.0)
  assert float(metrics['off_diagonal']) < 0.05 and float(metrics['on_diagonal']) < 1e-6
  assert float(barlow_twins_loss(z, -z)[1]['on_diagonal']) == pytest.approx(4 * 8, rel=1e-3)  # C = -I


@pytest.mark.parametrize('n,d', [(32, 16), (32, 12)])  # D = 16: 2 columns of C per replica; 12: padded to 16
def test_barlow_twins_on_8_devices_equals_1_device(n, d):
  """Under shard_map every replica returns the global loss, and the pmean of a replicated weight's gradients
  equals the single-device gradient (≤ 1e-5)."""
  rng = np.random.default_rng(n + d)
  xa = rng.normal(size=(n, 6)).astype(np.float32)
  xb = (xa + 0.3 * rng.normal(size=(n, 6))).astype(np.float32)
  w = (rng.normal(size=(6, d)) / np.sqrt(6)).astype(np.float32)

  def loss(w, xa, xb, axis_name=None):
    return barlow_twins_loss(xa @ w, xb @ w, lambd=0.05, axis_name=axis_name)[0]

  single_loss, single_grad = jax.value_and_grad(loss)(w, xa, xb)
  values, grad = sharded_value_and_grad(loss, w, xa, xb, N_DEV)
  np.testing.assert_allclose(values, np.full(N_DEV, single_loss), rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-5, atol=1e-5 * np.abs(single_grad).max())
  np.testing.assert_allclose(single_loss, ref_barlow_twins(xa @ w.astype(np.float64), xb @ w, 0.05)[0],
                             rtol=1e-5)
