"""Tests of vicreg_jax.optim: LARS in the official VICReg order and the warmup-cosine schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vicreg_jax.optim import lars, lr_schedule

# ------------------------------------------------------------------------------------------------- LARS


def ref_lars(params, grads_seq, lr_fn, weight_decay, momentum, eta):
  """The official VICReg LARS step by step in float64 NumPy; returns the update of every step."""
  mu = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  updates = []
  for step, grads in enumerate(grads_seq):
    upd = {}
    for k in p:
      g = np.asarray(grads[k], np.float64)
      if p[k].ndim > 1:
        dp = g + weight_decay * p[k]
        p_norm, dp_norm = np.linalg.norm(p[k]), np.linalg.norm(dp)
        if p_norm > 0 and dp_norm > 0:
          dp = dp * (eta * p_norm / dp_norm)
      else:  # biases and norm parameters: no weight decay, no trust ratio
        dp = g
      mu[k] = momentum * mu[k] + dp
      upd[k] = -lr_fn(step) * mu[k]
      p[k] = p[k] + upd[k]
    updates.append(upd)
  return updates


def make_tree(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      'w': rng.normal(size=(3, 4)).astype(np.float32),
      'b': rng.normal(size=(4,)).astype(np.float32),
      'zero_w': np.zeros((2, 2), np.float32),
  }
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
  return params, grads_seq


def run_optax(tx, params, grads_seq, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  p = jax.tree.map(jnp.asarray, params)
  updates = []
  for grads in grads_seq:
    upd, state = update(grads, state, p)
    p = optax.apply_updates(p, upd)
    updates.append(upd)
  return updates


def lr_fn(step):
  """A schedule whose value changes at every step, so lr-before vs after momentum is observable."""
  return 0.1 * (1.0 + 2.0 * step)


def assert_updates_close(actual, expected, rtol=1e-5, atol=1e-7):
  assert len(actual) == len(expected)
  for step, (a, e) in enumerate(zip(actual, expected)):
    assert set(a) == set(e)
    for k in e:
      np.testing.assert_allclose(a[k], e[k], rtol=rtol, atol=atol, err_msg=f'step {step}, {k}')


@pytest.mark.parametrize('hparams', [
    dict(weight_decay=1e-6, momentum=0.9, eta=0.001),  # the defaults
    dict(weight_decay=0.3, momentum=0.8, eta=0.05),  # large enough that decay and trust ratio matter
])
def test_lars_matches_hand_computation(hparams):
  params, grads_seq = make_tree()
  tx = lars(lambda count: lr_fn(count), **hparams)
  actual = run_optax(tx, params, grads_seq)
  expected = ref_lars(params, grads_seq, lr_fn, **hparams)
  assert_updates_close(actual, expected)


def test_lars_defaults():
  params, grads_seq = make_tree(seed=1)
  actual = run_optax(lars(lambda count: lr_fn(count)), params, grads_seq, jit=False)
  expected = ref_lars(params, grads_seq, lr_fn, weight_decay=1e-6, momentum=0.9, eta=0.001)
  assert_updates_close(actual, expected)


def test_lars_first_two_steps_explicitly():
  """Two steps spelled out without the reference loop, for the weight, the bias and the all-zero weight."""
  params, grads_seq = make_tree(seed=2)
  wd, m, eta = 0.3, 0.9, 0.05
  lr0, lr1 = 0.5, 2.0
  tx = lars(lambda count: jnp.where(count == 0, lr0, lr1), weight_decay=wd, momentum=m, eta=eta)
  (u0, u1) = run_optax(tx, params, grads_seq[:2])

  w0 = params['w'].astype(np.float64)
  g0, g1 = grads_seq[0], grads_seq[1]

  def w_dp(w, g):
    dp = g + wd * w
    return dp * eta * np.linalg.norm(w) / np.linalg.norm(dp)

  mu_w0 = w_dp(w0, g0['w'])
  w1 = w0 - lr0 * mu_w0
  mu_w1 = m * mu_w0 + w_dp(w1, g1['w'])
  np.testing.assert_allclose(u0['w'], -lr0 * mu_w0, rtol=1e-5)
  np.testing.assert_allclose(u1['w'], -lr1 * mu_w1, rtol=1e-5)

  # Bias: plain heavy-ball momentum on the raw gradient; lr multiplies the buffer.
  np.testing.assert_allclose(u0['b'], -lr0 * g0['b'], rtol=1e-6)
  np.testing.assert_allclose(u1['b'], -lr1 * (m * g0['b'] + g1['b']), rtol=1e-6)
  assert not np.allclose(u1['b'], -(m * lr0 * g0['b'] + lr1 * g1['b']))  # optax.lars' order

  # All-zero weight: ‖p‖ = 0 at step 0, so the trust ratio is 1 and dp = g (+ wd·0).
  zw1 = -lr0 * g0['zero_w']
  np.testing.assert_allclose(u0['zero_w'], -lr0 * g0['zero_w'], rtol=1e-6)
  mu_z1 = m * g0['zero_w'] + w_dp(zw1, g1['zero_w'])  # non-zero from step 1 on
  np.testing.assert_allclose(u1['zero_w'], -lr1 * mu_z1, rtol=1e-5)


def test_lars_zero_gradient_and_zero_weight():
  """‖p‖ = 0 and ‖dp‖ = 0 together: no NaN, the update is zero."""
  params = {'w': np.zeros((3, 3), np.float32), 'b': np.zeros((3,), np.float32)}
  grads = jax.tree.map(np.zeros_like, params)
  (upd,) = run_optax(lars(0.1, weight_decay=0.5), params, [grads])
  for k in params:
    np.testing.assert_array_equal(upd[k], 0.0)


def test_lars_differs_from_optax_lars():
  """optax.lars scales by the lr before the momentum trace; with a changing lr the hand reference (and
  vicreg_jax's lars) must disagree with it, so the test above would catch that ordering."""
  params, grads_seq = make_tree(seed=3)
  hp = dict(weight_decay=0.3, momentum=0.9, eta=0.05)
  expected = ref_lars(params, grads_seq, lr_fn, **hp)
  theirs = run_optax(
      optax.lars(lambda count: lr_fn(count), weight_decay=hp['weight_decay'], trust_coefficient=hp['eta'],
                 momentum=hp['momentum'], weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
                 trust_ratio_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)), params, grads_seq)
  # Step 0 agrees (empty momentum buffer), later steps do not.
  for k in params:
    np.testing.assert_allclose(theirs[0][k], expected[0][k], rtol=1e-5, atol=1e-7)
  with pytest.raises(AssertionError):
    assert_updates_close(theirs, expected)
  # ... and the project's lars agrees with the reference where optax.lars does not.
  ours = run_optax(lars(lambda count: lr_fn(count), **hp), params, grads_seq)
  assert_updates_close(ours, expected)


def test_lars_with_lr_schedule():
  """End to end with the project schedule: step 0 of warmup has lr 0, so the first update is zero."""
  params, grads_seq = make_tree(seed=4)
  sched = lr_schedule(base_lr=0.2, global_batch=512, total_steps=10, warmup_steps=2)
  hp = dict(weight_decay=1e-6, momentum=0.9, eta=0.001)
  actual = run_optax(lars(sched, **hp), params, grads_seq)
  expected = ref_lars(params, grads_seq, lambda s: float(sched(s)), **hp)
  assert_updates_close(actual, expected)
  for k in params:
    np.testing.assert_array_equal(actual[0][k], 0.0)


# --------------------------------------------------------------------------------------------- schedule


def ref_schedule(step, base_lr, global_batch, total_steps, warmup_steps, end_factor=0.001):
  peak = base_lr * global_batch / 256
  if step < warmup_steps:
    return peak * step / warmup_steps
  end = end_factor * peak
  q = (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2
  return peak * q + end * (1 - q)


@pytest.mark.parametrize('base_lr,global_batch,total,warmup', [
    (0.2, 2048, 1000, 100),
    (0.3, 256, 500, 10),
    (1.6, 4096, 37, 7),
])
def test_schedule_matches_formula(base_lr, global_batch, total, warmup):
  sched = lr_schedule(base_lr, global_batch, total, warmup)
  peak = base_lr * global_batch / 256
  steps = [0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total]
  for s in steps:
    np.testing.assert_allclose(sched(s), ref_schedule(s, base_lr, global_batch, total, warmup), rtol=1e-5,
                               atol=1e-9, err_msg=f'step {s}')
  # Landmarks written out.
  np.testing.assert_allclose(sched(0), 0.0, atol=0)
  np.testing.assert_allclose(sched(warmup // 2), peak * (warmup // 2) / warmup, rtol=1e-6)
  np.testing.assert_allclose(sched(warmup), peak, rtol=1e-6)
  np.testing.assert_allclose(sched(total), 0.001 * peak, rtol=1e-5)


def test_schedule_concrete_numbers():
  """base_lr 0.2 at batch 2048 -> peak 1.6; warmup 10 of 110 steps."""
  sched = lr_schedule(0.2, 2048, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose(sched(0), 0.0)
  np.testing.assert_allclose(sched(5), 0.8, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1.6, rtol=1e-6)
  np.testing.assert_allclose(sched(60), 1.6 * 0.5 + 0.0016 * 0.5, rtol=1e-6)  # half way: q = 1/2
  np.testing.assert_allclose(sched(110), 0.0016, rtol=1e-5)


def test_schedule_custom_end_factor_and_jit():
  sched = lr_schedule(0.5, 512, total_steps=50, warmup_steps=5, end_factor=0.1)
  steps = jnp.arange(51)
  got = jax.jit(jax.vmap(sched))(steps)
  want = [ref_schedule(s, 0.5, 512, 50, 5, end_factor=0.1) for s in range(51)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_schedule_is_monotone():
  sched = lr_schedule(0.2, 1024, total_steps=200, warmup_steps=20)
  lrs = np.asarray([sched(s) for s in range(201)])
  assert np.all(np.diff(lrs[:21]) > 0)
  assert np.all(np.diff(lrs[20:]) <= 0)


def test_schedule_without_warmup_and_past_the_end():
  sched = lr_schedule(0.2, 256, total_steps=100, warmup_steps=0)
  np.testing.assert_allclose(sched(0), 0.2, rtol=1e-6)  # no warmup: starts at the peak
  np.testing.assert_allclose(sched(50), ref_schedule(50, 0.2, 256, 100, 0), rtol=1e-5)
  np.testing.assert_allclose(sched(100), 0.2 * 0.001, rtol=1e-5)
  np.testing.assert_allclose(sched(150), 0.2 * 0.001, rtol=1e-5)  # held at the end value


def test_step_schedule_and_warmup_start():
  """'step': constant peak after the warmup, ×decay_factor from each milestone on; the warmup from
  ``start_factor·peak``, reaching the peak at step W (or at W - 1 with ``warmup_linspace``)."""
  sched = lr_schedule(0.2, 256, 100, 10, kind='step', milestones=(50, 80), decay_factor=0.1, start_factor=0.5)
  got = np.asarray(jax.vmap(sched)(jnp.arange(101)))
  want = [0.1 + 0.1 * k / 10 for k in range(10)] + [0.2] * 40 + [0.02] * 30 + [0.002] * 21
  np.testing.assert_allclose(got, want, rtol=1e-6)
  linspace = lr_schedule(0.2, 256, 100, 5, start_factor=0.5, warmup_linspace=True)
  np.testing.assert_allclose([linspace(k) for k in range(6)], [0.1, 0.125, 0.15, 0.175, 0.2, 0.2], rtol=1e-6)
  with pytest.raises(ValueError, match="optim.schedule"):
    lr_schedule(0.2, 256, 100, 5, kind='linear')


@pytest.mark.parametrize('value,message', [((190, -1), 'must be >= 0'), ('190', 'must be a tuple of integers'),
                                           ((1.5,), 'must be an integer'), ([190, True], 'must be an integer')])
def test_decay_epochs_must_be_a_tuple_of_epochs(value, message):
  """optim.decay_epochs' rule (a tuple of integers >= 0; a list, as config.json holds it, too)."""
  from vicreg_jax import config as schema
  rule = schema.rules('pretrain')['optim.decay_epochs']
  assert rule.problem(value).startswith(message)
  assert rule.problem((190, 215)) is None and rule.problem([190, 215]) is None and rule.problem(()) is None
