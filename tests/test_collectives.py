"""vicreg_jax.collectives (sums over devices in a fixed order) and the BatchNorm that uses them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vicreg_jax import collectives, errors, losses
from vicreg_jax.models.norm import BatchNorm

AXIS = 'd'


def sharded(f, in_specs, out_specs, devices=8):
  mesh = Mesh(np.asarray(jax.devices()[:devices]), (AXIS,))
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


def spread_values(devices=8, n=64):
  """Rows whose magnitudes differ by orders between devices, so that the order of addition shows in the bits."""
  rng = np.random.default_rng(0)
  scale = 10.0 ** rng.integers(-4, 5, size=(devices, 1))
  return (rng.standard_normal((devices, n)) * scale).astype(np.float32)


def fold(rows, reverse=False):
  """The left fold of float32 ``rows`` (in reverse with ``reverse``), in float32."""
  rows = rows[::-1] if reverse else rows
  total = rows[0].copy()
  for r in rows[1:]:
    total = total + r
  return total


@pytest.mark.parametrize('name', ['ordered', 'reversed'])
def test_folded_psum_and_pmean_add_in_device_order(name):
  x = spread_values()

  def body(v):
    with collectives.mode(name):
      return collectives.psum(v, AXIS), collectives.pmean(v, AXIS)

  total, mean = sharded(body, P(AXIS), (P(), P()))(x)
  expected = fold(x, reverse=name == 'reversed')
  np.testing.assert_array_equal(np.asarray(total)[0], expected)  # bitwise: the fold, in that order
  np.testing.assert_array_equal(np.asarray(mean)[0], expected / np.float32(8))
  native = np.asarray(sharded(lambda v: jax.lax.psum(v, AXIS), P(AXIS), P())(x))[0]
  np.testing.assert_allclose(expected, native, rtol=1e-5, atol=1e-3)  # the same sum, up to rounding
  assert not np.array_equal(fold(x), fold(x, reverse=True))  # the data tell the orders apart


@pytest.mark.parametrize('name', ['ordered', 'reversed'])
def test_folded_modes_have_jax_lax_gradients(name):
  """The backward passes are the transposes of jax.lax's collectives (shard_map, check_vma=False): a psum's
  cotangent psum'd, a pmean's pmean'd, an all-gather's reduce-scattered."""
  x = jnp.asarray(spread_values(n=6) / 100)

  def loss(v, psum, pmean, gather):
    g = gather(v[None], AXIS)  # [devices, 6]
    return jnp.sum(jnp.sin(psum(v * v, AXIS))) + jnp.sum(jnp.cos(pmean(v, AXIS)) * v) + jnp.sum(g ** 3 * g[::-1])

  def body(v, mode):
    with collectives.mode(mode):
      return jax.grad(loss)(v[0], collectives.psum, collectives.pmean, collectives.all_gather)[None]

  native = sharded(lambda v: jax.grad(loss)(v[0], jax.lax.psum, jax.lax.pmean,
                                            lambda a, ax: jax.lax.all_gather(a, ax, axis=0, tiled=True))[None],
                   P(AXIS), P(AXIS))(x)
  folded = sharded(lambda v: body(v, name), P(AXIS), P(AXIS))(x)
  np.testing.assert_allclose(np.asarray(folded), np.asarray(native), rtol=1e-5, atol=1e-6)
  assert float(np.abs(np.asarray(native)).max()) > 1e-2  # gradients that say something


def test_folded_modes_under_pmap_and_without_an_axis():
  x = spread_values(devices=4, n=5)

  def body(v):
    with collectives.mode('ordered'):
      return collectives.psum(v, AXIS), collectives.all_gather(v[None], AXIS)

  total, gathered = jax.pmap(body, axis_name=AXIS, devices=jax.devices()[:4])(x)
  np.testing.assert_array_equal(np.asarray(total)[2], fold(x))
  np.testing.assert_array_equal(np.asarray(gathered)[1], x)
  with collectives.mode('ordered'):
    assert collectives.all_gather(x, None) is x


def test_an_unknown_mode_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="reductions must be one of native, ordered, reversed, not 'exact'"):
    with collectives.mode('exact'):
      pass
  assert collectives.current_mode() == 'native'


def test_vicreg_loss_and_gradients_in_the_folded_modes_equal_the_native_ones():
  rng = np.random.default_rng(1)
  za, zb = (jnp.asarray(rng.standard_normal((64, 12)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((12, 12)) / 4, jnp.float32)

  def run(name):
    def body(w, a, b):
      with collectives.mode(name):
        value, g = jax.value_and_grad(lambda w: losses.vicreg_loss(a @ w, b @ w, axis_name=AXIS)[0])(w)
        return value[None], collectives.pmean(g, AXIS)
    return sharded(body, (P(), P(AXIS), P(AXIS)), (P(AXIS), P()))(w, za, zb)

  (v_n, g_n), (v_o, g_o), (v_r, g_r) = run('native'), run('ordered'), run('reversed')
  single = jax.value_and_grad(lambda w: losses.vicreg_loss(za @ w, zb @ w)[0])(w)
  for v, g in ((v_o, g_o), (v_r, g_r), (v_n, g_n)):
    np.testing.assert_allclose(np.asarray(v), float(single[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(single[1]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('axis', [None, AXIS], ids=['one_device', 'synchronised'])
def test_batchnorm_is_flax_batchnorm_bit_for_bit(dtype, axis):
  """Same variables, outputs, running statistics and gradients as flax.linen.BatchNorm on the native reductions
  (checkpoints and converted weights unchanged), and close to them on the ordered ones."""
  x = jax.random.normal(jax.random.key(0), (16, 5, 5, 6)) * 3 + 1

  def run(cls, name='native'):
    m = cls(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype, axis_name=axis,
            scale_init=nn.initializers.normal(1.0))
    variables = m.init(jax.random.key(1), x[:2].astype(dtype))

    def body(xs):
      with collectives.mode(name):
        def f(p):
          y, upd = m.apply({'params': p, 'batch_stats': variables['batch_stats']}, xs.astype(dtype),
                           mutable=['batch_stats'])
          return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, upd)
        (_, (y, upd)), g = jax.value_and_grad(f, has_aux=True)(variables['params'])
        return y, upd, collectives.pmean(g, AXIS) if axis else g

    out = jax.jit(body)(x) if axis is None else sharded(body, P(AXIS), (P(AXIS), P(), P()))(x)
    return variables, out

  theirs, ours = run(nn.BatchNorm), run(BatchNorm)
  assert jax.tree.structure(theirs) == jax.tree.structure(ours)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
               theirs, ours)
  assert ours[1][0].dtype == dtype
  if axis:
    ordered = run(BatchNorm, 'ordered')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                         rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5),
                 ours, ordered)
