"""Colour ops on the accelerator (``augment.on_device``): the same distribution as the host recipe (coin flips at
the recipe's rates, factors in their ranges), each op equal to its tf.image counterpart in augment.py, the whole
colour part equal to augment_view given the same draws, host batches reduced to the geometric part, and a
digits run that trains with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_digits
from vicreg_jax import config as schema, methods, parallel
from vicreg_jax import step as step_lib
from vicreg_jax.data import augment, pipeline, recipes
from vicreg_jax.data import device_augment as da

SIZE = 32
VIEW1, VIEW2 = schema.imagenet_views(SIZE)
IMAGE = tf.random.stateless_uniform((SIZE, SIZE, 3), seed=[1, 2]).numpy()
IMAGE[0, :4] = 0.5                             # grays (hue and saturation 0)
IMAGE[1, :6] = np.eye(3).tolist() + [[1, 1, 0], [0, 1, 1], [1, 0, 1]]  # primaries and secondaries
NORMALISED = ((0 - max(recipes.IMAGENET_MEAN)) / min(recipes.IMAGENET_STD),
              (1 - min(recipes.IMAGENET_MEAN)) / min(recipes.IMAGENET_STD))
N = 2000


def rates(recipe, seed=0):
  d = jax.device_get(da.decisions(jax.random.key(seed), N, recipe))
  return {k: float(np.mean(d[k])) for k in ('jitter', 'gray', 'blur', 'solarize')}, d


@pytest.mark.parametrize('view,expected', [
    (VIEW1, dict(jitter=0.8, gray=0.2, blur=1.0, solarize=0.0)),
    (VIEW2, dict(jitter=0.8, gray=0.2, blur=0.1, solarize=0.2))], ids=['view1', 'view2'])
def test_decision_rates_match_the_recipe(view, expected):
  got, d = rates(view)
  for k, p in expected.items():
    assert abs(got[k] - p) <= 0.03, (k, got[k], p)
  if expected['solarize'] == 0:
    assert got['solarize'] == 0.0  # never on view 1
  # Factors uniform on their ranges (mean and std of U[a, b]), the op order a uniform permutation.
  for k, (lo, hi) in dict(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.8, 1.2), hue=(-0.1, 0.1),
                          sigma=(0.1, 2.0)).items():
    x = d[k]
    assert lo <= x.min() and x.max() <= hi, k
    assert abs(x.mean() - (lo + hi) / 2) < 0.03 * (hi - lo), k
    assert abs(x.std() - (hi - lo) / np.sqrt(12)) < 0.03 * (hi - lo), k
  assert (np.sort(d['order'], 1) == np.arange(4)).all()
  first = np.bincount(d['order'][:, 0], minlength=4) / N
  np.testing.assert_allclose(first, 0.25, atol=0.03)


def test_device_and_host_rates_agree():
  """The host's coin flips (augment.view_decisions in tf.data) and the device's, 2,000 draws each: the rates
  differ by less than 3 standard errors of a difference of two rates (at most 0.047)."""
  seeds = tf.data.Dataset.range(N).map(lambda i: tf.stack([tf.constant(5, tf.int64), i]))
  host = next(seeds.map(lambda s: augment.view_decisions(s, VIEW2)).batch(N).as_numpy_iterator())
  device, _ = rates(VIEW2, seed=3)
  for k in device:
    assert abs(host[k].mean() - device[k]) < 0.047, (k, host[k].mean(), device[k])


def _tf_jitter_draws(seed, jitter):
  """The factors and order augment.color_jitter draws for ``seed``."""
  s = tf.random.experimental.stateless_split(seed, 5)
  b, c, sat, h = jitter
  u = augment._uniform
  return dict(brightness=u(s[0], 1 - b, 1 + b), contrast=u(s[1], 1 - c, 1 + c),
              saturation=u(s[2], 1 - sat, 1 + sat), hue=u(s[3], -h, h), order=tf.argsort(u(s[4], shape=(4,))))


# name: (jitter strengths with only that op random, device op(x, draws), atol)
SINGLE = {
    'brightness': ((0.4, 0, 0, 0), lambda x, d: da.adjust_brightness(x, d['brightness']), 1e-5),
    'contrast': ((0, 0.4, 0, 0), lambda x, d: da.adjust_contrast(x, d['contrast']), 1e-5),
    'saturation': ((0, 0, 0.2, 0), lambda x, d: da.adjust_saturation(x, d['saturation']), 1e-5),
    'hue': ((0, 0, 0, 0.1), lambda x, d: da.adjust_hue(x, d['hue']), 2e-5),
    'hue_half_turn': ((0, 0, 0, 0.5), lambda x, d: da.adjust_hue(x, d['hue']), 2e-5),
}


@pytest.mark.parametrize('name', sorted(SINGLE))
def test_jitter_op_equals_tf_with_the_same_factor(name):
  jitter, op, atol = SINGLE[name]
  for i in range(4):
    seed = tf.constant([i, 9], tf.int64)
    expected = augment.color_jitter(tf.constant(IMAGE), seed, *jitter).numpy()
    d = {k: v.numpy() for k, v in _tf_jitter_draws(seed, jitter).items()}
    got = np.asarray(op(jnp.asarray(IMAGE), d))
    np.testing.assert_allclose(got, expected, atol=atol)
    assert np.abs(got - IMAGE).max() > 1e-3  # the op did something


@pytest.mark.parametrize('sigma', [0.1, 0.7, 2.0])
def test_blur_with_a_fixed_sigma_equals_tf(sigma):
  expected = augment.gaussian_blur(tf.constant(IMAGE), tf.constant([0, 0], tf.int64), sigma=(sigma, sigma)).numpy()
  got = np.asarray(da.gaussian_blur(jnp.asarray(IMAGE), sigma))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  rough = np.abs(np.diff(IMAGE, axis=0)).mean()
  assert sigma < 0.5 or np.abs(np.diff(got, axis=0)).mean() < 0.7 * rough  # it blurs


def test_grayscale_solarize_normalize_equal_tf():
  x = jnp.asarray(IMAGE)
  np.testing.assert_allclose(da.grayscale(x), augment._grayscale(tf.constant(IMAGE)).numpy(), atol=1e-6)
  np.testing.assert_allclose(da.solarize(x), augment.solarize(tf.constant(IMAGE)).numpy(), atol=1e-7)
  np.testing.assert_allclose(da.solarize(x), np.where(IMAGE >= 0.5, 1 - IMAGE, IMAGE), atol=1e-7)
  np.testing.assert_allclose(
      da.normalize(x, recipes.IMAGENET_MEAN, recipes.IMAGENET_STD),
      augment.normalize(tf.constant(IMAGE), recipes.IMAGENET_MEAN, recipes.IMAGENET_STD).numpy(), atol=1e-5)
  one = IMAGE[..., :1]
  np.testing.assert_array_equal(da.grayscale(jnp.asarray(one)), one)


@pytest.mark.parametrize('view', ['view1', 'view2'])
def test_colour_part_equals_augment_view_given_the_same_draws(view):
  """The device colour ops with the host's draws (coins, factors, op order, σ) give augment_view's output on the
  same (already cropped) image: jitter in random order, grayscale, blur, solarize, normalisation."""
  recipe = dict(VIEW1 if view == 'view1' else VIEW2, crop_size=0, flip_p=0.0)
  recipe['jitter_p'] = recipe['gray_p'] = 0.5  # both branches of each coin occur among the seeds
  recipe['solarize_p'] = 0.5 if view == 'view2' else 0.0
  colour = jax.jit(lambda x, d: da._colour_one(x, d, da.full_recipe(recipe)))
  fired = set()
  for i in range(12):
    seed = tf.constant([i, 3], tf.int64)
    s = tf.random.experimental.stateless_split(seed, 10)
    coins = augment.view_decisions(seed, recipe)
    draws = _tf_jitter_draws(s[augment._JITTER], recipe['jitter'])
    draws['sigma'] = augment._uniform(s[augment._BLUR], *recipe['blur_sigma'])
    d = {k: jnp.asarray(v.numpy()) for k, v in {**coins, **draws}.items()}
    fired |= {k for k in ('jitter', 'gray', 'blur', 'solarize') if bool(d[k])}
    expected = augment.augment_view(tf.constant(IMAGE), seed, recipe).numpy()
    got = np.asarray(colour(jnp.asarray(IMAGE), d))
    np.testing.assert_allclose(got, expected, atol=1e-4)  # normalised units (1/std ≈ 4.4 per unit of [0, 1])
  assert fired == ({'jitter', 'gray', 'blur', 'solarize'} if view == 'view2' else {'jitter', 'gray', 'blur'})


def test_output_shape_dtype_range_and_determinism():
  images = np.stack([np.roll(IMAGE, i, 0) for i in range(8)])
  as_uint8 = np.round(images * 255).astype(np.uint8)
  fn = jax.jit(da.apply_colour_ops, static_argnums=2)
  for x, recipe, (lo, hi) in ((as_uint8, VIEW2, NORMALISED), (images, dict(VIEW1, mean=None, std=None), (0, 1))):
    recipe = _hashable(recipe)
    out = np.asarray(fn(x, jax.random.key(1), recipe))
    assert out.shape == (8, SIZE, SIZE, 3) and out.dtype == np.float32
    assert lo - 1e-5 <= out.min() and out.max() <= hi + 1e-5
    np.testing.assert_array_equal(out, np.asarray(fn(x, jax.random.key(1), recipe)))
    assert np.abs(out - np.asarray(fn(x, jax.random.key(2), recipe))).mean() > 1e-2
  # uint8 input is the float image / 255: same output as the float path on the quantised image.
  np.testing.assert_allclose(fn(as_uint8, jax.random.key(1), _hashable(VIEW2)),
                             fn(as_uint8 / np.float32(255), jax.random.key(1), _hashable(VIEW2)), atol=1e-5)


class _hashable(dict):
  """A recipe usable as a static jit argument."""

  def __hash__(self):
    return hash(tuple(sorted((k, str(v)) for k, v in self.items())))


def test_decisions_are_the_ops_that_fire():
  """apply_colour_ops grays, solarizes and blurs exactly the examples its decisions say."""
  images = jnp.asarray(np.stack([np.roll(IMAGE, i, 1) for i in range(64)]))
  key = jax.random.key(4)
  base = dict(recipes.RECIPE_DEFAULTS)
  for op, recipe in (('gray', dict(base, gray_p=0.5)), ('solarize', dict(base, solarize_p=0.5)),
                     ('blur', dict(base, blur_p=0.5, blur_sigma=(1.0, 2.0))), ('jitter', dict(base, jitter_p=0.5))):
    d = np.asarray(da.decisions(key, 64, recipe)[op])
    out = np.asarray(da.apply_colour_ops(images, key, recipe))
    changed = np.abs(out - np.asarray(images)).reshape(64, -1).max(1) > 1e-4
    assert 10 < d.sum() < 54, op
    np.testing.assert_array_equal(changed, d, err_msg=op)


def tiny_digits_without_noise(**overrides):
  """:func:`conftest.tiny_digits` with views without pixel noise (which the device ops do not do)."""
  c = tiny_digits(**overrides)
  c.augment.view1 = dict(c.augment.view1, noise_std=0.0)
  c.augment.view2 = dict(c.augment.view2, noise_std=0.0)
  return c


def test_on_device_refuses_pixel_noise():
  with pytest.raises(ValueError, match='noise_std'):
    pipeline.pretrain_dataset(tiny_digits(**{'augment.on_device': True}))


def test_on_device_host_batches_are_the_geometric_part_only():
  """With on_device the host sends uint8 views equal to the pipeline without colour ops (same crops, shifts)."""
  config = tiny_digits_without_noise(**{'augment.on_device': True})
  (dev,) = [b for _, b in zip(range(1), pipeline.pretrain_dataset(config).as_numpy_iterator())]
  geometric = tiny_digits_without_noise()
  geometric.augment.view1 = dict(geometric.augment.view1, jitter_p=0.0)  # digits: jitter is the only colour op
  geometric.augment.view2 = dict(geometric.augment.view2, jitter_p=0.0)
  (geo,) = [b for _, b in zip(range(1), pipeline.pretrain_dataset(geometric).as_numpy_iterator())]
  (full,) = [b for _, b in zip(range(1), pipeline.pretrain_dataset(tiny_digits_without_noise()).as_numpy_iterator())]
  for v in ('view1', 'view2'):
    assert dev[v].dtype == np.uint8 and dev[v].shape == (64, 16, 16, 1)
    np.testing.assert_array_equal(dev[v], np.round(geo[v] * 255).astype(np.uint8))
    assert np.abs(np.round(full[v] * 255) - dev[v]).max() > 10  # the default path does jitter on the host
  np.testing.assert_array_equal(dev['label'], full['label'])


@pytest.mark.slow
def test_digits_train_step_with_colour_ops_on_device_moves_parameters_and_ignores_the_device_count():
  """Two train steps of the tiny digits model on the uint8 host batches, with the colour ops in the jit step:
  parameters move, and 8 devices take the same steps as 1 (each example's colour draws depend on its row in
  the global batch, not on which device holds it)."""
  config = tiny_digits_without_noise(**{'augment.on_device': True})
  host = [b for _, b in zip(range(2), pipeline.pretrain_dataset(config).as_numpy_iterator())]
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = jax.sharding.Mesh(np.asarray(devices), (parallel.AXIS,))
    tx, schedule = methods.make_optimizer(config, 10, 2)
    online = step_lib.make_probe(config, 10)
    state = jax.device_put(step_lib.init_state(config, step_lib.build_model(config, None), tx, jax.random.key(0),
                                            online), parallel.replicated(mesh))
    p0 = jax.device_get(state.params)
    step = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh, online)
    losses = []
    for b in host:
      state, metrics, _ = step(state, jax.device_put(b, parallel.data_sharding(mesh)))
      losses.append(float(metrics['loss']))
    results.append((jax.device_get(state.params), losses))
  (p1, l1), (p8, l8) = results
  assert len(jax.devices()) == 8 and all(np.isfinite(l1))
  np.testing.assert_allclose(l8, l1, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, p0)
  assert max(jax.tree.leaves(moved)) > 1e-4
