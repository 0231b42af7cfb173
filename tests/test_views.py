"""Per-method view mechanics (issue 25): ``colour_first`` (W-MSE's jitter and grayscale on the whole image before
the crop, on the host, the encoded-JPEG path and with the colour ops on the device) and ``blur_kernel_fraction=0``
(SwAV's and W-MSE's PIL blur: σ in pixels, kernel radius ceil(3·max σ) at every crop size), host and device each
against float64 NumPy."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from vicreg_jax import config as schema
from vicreg_jax import errors
from vicreg_jax.data import augment, recipes
from vicreg_jax.data import device_augment as da

LUMA = np.array([0.2989, 0.5870, 0.1140])  # tf.image.rgb_to_grayscale (ITU-R 601)


def _two_tone(size=32, seed=3):
  """An RGB image, dark on the left half and bright on the right, with noise: a crop's mean gray is far from the
  whole image's unless the window sits across the middle."""
  rng = np.random.default_rng(seed)
  image = np.where(np.arange(size)[None, :, None] < size // 2, 0.2, 0.8) + 0.1 * rng.standard_normal((size, size, 3))
  return np.clip(image, 0.0, 1.0).astype(np.float32)


def _contrast64(x, factor):
  """torchvision's contrast in float64: blend with the mean gray of ``x`` itself, clipped to [0, 1]."""
  m = np.mean(np.asarray(x, np.float64) @ LUMA)
  return np.clip(m + factor * (x - m), 0.0, 1.0)


def _draws(seed, recipe):
  """The crop window and the contrast factor that augment_view draws for ``seed`` (its documented sub-seeds:
  10 per view, the jitter's 5 per op)."""
  s = tf.random.experimental.stateless_split(tf.constant(seed, tf.int64), 10)
  win = augment.crop_window((32, 32, 3), s[augment._CROP], recipe['crop_scale'], recipe['crop_ratio']).numpy()
  c = recipe['jitter'][1]
  js = tf.random.experimental.stateless_split(s[augment._JITTER], 5)
  factor = float(tf.random.stateless_uniform((), seed=js[1], minval=1 - c, maxval=1 + c))
  return win, factor


# A window of 16×16 (area 1/4, ratio 1) resized to 16: the resize is the identity, only the order matters.
JITTER_ONLY = schema.view_recipe(crop_size=16, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), jitter_p=1.0,
                                 jitter=(0.0, 0.8, 0.0, 0.0), colour_first=True)


def test_colour_first_jitters_the_whole_image_then_crops():
  image = _two_tone()
  seed = (12, 0)  # a window on the bright half (x = 16) and a strong contrast factor (0.34)
  (y, x, h, w), factor = _draws(seed, JITTER_ONLY)
  assert (h, w) == (16, 16) and abs(factor - 1) > 0.1
  window = lambda a: a[y:y + h, x:x + w]  # noqa: E731
  whole_first = window(_contrast64(image, factor))
  crop_first = _contrast64(window(image), factor)
  assert np.abs(whole_first - crop_first).max() > 0.05  # the two orders differ on this draw
  got = augment.augment_view(tf.constant(image), tf.constant(seed, tf.int64), JITTER_ONLY).numpy()
  np.testing.assert_allclose(got, whole_first, atol=2e-5)
  after = augment.augment_view(tf.constant(image), tf.constant(seed, tf.int64),
                               dict(JITTER_ONLY, colour_first=False)).numpy()
  np.testing.assert_allclose(after, crop_first, atol=2e-5)  # the default order: crop, then jitter


def _jpeg(image):
  return tf.io.encode_jpeg(tf.cast(tf.round(image * 255), tf.uint8), quality=90).numpy()


W_MSE = dict(schema.view_recipe(crop_size=16, crop_scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.8,
                                jitter=(0.8, 0.8, 0.8, 0.2), gray_p=0.2, blur_p=0.5, blur_kernel_fraction=0.0,
                                colour_first=True), mean=recipes.IMAGENET_MEAN, std=recipes.IMAGENET_STD)


def test_colour_first_encoded_path_equals_the_decoded_image():
  """With colour_first the JPEG is decoded whole: one view of the bytes, both views from one decode
  (augment_views, the pipeline's encoded path) and the views of the decoded image are the same numbers."""
  data = _jpeg(tf.random.stateless_uniform((40, 48, 3), seed=[5, 6]))
  decoded = augment.decode(tf.constant(data))
  seeds = [tf.constant((s, 1), tf.int64) for s in range(6)]
  for s1, s2 in zip(seeds[::2], seeds[1::2]):
    pair = augment.augment_views(tf.constant(data), (s1, s2), (W_MSE, W_MSE))
    for seed, view in zip((s1, s2), pair):
      from_bytes = augment.augment_view(tf.constant(data), seed, W_MSE).numpy()
      np.testing.assert_array_equal(view.numpy(), from_bytes)
      np.testing.assert_array_equal(from_bytes, augment.augment_view(decoded, seed, W_MSE).numpy())
  views = tf.function(lambda b, s: augment.augment_views(b, (s, s + 1), (W_MSE, W_MSE)))  # as in tf.data
  view = tf.function(lambda x, s: augment.augment_view(x, s, W_MSE))
  np.testing.assert_array_equal(views(tf.constant(data), seeds[0])[1].numpy(), view(decoded, seeds[0] + 1).numpy())


def test_colour_first_on_device_keeps_jitter_and_grayscale_on_the_host():
  """augment.on_device with colour_first: the host does jitter and grayscale before the crop, the device never
  does them; with no random device op left, host + device equal the all-host view up to the uint8 transfer."""
  recipe = dict(W_MSE, blur_p=0.0)
  host = da.host_recipe(recipe)
  assert host['colour_first'] and host['jitter_p'] == 0.8 and host['gray_p'] == 0.2
  assert host['blur_p'] == 0 and host['mean'] is None
  plain = da.host_recipe(dict(recipe, colour_first=False))
  assert plain['jitter_p'] == 0 and plain['gray_p'] == 0
  d = jax.device_get(da.decisions(jax.random.key(0), 256, recipe))
  assert not d['jitter'].any() and not d['gray'].any()
  image = tf.random.stateless_uniform((32, 32, 3), seed=[7, 8])
  seeds = [tf.constant((s, 2), tf.int64) for s in range(8)]
  sent = np.stack([da.to_uint8(augment.augment_view(image, s, host)).numpy() for s in seeds])
  got = np.asarray(da.apply_colour_ops(jnp.asarray(sent), jax.random.key(1), recipe))
  want = np.stack([augment.augment_view(image, s, recipe).numpy() for s in seeds])
  assert np.abs(got - want).max() <= 0.5 / 255 / min(recipes.IMAGENET_STD) + 1e-5
  bare = np.stack([da.to_uint8(augment.augment_view(image, s, dict(host, jitter_p=0.0, gray_p=0.0))).numpy()
                   for s in seeds])
  assert (sent != bare).any()  # the host did jitter or gray the views it sent


def _blur64(image, sigma, radius):
  """Separable Gaussian of σ ``sigma`` on 2·radius + 1 taps, reflect padding, in float64."""
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma)**2)
  k /= k.sum()
  x = np.pad(np.asarray(image, np.float64), ((radius, radius), (radius, radius), (0, 0)), mode='reflect')
  n, m = image.shape[:2]
  rows = sum(k[i] * x[i:i + n] for i in range(2 * radius + 1))
  return sum(k[i] * rows[:, i:i + m] for i in range(2 * radius + 1))


def test_sigma_sized_blur_of_a_96_px_crop_equals_numpy():
  """blur_kernel_fraction 0 at σ 2: radius ceil(3·2) = 6 (13 taps) on a 96-px image, host (tf) and device (jax)
  equal to float64 NumPy, and not to the 10%-of-the-side kernel (radius 5); the device sizes the kernel from the
  recipe's largest σ, not the drawn one."""
  image = tf.random.stateless_uniform((96, 96, 3), seed=[9, 10]).numpy()
  want = _blur64(image, 2.0, 6)
  host = augment.gaussian_blur(tf.constant(image), tf.constant([0, 0], tf.int64), (2.0, 2.0), 0.0).numpy()
  device = np.asarray(da.gaussian_blur(jnp.asarray(image), 2.0, 0.0, 2.0))
  np.testing.assert_allclose(host, want, atol=2e-6)
  np.testing.assert_allclose(device, want, atol=2e-6)
  assert np.abs(_blur64(image, 2.0, 5) - want).max() > 1e-4  # the test tells the kernel sizes apart
  smaller = np.asarray(da.gaussian_blur(jnp.asarray(image), 1.5, 0.0, 2.0))
  np.testing.assert_allclose(smaller, _blur64(image, 1.5, 6), atol=2e-6)


def test_blur_radius_sigma_sized_at_every_side_else_a_fraction_of_it():
  assert [recipes.blur_radius(s, 0.0, 2.0) for s in (16, 96, 224, None)] == [6, 6, 6, 6]
  assert recipes.blur_radius(96, 0.1, 2.0) == 5 and recipes.blur_radius(224, 0.1, 2.0) == 11
  assert recipes.blur_radius(4, 0.0, 2.0) == 3  # capped at side - 1 (reflect padding)
  assert recipes.blur_radius(None, 0.1, 2.0) == 1  # today's fallback for an unknown side


def test_recipe_rules_accept_colour_first_and_a_zero_kernel_fraction():
  config = schema.base_config().to_dict()
  config['augment']['view1'].update(colour_first=True, blur_kernel_fraction=0.0)
  schema.validate(config)
  for key, bad in (('blur_kernel_fraction', -0.1), ('colour_first', 'yes')):
    broken = schema.base_config().to_dict()
    broken['augment']['view2'][key] = bad
    with pytest.raises(errors.ConfigError, match=f'config.augment.view2.{key} '):
      schema.validate(broken)
