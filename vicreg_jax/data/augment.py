"""Stateless tf.image augmentations for two-view self-supervised pipelines.

Every op takes a float32 image [H, W, C] with values in [0, 1] and a stateless ``seed`` (an int32/int64
tensor of shape [2]); the same (image, seed) always gives the same output, eagerly and inside ``tf.data``.
A view's recipe is a plain dict (see :func:`augment_view`), so configs can state the official ImageNet recipe
and a small-image one side by side.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _maybe(seed, p: float, fn, image):
  """Applies ``fn(image)`` with probability ``p`` (decided by ``seed``)."""
  if p <= 0:
    return image
  if p >= 1:
    return fn(image)
  return tf.cond(_uniform(seed) < p, lambda: fn(image), lambda: image)


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = 'bicubic'):
  """Crops a random area fraction in ``scale`` and aspect ratio in ``ratio``, resized to ``size``×``size``.

  The box comes from ``tf.image.stateless_sample_distorted_bounding_box`` (10 attempts; the whole image if
  none fits). Bicubic output is clipped back to [0, 1].
  """
  shape = tf.shape(image)
  begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, box_size)
  out = tf.image.resize(crop, (size, size), method=method, antialias=False)
  out.set_shape([size, size, image.shape[-1]])
  return tf.clip_by_value(out, 0.0, 1.0)


def random_flip(image, seed, p: float = 0.5):
  """Horizontal flip with probability ``p``."""
  return _maybe(seed, p, tf.image.flip_left_right, image)


def _grayscale(image):
  """ITU-R 601 luma, kept with the input's channel count."""
  if image.shape[-1] == 1:
    return image
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, image.shape[-1]])


def _blend(a, b, factor):
  return tf.clip_by_value(b + factor * (a - b), 0.0, 1.0)


def color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
  """torchvision ``ColorJitter``: the four adjustments in a random order, each factor drawn uniformly.

  brightness: x·f, f ~ U[1-b, 1+b]; contrast: blend with the mean gray level, f ~ U[1-c, 1+c];
  saturation: blend with the grayscale image, f ~ U[1-s, 1+s]; hue: shift by U[-h, h] of the colour
  circle. Saturation and hue are skipped for 1-channel images.
  """
  seeds = tf.random.experimental.stateless_split(seed, 5)
  rgb = image.shape[-1] == 3

  def f_brightness(x):
    return tf.clip_by_value(x * _uniform(seeds[0], 1 - brightness, 1 + brightness), 0.0, 1.0)

  def f_contrast(x):
    mean = tf.reduce_mean(_grayscale(x))
    return _blend(x, mean, _uniform(seeds[1], 1 - contrast, 1 + contrast))

  def f_saturation(x):
    return _blend(x, _grayscale(x), _uniform(seeds[2], 1 - saturation, 1 + saturation)) if rgb else x

  def f_hue(x):
    return tf.clip_by_value(tf.image.adjust_hue(x, _uniform(seeds[3], -hue, hue)), 0.0, 1.0) if rgb else x

  ops = [f_brightness, f_contrast, f_saturation, f_hue]
  order = tf.argsort(_uniform(seeds[4], shape=(4,)))
  for i in range(4):
    image = tf.switch_case(order[i], [lambda f=f: f(image) for f in ops])
  return image


def gaussian_blur(image, seed, sigma=(0.1, 2.0), kernel_fraction: float = 0.1):
  """Separable Gaussian blur, σ ~ U[sigma], kernel side ≈ ``kernel_fraction`` of the image side (odd)."""
  side = image.shape[0] or tf.shape(image)[0]
  radius = max(1, int(round(kernel_fraction * side / 2))) if isinstance(side, int) else 1
  s = _uniform(seed, sigma[0], sigma[1])
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * (x / s)**2)
  k /= tf.reduce_sum(k)
  c = image.shape[-1]
  kh = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, c, 1])
  kw = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
  x4 = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='REFLECT')
  x4 = tf.nn.depthwise_conv2d(x4, kh, [1, 1, 1, 1], 'VALID')
  x4 = tf.nn.depthwise_conv2d(x4, kw, [1, 1, 1, 1], 'VALID')
  return x4[0]


def solarize(image, threshold: float = 0.5):
  """PIL ``ImageOps.solarize``: values at or above ``threshold`` are inverted."""
  return tf.where(image >= threshold, 1.0 - image, image)


def random_translate(image, seed, pad: int):
  """Pads ``pad`` pixels of zeros on every side and crops back to the original size at a random offset."""
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  out = tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)
  out.set_shape(image.shape)
  return out


def random_affine(image, seed, degrees: float = 0.0, scale=(1.0, 1.0), shear: float = 0.0):
  """Rotation by U[-degrees, degrees], isotropic zoom by U[scale], shear by U[-shear, shear] degrees, about
  the image centre, bilinear, zeros outside (the classic augmentation for handwritten digits)."""
  s = tf.random.experimental.stateless_split(seed, 3)
  rad = 3.141592653589793 / 180.0
  a = _uniform(s[0], -degrees, degrees) * rad
  k = _uniform(s[1], scale[0], scale[1])
  sh = _uniform(s[2], -shear, shear) * rad
  # Output pixel (x, y) samples input at M·(x - c) + c, M the inverse of zoom·rotation·shear.
  cos, sin, tan = tf.cos(a), tf.sin(a), tf.tan(sh)
  m00, m01 = cos / k, (sin + cos * tan) / k
  m10, m11 = -sin / k, (cos - sin * tan) / k
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  transform = tf.stack([m00, m01, cx - m00 * cx - m01 * cy, m10, m11, cy - m10 * cx - m11 * cy, 0.0, 0.0])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2], fill_value=0.0,
      interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  out.set_shape(image.shape)
  return out


def normalize(image, mean: Sequence[float], std: Sequence[float]):
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# Keys of a view recipe and their "off" values.
RECIPE_DEFAULTS: dict[str, Any] = dict(
    crop_size=0,            # random resized crop to this side (0: no crop)
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    crop_method='bicubic',
    translate=0,            # pad-and-crop shift in pixels (small images)
    affine_degrees=0.0,     # random rotation / zoom / shear (small images, digits)
    affine_scale=(1.0, 1.0),
    affine_shear=0.0,
    flip_p=0.0,
    jitter_p=0.0,
    jitter=(0.4, 0.4, 0.2, 0.1),  # brightness, contrast, saturation, hue
    gray_p=0.0,
    blur_p=0.0,
    blur_sigma=(0.1, 2.0),
    blur_kernel_fraction=0.1,
    solarize_p=0.0,
    mean=None,              # normalisation; None leaves [0, 1] values
    std=None,
)


def augment_view(image, seed, recipe: Mapping[str, Any]):
  """One augmented view of ``image`` (float [H, W, C] in [0, 1]) following ``recipe`` (keys of
  :data:`RECIPE_DEFAULTS`), in the official order: crop, flip, colour jitter, grayscale, blur, solarize,
  normalise. Small-image recipes may add a random affine map and a pixel shift after the crop."""
  unknown = set(recipe) - set(RECIPE_DEFAULTS)
  if unknown:
    raise ValueError(f'Unknown augmentation keys {sorted(unknown)}; known: {sorted(RECIPE_DEFAULTS)}.')
  r = {**RECIPE_DEFAULTS, **recipe}
  s = tf.random.experimental.stateless_split(seed, 10)
  if r['crop_size']:
    image = random_resized_crop(image, s[0], r['crop_size'], r['crop_scale'], r['crop_ratio'], r['crop_method'])
  if r['affine_degrees'] or r['affine_shear'] or tuple(r['affine_scale']) != (1.0, 1.0):
    image = random_affine(image, s[9], r['affine_degrees'], r['affine_scale'], r['affine_shear'])
  if r['translate']:
    image = random_translate(image, s[1], r['translate'])
  image = random_flip(image, s[2], r['flip_p'])
  image = _maybe(s[3], r['jitter_p'], lambda x: color_jitter(x, s[4], *r['jitter']), image)
  image = _maybe(s[5], r['gray_p'], _grayscale, image)
  image = _maybe(s[6], r['blur_p'],
                 lambda x: gaussian_blur(x, s[7], r['blur_sigma'], r['blur_kernel_fraction']), image)
  image = _maybe(s[8], r['solarize_p'], solarize, image)
  if r['mean'] is not None:
    image = normalize(image, r['mean'], r['std'])
  return image
