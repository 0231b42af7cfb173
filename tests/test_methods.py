"""The method registry: every method runs from its config section, on any config; its optimiser treatment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from vicreg_jax import config as schema, losses, methods
from vicreg_jax.models import heads


def _views(name, c, n=32, d=16):
  """Random :class:`methods.Views` with what the method ``name`` uses."""
  z = jax.random.normal(jax.random.key(0), (6, n, d))
  extra = methods.get(c).init_extra(c)
  params = {'prototypes': {'dense': {'kernel': jax.random.normal(jax.random.key(1), (d, 10))}}}
  return methods.Views(z=(z[0], z[1]), p=(z[2], z[3]), scores=(jnp.tanh(z[4][:, :10]), jnp.tanh(z[5][:, :10])),
                       target=(z[4], z[5]), key=jax.random.key(2), extra=extra, params=params)


@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_every_method_has_a_section_and_runs_from_it(name):
  c = schema.base_config()
  c.method = name
  c.wmse.w_size = 32
  c.model.projector, c.batch_size, c.moco_v2.queue_length = '32-16', 32, 64  # MoCo v2's queue of 16-d keys
  kwargs = methods.loss_kwargs(c)
  assert set(kwargs) | set(methods.METHODS[name].trainer_keys) == set(c[name])
  loss, metrics = methods.get(c).objective(_views(name, c), axis_name=None, **kwargs)
  assert np.isfinite(float(loss)) and float(metrics['loss']) == float(loss)
  assert set(methods.get(c).terms) <= set(metrics)


def test_regularised_byol_and_simsiam_add_the_weighted_vicreg_terms():
  for name in ('byol', 'simsiam'):
    c = schema.base_config()
    c.method = name
    v = _views(name, c)
    plain, m0 = methods.get(c).objective(v, axis_name=None, std_coeff=0.0, cov_coeff=0.0)
    reg, m1 = methods.get(c).objective(v, axis_name=None, std_coeff=1.0, cov_coeff=0.01)
    assert float(m0['variance']) > 0.01 and float(m0['covariance']) > 0.1  # both terms are active on random z
    np.testing.assert_allclose(reg, plain + m0['variance'] + 0.01 * m0['covariance'], rtol=1e-6)
    # SimSiam without a predictor compares each view's embedding with the other's (p = z).
  c = schema.base_config()
  c.method = 'simsiam'
  v = _views('simsiam', c)
  no_pred, _ = methods.get(c).objective(v._replace(p=None), axis_name=None)
  np.testing.assert_allclose(no_pred, losses.simsiam_loss(*v.z, *v.z)[0], rtol=1e-6)


def test_ema_decay_rises_from_tau_base_to_one_by_cosine():
  taus = [float(methods.ema_decay(0.996, k, 100)) for k in (0, 50, 100, 150)]
  np.testing.assert_allclose(taus, [0.996, 0.998, 1.0, 1.0], atol=1e-7)


def test_swav_queue_fills_from_its_start_step_and_joins_when_full():
  c = schema.base_config()
  c.update(method='swav', batch_size=4)
  c.model.projector = '8-3'
  c.swav.update(queue_length=8, queue_start_step=1)
  extra = methods.get(c).init_extra(c)
  assert extra['queue'].shape == (2, 8, 3)
  z = (jnp.arange(12.0).reshape(4, 3) + 1, -jnp.arange(12.0).reshape(4, 3) - 1)
  v = methods.Views(z=z)
  same = methods.get(c).update_extra(extra, v, 0, axis_name=None, **methods.section(c))
  assert int(same['queue_count']) == 0 and float(jnp.abs(same['queue']).max()) == 0  # before queue_start_step
  once = methods.get(c).update_extra(extra, v, 1, axis_name=None, **methods.section(c))
  np.testing.assert_allclose(once['queue'][0, :4], z[0] / jnp.linalg.norm(z[0], axis=1, keepdims=True), rtol=1e-6)
  assert float(jnp.abs(once['queue'][:, 4:]).max()) == 0
  twice = methods.get(c).update_extra(once, methods.Views(z=(z[1], z[0])), 2, axis_name=None, **methods.section(c))
  np.testing.assert_allclose(twice['queue'][0, 4:], once['queue'][0, :4])  # the older batch moved back
  assert int(twice['queue_count']) == 8
  # The objective takes the queue only once it is full.
  kernel = jax.random.normal(jax.random.key(0), (3, 5))
  scores = (jnp.tanh(jax.random.normal(jax.random.key(1), (4, 5))),) * 2
  kw = methods.loss_kwargs(c)
  run = lambda extra: methods.get(c).objective(methods.Views(z=z, scores=scores, extra=extra,
                                                             params={'prototypes': {'dense': {'kernel': kernel}}}),
                                               axis_name=None, **kw)[0]
  np.testing.assert_allclose(run(once), losses.swav_loss(*scores)[0], rtol=1e-6)
  np.testing.assert_allclose(run(twice), losses.swav_loss(*scores, queue_scores=twice['queue'] @ kernel)[0],
                             rtol=1e-6)
  assert abs(float(run(twice)) - float(run(once))) > 1e-4


def test_simsiam_predictor_keeps_its_peak_learning_rate():
  """--fix-pred-lr: the predictor's updates are those of the peak learning rate at every step; the other
  parameters follow the cosine schedule."""
  c = load_config('digits_simsiam')
  c.optim.update(name='sgd', weight_decay=0.0, momentum=0.0, warmup_epochs=0)
  tx, schedule = methods.make_optimizer(c, 10, 0)
  params = {'predictor': {'w': jnp.ones((2, 2))}, 'backbone': {'w': jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  peak = float(schedule(0))
  for step in range(6):
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates['predictor']['w'], -peak, rtol=1e-6)
    np.testing.assert_allclose(updates['backbone']['w'], -float(schedule(step)), rtol=1e-6)
  assert float(schedule(5)) < 0.7 * peak


def test_swav_prototypes_are_frozen_for_their_first_steps():
  c = load_config('digits_swav')
  c.swav.freeze_prototypes_steps = 3
  tx, _ = methods.make_optimizer(c, 100, 0)
  params = {'prototypes': {'dense': {'kernel': jnp.ones((2, 3))}}, 'projector': {'w': jnp.ones((2, 3))}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  moved = []
  for _ in range(5):
    updates, state = tx.update(grads, state, params)
    moved.append((float(jnp.abs(updates['prototypes']['dense']['kernel']).max()),
                  float(jnp.abs(updates['projector']['w']).max())))
  assert [m[0] > 0 for m in moved] == [False, False, False, True, True]
  assert all(m[1] > 0 for m in moved[1:])
  normed = heads.normalize_prototypes({'prototypes': {'dense': {'kernel': jnp.full((4, 2), 3.0)}}})
  np.testing.assert_allclose(jnp.linalg.norm(normed['prototypes']['dense']['kernel'], axis=0), 1.0, rtol=1e-6)



@pytest.mark.parametrize('config', ['digits', 'imagenet', 'cifar10', *(f'{scale}_{m}' for scale in ('digits', 'imagenet')
                                                                   for m in sorted(methods.METHODS) if m != 'vicreg')])
@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_any_config_takes_any_method(config, name):
  c = load_config(config)
  c.method = name  # what --config.method=NAME does
  tx, _ = methods.make_optimizer(c, 100, 10)
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
  updates, _ = tx.update(params, tx.init(params), params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_unknown_method_names_the_choices():
  c = schema.base_config()
  c.method = 'simclr_v9'
  with pytest.raises(ValueError, match="barlow_twins.*vicreg.*wmse"):
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
