"""The colour part of a view recipe in jax.numpy, to run on the accelerator (``config.augment.on_device``).

The host then does only the geometric part of each view (crop and resize, affine map, shift, flip:
:func:`host_recipe`) and sends uint8 images; :func:`apply_colour_ops` does the rest on a batch, per example and
with the distribution of :func:`augment.augment_view`: colour jitter with probability ``jitter_p`` (brightness,
contrast, saturation, hue, in a random order per example, as torchvision's ``ColorJitter``), grayscale with
``gray_p``, Gaussian blur with ``blur_p``, solarize with ``solarize_p``, then normalisation by ``mean``/``std``.
Each deterministic op computes what its tf.image counterpart in :mod:`augment` computes (hue: the same RGB→HSV
shift→RGB as ``tf.image.adjust_hue``, no YIQ approximation). The random draws come from jax keys, so they are
the same distribution as the host's, not the same numbers.

A ``colour_first`` recipe (W-MSE: jitter and grayscale on the whole image before the crop) keeps its jitter and
grayscale on the host, before the crop (:func:`host_recipe`), and the device does only the blur, solarize and
normalisation (:func:`device_recipe`). Done after the crop on the device they would be another augmentation, not
the same one moved: the contrast blends with the mean gray of the image it sees (whole image ≠ crop), and no
jitter op commutes exactly with the resize (clipping, hue's HSV round trip), so only the host order is exact.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vicreg_jax import errors
from vicreg_jax.data.recipes import blur_radius, full_recipe

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale (ITU-R 601 luma)


def host_recipe(recipe: Mapping[str, Any]) -> dict:
  """``recipe`` without its colour part (jitter, grayscale, blur, solarize, normalisation): what the host still
  does when the colour ops run on the accelerator. The geometric ops keep their sub-seeds, so crops and flips
  are those of the full recipe on the host; a cutout too (its zeros survive the uint8 transfer; the colour ops
  then run after it). Pixel noise is not among the device ops: a recipe with ``noise_std`` is refused.
  A ``colour_first`` recipe keeps its jitter and grayscale here, before the crop (the module docstring says why)."""
  r = full_recipe(recipe)
  if r['noise_std']:
    raise errors.ConfigError('augment.on_device does not do the pixel noise of noise_std (it would be clipped by the '
                     'uint8 transfer): set --config.augment.on_device=False, or noise_std=0 in the views')
  off = dict(blur_p=0.0, solarize_p=0.0, mean=None, std=None)
  return dict(r, **off) if r['colour_first'] else dict(r, jitter_p=0.0, gray_p=0.0, **off)


def device_recipe(recipe: Mapping[str, Any]) -> dict:
  """The full ``recipe`` as the device ops read it: without jitter and grayscale when it is ``colour_first`` (the
  host did them before the crop, :func:`host_recipe`), else as it is."""
  r = full_recipe(recipe)
  return dict(r, jitter_p=0.0, gray_p=0.0) if r['colour_first'] else r


def to_uint8(image):
  """A tf float image in [0, 1] as uint8 (×255, rounded): a quarter of the float32 bytes to the device."""
  import tensorflow as tf
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def from_uint8(images):
  """uint8 images as float32 in [0, 1] (integer input is divided by 255; float input is returned as float32)."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


# --- deterministic ops on one image [H, W, C] in [0, 1] ---------------------------------------------------------

def grayscale(image):
  """ITU-R 601 luma (tf.image.rgb_to_grayscale), repeated over the input's channels; 1-channel images as they
  are."""
  if image.shape[-1] == 1:
    return image
  luma = jnp.tensordot(image, jnp.asarray(GRAY_WEIGHTS, image.dtype), axes=[[-1], [0]])[..., None]
  return jnp.broadcast_to(luma, image.shape)


def _blend(a, b, factor):
  return jnp.clip(b + factor * (a - b), 0.0, 1.0)


def adjust_brightness(image, factor):
  """``clip(x·factor)`` (torchvision's brightness)."""
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  """Blend with the image's mean gray level: ``clip(m + factor·(x - m))``."""
  return _blend(image, jnp.mean(grayscale(image)), factor)


def adjust_saturation(image, factor):
  """Blend with the grayscale image: ``clip(g + factor·(x - g))``."""
  return _blend(image, grayscale(image), factor)


def rgb_to_hsv(image):
  """RGB [..., 3] in [0, 1] to HSV with hue in [0, 1), as tf.image (hue 0 and saturation 0 on grays)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), b)
  span = v - jnp.minimum(jnp.minimum(r, g), b)
  s = jnp.where(v > 0, span / jnp.where(v > 0, v, 1.0), 0.0)
  norm = 1.0 / (6.0 * jnp.where(span > 0, span, 1.0))
  h = jnp.where(r == v, norm * (g - b), jnp.where(g == v, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
  h = jnp.where(span > 0, h, 0.0)
  h = jnp.where(h < 0, h + 1.0, h)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv):
  """HSV [..., 3] (hue in [0, 1)) to RGB: channel n of (r, g, b) = v - v·s·clip(min(k, 4 - k), 0, 1) with
  k = (n + 6h) mod 6 and n = 5, 3, 1 (the sector formula of tf.image, written without branches)."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  n = jnp.asarray([5.0, 3.0, 1.0], hsv.dtype)
  k = jnp.mod(n + 6.0 * h[..., None], 6.0)
  return v[..., None] - (v * s)[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(image, delta):
  """Rotates the hue by ``delta`` (a fraction of the colour circle) in HSV, as ``tf.image.adjust_hue``, then
  clips to [0, 1]. 1-channel images are returned as they are."""
  if image.shape[-1] != 3:
    return image
  hsv = rgb_to_hsv(image)
  h = jnp.mod(hsv[..., 0] + delta, 1.0)
  return jnp.clip(hsv_to_rgb(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1)), 0.0, 1.0)


def gaussian_blur(image, sigma, kernel_fraction: float = 0.1, sigma_max: float = 2.0):
  """Separable Gaussian blur with standard deviation ``sigma`` (pixels), kernel side 2r + 1 with
  r = :func:`recipes.blur_radius` of the image height, ``kernel_fraction`` and ``sigma_max`` (the recipe's largest
  σ, which sizes the kernel when ``kernel_fraction`` is 0), reflect padding: augment.gaussian_blur for a fixed σ."""
  radius = blur_radius(image.shape[0], kernel_fraction, sigma_max)
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (x / sigma)**2)
  k = k / jnp.sum(k)
  h, w = image.shape[0], image.shape[1]
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='reflect')
  rows = sum(k[i] * padded[i:i + h] for i in range(2 * radius + 1))
  return sum(k[i] * rows[:, i:i + w] for i in range(2 * radius + 1))


def solarize(image):
  """PIL's solarize at 128/255 as augment.solarize: values at or above 0.5 become 1 - x (= ``min(x, 1 - x)``)."""
  return jnp.minimum(image, 1.0 - image)


def normalize(image, mean, std):
  """``(x - mean) / std`` per channel, written as augment.normalize does (scale, then bias)."""
  scale = jnp.asarray([1.0 / s for s in std], jnp.float32)
  bias = jnp.asarray([-m / s for m, s in zip(mean, std)], jnp.float32)
  return image * scale + bias


# --- the random part ----------------------------------------------------------------------------------------------

def _coin(key, p: float):
  """True with probability ``p`` (constant when p is 0 or 1)."""
  if p <= 0:
    return jnp.asarray(False)
  if p >= 1:
    return jnp.asarray(True)
  return jax.random.uniform(key) < p


def example_decisions(key, recipe: Mapping[str, Any]) -> dict:
  """Everything :func:`apply_colour_ops` draws for one example from ``key``: booleans ``jitter``, ``gray``,
  ``blur``, ``solarize``; jitter factors ``brightness``, ``contrast``, ``saturation`` (U[1-x, 1+x]) and ``hue``
  (U[-h, h]); ``order``, the permutation in which the four jitter ops run (uniform: argsort of 4 uniforms, as
  augment.color_jitter); ``sigma``, the blur's σ ~ U[blur_sigma]. A ``colour_first`` recipe never jitters or
  grays here (:func:`device_recipe`)."""
  r = device_recipe(recipe)
  k = jax.random.split(key, 10)
  b, c, s, h = r['jitter']
  u = lambda key, lo, hi: jax.random.uniform(key, (), jnp.float32, lo, hi)  # noqa: E731
  return dict(jitter=_coin(k[0], r['jitter_p']), gray=_coin(k[1], r['gray_p']), blur=_coin(k[2], r['blur_p']),
              solarize=_coin(k[3], r['solarize_p']), brightness=u(k[4], 1 - b, 1 + b),
              contrast=u(k[5], 1 - c, 1 + c), saturation=u(k[6], 1 - s, 1 + s), hue=u(k[7], -h, h),
              order=jnp.argsort(jax.random.uniform(k[8], (4,))),
              sigma=u(k[9], r['blur_sigma'][0], r['blur_sigma'][1]))


def decisions(key, batch_size: int, recipe: Mapping[str, Any]) -> dict:
  """:func:`example_decisions` of each of ``batch_size`` examples (leading axis), as :func:`apply_colour_ops`
  draws them for ``key``."""
  return jax.vmap(lambda k: example_decisions(k, recipe))(jax.random.split(key, batch_size))


def _colour_one(image, d: dict, r: dict):
  """The colour ops on one image [H, W, C] in [0, 1] with the draws ``d`` of :func:`example_decisions`."""
  rgb = image.shape[-1] == 3
  b, c, s, h = r['jitter']
  identity = lambda x: x  # noqa: E731  (an op of strength 0, or saturation/hue on 1 channel)
  ops = [(lambda x: adjust_brightness(x, d['brightness'])) if b else identity,
         (lambda x: adjust_contrast(x, d['contrast'])) if c else identity,
         (lambda x: adjust_saturation(x, d['saturation'])) if s and rgb else identity,
         (lambda x: adjust_hue(x, d['hue'])) if h and rgb else identity]

  if r['jitter_p'] > 0:
    jittered = image
    for i in range(4):
      jittered = jax.lax.switch(d['order'][i], ops, jittered)
    image = jnp.where(d['jitter'], jittered, image)
  if r['gray_p'] > 0:
    image = jnp.where(d['gray'], grayscale(image), image)
  if r['blur_p'] > 0:
    blurred = gaussian_blur(image, d['sigma'], r['blur_kernel_fraction'], r['blur_sigma'][1])
    image = jnp.where(d['blur'], blurred, image)
  if r['solarize_p'] > 0:
    image = jnp.where(d['solarize'], solarize(image), image)
  if r['mean'] is not None:
    image = normalize(image, r['mean'], r['std'])
  return image


def apply_colour_ops_per_example(images, keys, recipe: Mapping[str, Any]):
  """:func:`apply_colour_ops` with one key per example (``keys`` [B]), e.g. keys derived from the examples'
  global positions so the result does not depend on how the batch is split over devices."""
  r = device_recipe(recipe)
  images = from_uint8(images)
  return jax.vmap(lambda x, k: _colour_one(x, example_decisions(k, r), r))(images, keys)


def apply_colour_ops(images, key, recipe: Mapping[str, Any]):
  """The colour part of ``recipe`` (keys of :data:`recipes.RECIPE_DEFAULTS`) on a batch ``images`` [B, H, W, C]
  (float in [0, 1], or uint8 0–255) with per-example randomness from ``jax.random.split(key, B)``: colour jitter
  (p ``jitter_p``, random op order), grayscale (``gray_p``), Gaussian blur (``blur_p``), solarize
  (``solarize_p``), normalisation (``mean``/``std``); jitter and grayscale not when ``colour_first`` (the host's,
  :func:`host_recipe`). Returns float32 [B, H, W, C]."""
  return apply_colour_ops_per_example(images, jax.random.split(key, images.shape[0]), recipe)
