"""The method registry: every method runs from its config section, on any config; its optimiser treatment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from vicreg_jax import defaults, methods


@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_every_method_has_a_section_and_runs_from_it(name):
  c = defaults.base_config()
  c.method = name
  kwargs = methods.loss_kwargs(c)
  assert set(kwargs) | set(methods.METHODS[name].optimizer_keys) == set(c[name])
  z = jax.random.normal(jax.random.key(0), (2, 16, 8))
  loss, metrics = methods.get(c).loss(z[0], z[1], axis_name=None, **kwargs)
  assert np.isfinite(float(loss)) and float(metrics['loss']) == float(loss)
  assert set(methods.get(c).terms) <= set(metrics)


@pytest.mark.parametrize('config', ['digits', 'imagenet', 'cifar10', 'digits_barlow_twins', 'imagenet_barlow_twins'])
@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_any_config_takes_any_method(config, name):
  c = load_config(config)
  c.method = name  # what --config.method=NAME does
  tx, _ = methods.make_optimizer(c, 100, 10)
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
  updates, _ = tx.update(params, tx.init(params), params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_unknown_method_names_the_choices():
  c = defaults.base_config()
  c.method = 'simclr_v9'
  with pytest.raises(ValueError, match="barlow_twins.*vicreg"):
    methods.get(c)
  with pytest.raises(ValueError, match='Unknown method'):
    methods.make_optimizer(c, 10, 1)


def test_barlow_twins_biases_and_norms_take_the_smaller_learning_rate():
  """Official Barlow Twins: the ndim-1 parameters' updates are lr-biases/lr-weights = 0.0048/0.2 of what the same
  LARS gives them under VICReg; the weights' updates are the same."""
  params = {'kernel': jnp.full((4, 3), 0.5), 'bias': jnp.full((3,), 0.2), 'scale': jnp.ones((3,))}
  grads = jax.tree.map(lambda p: 0.1 * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 0.05, params)
  out = {}
  for name in ('vicreg', 'barlow_twins'):
    c = load_config('imagenet')
    c.method = name
    tx, _ = methods.make_optimizer(c, 1000, 10)
    state = tx.init(params)
    for _ in range(3):  # past step 0 of the warmup, where the learning rate is 0
      updates, state = tx.update(grads, state, params)
    out[name] = updates
  np.testing.assert_allclose(out['barlow_twins']['kernel'], out['vicreg']['kernel'], rtol=1e-6)
  for k in ('bias', 'scale'):
    assert np.abs(out['vicreg'][k]).min() > 0
    np.testing.assert_allclose(out['barlow_twins'][k], out['vicreg'][k] * 0.0048 / 0.2, rtol=1e-5)
