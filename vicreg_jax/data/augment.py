"""Stateless tf.image augmentations for two-view self-supervised pipelines.

Every op takes a float32 image [H, W, C] with values in [0, 1] and a stateless ``seed`` (an int32/int64
tensor of shape [2]); the same (image, seed) always gives the same output, eagerly and inside ``tf.data``.
A view's recipe is a plain dict (see :func:`augment_view`), so configs can state the official ImageNet recipe
and a small-image one side by side.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from vicreg_jax import errors

from vicreg_jax.data.recipes import blur_radius, full_recipe


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _coin(seed, p: float):
  """A boolean that is True with probability ``p`` (decided by ``seed``; constant when p is 0 or 1)."""
  if p <= 0:
    return tf.constant(False)
  if p >= 1:
    return tf.constant(True)
  return _uniform(seed) < p


def _maybe(seed, p: float, fn, image):
  """Applies ``fn(image)`` with probability ``p`` (decided by ``seed`` through :func:`_coin`)."""
  if p <= 0:
    return image
  if p >= 1:
    return fn(image)
  return tf.cond(_coin(seed, p), lambda: fn(image), lambda: image)


def _pairs(pairs, batch: tuple) -> tuple:
  """``pairs`` (one (lo, hi) pair, or an array [..., 2] of them) as float64 arrays lo, hi, log lo, log hi,
  min, max, each [..., 1] broadcast to ``batch`` + (1,); the logs by Python's ``math.log`` (torchvision's)."""
  p = np.broadcast_to(np.asarray(pairs, np.float64), batch + (2,))
  logs = np.vectorize(math.log)(p)
  cols = (p[..., 0], p[..., 1], logs[..., 0], logs[..., 1], p.min(-1), p.max(-1))
  return tuple(tf.constant(np.asarray(c, np.float64)[..., None]) for c in cols)


def crop_window_from_uniforms(shape, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's ``RandomResizedCrop.get_params`` as a function of its random draws ``u`` (float [..., 22] in
  [0, 1)): the window ``[..., 4]`` = ``[y, x, h, w]`` (int32) for an image of ``shape`` [H, W, ...]; ``scale``
  and ``ratio`` are one pair or one pair per window ([..., 2]).

  Ten tries t = 0…9: target area ``H·W·U(scale)`` (``u[t]``), aspect ratio ``exp(U(log ratio))`` (``u[10 + t]``),
  ``w = round(sqrt(area·ratio))``, ``h = round(sqrt(area/ratio))`` (round half to even, as Python's); the
  first try with ``0 < w ≤ W`` and ``0 < h ≤ H`` wins, at offsets ``y = floor(u[20]·(H - h + 1))`` and
  ``x = floor(u[21]·(W - w + 1))`` (uniform over every position, both edges included). If none fits: the central
  crop with the aspect ratio clamped into ``ratio`` (the whole image when its ratio is inside). Computed in
  float64, so the rounding is that of torchvision's Python floats.
  """
  shape = tf.cast(shape, tf.int32)
  height, width = shape[0], shape[1]
  hf, wf = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  u = tf.cast(u, tf.float64)
  batch = tuple(u.shape[:-1])
  s_lo, s_hi, _, _, _, _ = _pairs(scale, batch)
  _, _, log_lo, log_hi, r_min, r_max = _pairs(ratio, batch)
  area = hf * wf * (s_lo + (s_hi - s_lo) * u[..., :10])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., 10:20])
  w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.one_hot(tf.argmax(tf.cast(fits, tf.int32), -1), 10, dtype=tf.int32)  # try 0 when none fits (unused)
  h_t, w_t = tf.reduce_sum(h * first, -1), tf.reduce_sum(w * first, -1)
  y = tf.cast(tf.floor(u[..., 20] * tf.cast(height - h_t + 1, tf.float64)), tf.int32)
  x = tf.cast(tf.floor(u[..., 21] * tf.cast(width - w_t + 1, tf.float64)), tf.int32)
  found = tf.stack([y, x, h_t, w_t], -1)
  in_ratio = wf / hf  # torchvision's fallback: clamp the aspect ratio, keep the limiting side whole, centre
  fh = tf.where(in_ratio < r_min[..., 0], tf.cast(tf.round(wf / r_min[..., 0]), tf.int32), height)
  fw = tf.where(in_ratio > r_max[..., 0], tf.cast(tf.round(hf * r_max[..., 0]), tf.int32), width)
  fallback = tf.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], -1)
  return tf.where(tf.reduce_any(fits, -1, keepdims=True), found, fallback)


def crop_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """The random-resized-crop window ``[y, x, h, w]`` (int32) for an image of ``shape`` [H, W, ...]: torchvision's
  sampler (:func:`crop_window_from_uniforms`) on 22 stateless uniforms drawn from ``seed``."""
  u = tf.random.stateless_uniform([22], seed=seed, dtype=tf.float64)
  return crop_window_from_uniforms(shape, u, scale, ratio)


def crop_windows(shape, seeds, scales, ratios):
  """:func:`crop_window` for several ``seeds`` (with their ``scales`` and ``ratios`` pairs) at once: int32 [k, 4],
  row i equal to ``crop_window(shape, seeds[i], scales[i], ratios[i])`` (one vectorised computation)."""
  u = tf.stack([tf.random.stateless_uniform([22], seed=seed, dtype=tf.float64) for seed in seeds])
  return crop_window_from_uniforms(shape, u, np.asarray(scales, np.float64), np.asarray(ratios, np.float64))


def _keys_cubic(x):
  """Keys' cubic convolution kernel with a = -0.5 (PIL's and tf.image's bicubic), support [-2, 2]."""
  x = tf.abs(x)
  outer = tf.where(x < 2.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, 0.0)
  return tf.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1.0, outer)


def _triangle(x):
  """The bilinear (tent) kernel, support [-1, 1]."""
  return tf.maximum(1.0 - tf.abs(x), 0.0)


# Antialiased resampling kernels (PIL's ImagingResample filters, tf.image's antialias kernels): kernel, support.
_KERNELS = {'bicubic': (_keys_cubic, 2.0), 'bilinear': (_triangle, 1.0)}
_BAND = 16  # output pixels per block of the banded resampling matrix (fastest of 8-56 on one CPU thread)


def _band_weights(n_in, n_out: int, method: str, factor: float):
  """The antialiased resampling of an axis of ``n_in`` pixels to ``n_out`` with ``method``'s kernel, as PIL
  computes it: output pixel j centred at c = (j + 0.5)·s (s = n_in/n_out) reads the inputs i in
  [floor(c - r + 0.5), floor(c + r + 0.5)) clipped to the axis, r = support·max(s, 1), with weights
  kernel((i - c + 0.5)/max(s, 1)) normalised to sum ``factor``. As a block-banded matrix: per block of
  :data:`_BAND` outputs (the last one padded with zero rows) the positions ``idx`` [nb, L] it reads (clipped to
  the axis) and the weights ``w`` [nb, _BAND, L] (zero outside each output's span), computed in float64 (so
  eager and graph execution, whose float32 kernels may round differently, give the same float32 weights)."""
  kernel, support = _KERNELS[method]
  nb = -(-n_out // _BAND)
  scale = tf.cast(n_in, tf.float64) / n_out
  stretch = tf.maximum(scale, 1.0)
  radius = support * stretch
  centre = (tf.range(nb * _BAND, dtype=tf.float64) + 0.5) * scale
  lo = tf.maximum(tf.cast(tf.floor(centre - radius + 0.5), tf.int32), 0)
  hi = tf.minimum(tf.cast(tf.floor(centre + radius + 0.5), tf.int32), n_in)
  length = tf.cast(tf.math.ceil(_BAND * scale + 2.0 * radius), tf.int32) + 2  # covers every span in a block
  pos = tf.reshape(lo, [nb, _BAND])[:, :1] + tf.range(length)[None, :]
  at = pos[:, None, :]  # [nb, 1, L]
  w = kernel((tf.cast(at, tf.float64) - tf.reshape(centre, [nb, _BAND, 1]) + 0.5) / stretch)
  w = tf.where((at >= tf.reshape(lo, [nb, _BAND, 1])) & (at < tf.reshape(hi, [nb, _BAND, 1])), w, 0.0)
  w = tf.math.divide_no_nan(w * factor, tf.reduce_sum(w, -1, keepdims=True))  # padded rows: all zero
  return tf.minimum(pos, n_in - 1), tf.cast(w, tf.float32)


def _resample_rows(x, n_out: int, method: str, factor: float = 1.0):
  """``x`` [n, m] (uint8 or float) resampled along its first axis to float32 [``n_out``, m]
  (:func:`_band_weights`: one gather and one batched matrix product)."""
  idx, w = _band_weights(tf.shape(x)[0], n_out, method, factor)
  return tf.reshape(w @ tf.cast(tf.gather(x, idx), tf.float32), [-1, tf.shape(x)[1]])[:n_out]


def _resize(crop, size: int, method: str, channels):
  """``crop`` (float32 in [0, 1], or uint8) resized to ``size``×``size`` as float32 in [0, 1], antialiased when
  shrinking (as PIL, which torchvision resizes with). Bicubic and bilinear: separable block-banded matrix
  products (:func:`_band_weights`; tf.image.resize's values to float rounding, in about 0.6 of its time on one
  CPU thread with TensorFlow's oneDNN kernels); other methods: ``tf.image.resize``."""
  if method not in _KERNELS:
    out = tf.image.resize(tf.image.convert_image_dtype(crop, tf.float32), (size, size), method=method,
                          antialias=True)
  else:
    h, w = tf.shape(crop)[0], tf.shape(crop)[1]
    y = _resample_rows(tf.reshape(crop, [h, w * channels]), size, method)  # rows first: [size, w·C]
    y = tf.reshape(tf.transpose(tf.reshape(y, [size, w, channels]), [1, 0, 2]), [w, size * channels])
    out = _resample_rows(y, size, method, 1 / 255 if crop.dtype == tf.uint8 else 1.0)  # [size (x), size (y)·C]
    out = tf.transpose(tf.reshape(out, [size, size, channels]), [1, 0, 2])
  out.set_shape([size, size, channels])
  return tf.clip_by_value(out, 0.0, 1.0)


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = 'bicubic'):
  """Crops the window of :func:`crop_window` (area fraction in ``scale``, aspect ratio in ``ratio``, torchvision's
  centre-crop fallback) and resizes it to ``size``×``size``; bicubic output is clipped back to [0, 1]."""
  return _resize(_crop(image, crop_window(tf.shape(image), seed, scale, ratio)), size, method, image.shape[-1])


def _crop(image, win):
  """The window ``[y, x, h, w]`` of ``image``."""
  return tf.slice(image, tf.stack([win[0], win[1], 0]), tf.stack([win[2], win[3], -1]))


def decode(image_bytes, channels: int = 3):
  """Decodes JPEG/PNG/GIF/BMP bytes (whatever the file name says) to float32 [H, W, ``channels``] in [0, 1]
  (first frame of an animation). For 3 channels grayscale is repeated, alpha dropped, CMYK JPEG converted to
  RGB; 16-bit PNG is decoded at 8 bits (the high byte: 65535 -> 1.0). Bytes that are no image, or a truncated
  JPEG, raise ``InvalidArgumentError`` (the pipelines replace or mask such files)."""
  image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return tf.image.convert_image_dtype(image, tf.float32)


def decode_crops(image_bytes, windows, channels: int = 3, dtype=tf.float32) -> list:
  """The crops ``windows(shape) -> [k, 4]`` (``[y, x, h, w]`` rows, from the image's [H, W, ...] shape) of
  encoded image bytes, float32 in [0, 1] (``dtype`` uint8: as decoded, 0-255). JPEG: only the union of the
  windows is decoded (the header gives the shape; ``decode_and_crop_jpeg``), so every crop is cut from one
  partial decode (a truncated JPEG raises only if the union reaches past its end). Other formats are decoded
  whole."""

  def jpeg():
    wins = windows(tf.image.extract_jpeg_shape(image_bytes))
    top, bottom = tf.reduce_min(wins[:, :2], 0), tf.reduce_max(wins[:, :2] + wins[:, 2:], 0)
    union = tf.image.decode_and_crop_jpeg(image_bytes, tf.concat([top, bottom - top], 0), channels=channels)
    return union, wins - tf.concat([top, [0, 0]], 0)

  def other():
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    return image, windows(tf.shape(image))

  # Cropped while still uint8: a large PNG is converted to float only inside its windows (4x less memory).
  image, wins = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, channels])
  return [tf.image.convert_image_dtype(_crop(image, wins[i]), dtype) for i in range(wins.shape[0])]


def decode_random_resized_crop(image_bytes, seed, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               method: str = 'bicubic', channels: int = 3):
  """:func:`random_resized_crop` of encoded image bytes, float32 [``size``, ``size``, ``channels``] in [0, 1].

  JPEG: the window is drawn from the header's shape (``extract_jpeg_shape``) and only that window is decoded
  (``decode_and_crop_jpeg``). Other formats are decoded whole, then cropped. Same ``seed``, same window as
  :func:`random_resized_crop` on the decoded image.
  """
  [crop] = decode_crops(image_bytes, lambda shape: crop_window(shape, seed, scale, ratio)[None], channels, tf.uint8)
  return _resize(crop, size, method, channels)


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
  ops = [lambda x: _jitter_brightness(x, seeds[0], brightness), lambda x: _jitter_contrast(x, seeds[1], contrast),
         lambda x: _jitter_saturation(x, seeds[2], saturation, rgb), lambda x: _jitter_hue(x, seeds[3], hue, rgb)]
  order = tf.argsort(_uniform(seeds[4], shape=(4,)))
  for i in range(4):
    image = tf.switch_case(order[i], [lambda f=f: f(image) for f in ops])
  return image


def _jitter_brightness(x, seed, brightness):
  return tf.clip_by_value(x * _uniform(seed, 1 - brightness, 1 + brightness), 0.0, 1.0)


def _jitter_contrast(x, seed, contrast):
  mean = tf.reduce_mean(_grayscale(x))
  return _blend(x, mean, _uniform(seed, 1 - contrast, 1 + contrast))


def _jitter_saturation(x, seed, saturation, rgb: bool):
  return _blend(x, _grayscale(x), _uniform(seed, 1 - saturation, 1 + saturation)) if rgb else x


def _jitter_hue(x, seed, hue, rgb: bool):
  return tf.clip_by_value(tf.image.adjust_hue(x, _uniform(seed, -hue, hue)), 0.0, 1.0) if rgb else x


def _blur_rows(x, k, radius: int):
  """``x`` [n, m] convolved along its first axis with the taps ``k`` [2·radius + 1], reflect padding (mirror
  without repeating the edge, as ``tf.pad``'s REFLECT; radius < n): one gather and one batched matrix product
  per block of :data:`_BAND` rows, as :func:`_resample_rows`."""
  n, length = tf.shape(x)[0], _BAND + 2 * radius
  nb = (n + _BAND - 1) // _BAND
  pos = tf.abs(tf.range(nb)[:, None] * _BAND + tf.range(length)[None, :] - radius)
  pos = tf.clip_by_value(tf.where(pos > n - 1, 2 * (n - 1) - pos, pos), 0, n - 1)  # reflected (padding rows: any)
  lag = tf.range(length)[None, :] - tf.range(_BAND)[:, None]  # [BAND, L]: tap t - j of output j
  w = tf.where((lag >= 0) & (lag <= 2 * radius), tf.gather(k, tf.clip_by_value(lag, 0, 2 * radius)), 0.0)
  return tf.reshape(w @ tf.gather(x, pos), [-1, tf.shape(x)[1]])[:n]


def gaussian_blur(image, seed, sigma=(0.1, 2.0), kernel_fraction: float = 0.1):
  """Separable Gaussian blur, σ ~ U[sigma] pixels, reflect padding, kernel side 2r + 1 with
  r = :func:`recipes.blur_radius`: about ``kernel_fraction`` of the image side, or for ``kernel_fraction`` 0
  ceil(3·sigma[1]) pixels whatever the side (PIL's ``GaussianBlur(radius=σ)``, as SwAV and W-MSE). Each pass
  is a banded matrix product (:func:`_blur_rows`), not a depthwise convolution: TensorFlow's CPU depthwise
  convolution is about 7× slower without oneDNN, which TensorFlow enables only on some CPUs."""
  radius = blur_radius(image.shape[0], kernel_fraction, sigma[1])
  s = _uniform(seed, sigma[0], sigma[1])
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * (x / s)**2)
  k /= tf.reduce_sum(k)
  h, w, c = tf.shape(image)[0], tf.shape(image)[1], image.shape[-1]
  out = _blur_rows(tf.reshape(image, [h, w * c]), k, radius)  # down the columns
  out = _blur_rows(tf.reshape(tf.transpose(tf.reshape(out, [h, w, c]), [1, 0, 2]), [w, h * c]), k, radius)
  out = tf.transpose(tf.reshape(out, [w, h, c]), [1, 0, 2])
  out.set_shape(image.shape)
  return out


def solarize(image, threshold: float = 0.5):
  """PIL ``ImageOps.solarize``: values at or above ``threshold`` are inverted."""
  if threshold == 0.5:  # the same values as the select below, about 6x faster on CPU (no broadcast select)
    return tf.minimum(image, 1.0 - image)
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


def gaussian_noise(image, seed, std: float):
  """``image`` plus independent N(0, ``std``²) noise on every pixel (not clipped)."""
  return image + std * tf.random.stateless_normal(tf.shape(image), seed=seed, dtype=image.dtype)


def cutout(image, seed, size: int):
  """``image`` with a ``size``×``size`` square set to zero, its top-left corner uniform over the positions where
  it fits inside the image."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  corner = tf.random.stateless_uniform([2], seed=seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
  y, x = corner[0] % (h - size + 1), corner[1] % (w - size + 1)
  rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
  inside = (rows >= y) & (rows < y + size) & (cols >= x) & (cols < x + size)
  return tf.where(inside[..., None], tf.zeros_like(image), image)


def normalize(image, mean: Sequence[float], std: Sequence[float]):
  """``(image - mean) / std`` per channel (as a per-channel scale and ``bias_add``: CPU broadcasting is slow)."""
  scale = tf.constant([1.0 / s for s in std], tf.float32)
  bias = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  shape = tf.shape(image)
  flat = tf.reshape(image, [-1, shape[-1]]) @ tf.linalg.diag(scale)
  out = tf.nn.bias_add(tf.reshape(flat, shape), bias)
  out.set_shape(image.shape)
  return out


# Which of a view's 10 sub-seeds feeds which op (shared by augment_view and view_decisions).
_CROP, _TRANSLATE, _FLIP, _JITTER_P, _JITTER, _GRAY, _BLUR_P, _BLUR, _SOLARIZE, _AFFINE = range(10)


def view_decisions(seed, recipe: Mapping[str, Any]) -> dict:
  """The coin flips :func:`augment_view` makes for ``seed``: booleans ``flip``, ``jitter``, ``gray``, ``blur``,
  ``solarize`` (the same sub-seeds, so rates measured here are the pipeline's rates)."""
  r = full_recipe(recipe)
  s = tf.random.experimental.stateless_split(seed, 10)
  return dict(flip=_coin(s[_FLIP], r['flip_p']), jitter=_coin(s[_JITTER_P], r['jitter_p']),
              gray=_coin(s[_GRAY], r['gray_p']), blur=_coin(s[_BLUR_P], r['blur_p']),
              solarize=_coin(s[_SOLARIZE], r['solarize_p']))


def augment_view(image, seed, recipe: Mapping[str, Any], channels: int = 3):
  """One augmented view of ``image`` following ``recipe`` (keys of :data:`recipes.RECIPE_DEFAULTS`), in the official
  order: crop, flip, colour jitter, grayscale, blur, solarize, normalise. Small-image recipes may add a random
  affine map and a pixel shift after the crop. With ``colour_first`` (W-MSE) jitter and grayscale come first, on
  the whole image, then the crop and the rest.

  ``image`` is float [H, W, C] in [0, 1], or encoded image bytes (a scalar string tensor), decoded to
  ``channels`` channels; with a crop in the recipe, JPEG bytes are decoded only inside the crop window
  (:func:`decode_random_resized_crop`), and the result equals the crop of the decoded image. With
  ``colour_first`` the image is decoded whole (the contrast blends with the whole image's mean gray).
  """
  r = full_recipe(recipe)
  s = tf.random.experimental.stateless_split(seed, 10)
  encoded = tf.as_dtype(image.dtype) == tf.string
  if colour_first(r):
    image = _colour(decode(image, channels) if encoded else image, s, r)
    encoded = False
  if r['crop_size'] and encoded:
    image = decode_random_resized_crop(image, s[_CROP], r['crop_size'], r['crop_scale'], r['crop_ratio'],
                                       r['crop_method'], channels)
  else:
    if encoded:
      image = decode(image, channels)
    if r['crop_size']:
      image = random_resized_crop(image, s[_CROP], r['crop_size'], r['crop_scale'], r['crop_ratio'],
                                  r['crop_method'])
  return _after_crop(image, s, r)


def colour_first(recipe: Mapping[str, Any]) -> bool:
  """Whether ``recipe`` (a full recipe) jitters or grays the whole image before its crop (``colour_first`` with
  ``jitter_p`` or ``gray_p`` above 0)."""
  return bool(recipe['colour_first']) and (recipe['jitter_p'] > 0 or recipe['gray_p'] > 0)


def _colour(image, s, r):
  """Colour jitter (p ``jitter_p``) then grayscale (p ``gray_p``) with :func:`augment_view`'s sub-seeds ``s``."""
  image = _maybe(s[_JITTER_P], r['jitter_p'], lambda x: color_jitter(x, s[_JITTER], *r['jitter']), image)
  return _maybe(s[_GRAY], r['gray_p'], _grayscale, image)


def _after_crop(image, s, r):
  """The ops of :func:`augment_view` after the crop, with its sub-seeds ``s`` and full recipe ``r``."""
  if r['affine_degrees'] or r['affine_shear'] or tuple(r['affine_scale']) != (1.0, 1.0):
    image = random_affine(image, s[_AFFINE], r['affine_degrees'], r['affine_scale'], r['affine_shear'])
  if r['translate']:
    image = random_translate(image, s[_TRANSLATE], r['translate'])
  image = random_flip(image, s[_FLIP], r['flip_p'])
  if not colour_first(r):
    image = _colour(image, s, r)
  image = _maybe(s[_BLUR_P], r['blur_p'],
                 lambda x: gaussian_blur(x, s[_BLUR], r['blur_sigma'], r['blur_kernel_fraction']), image)
  image = _maybe(s[_SOLARIZE], r['solarize_p'], solarize, image)
  if r['noise_std']:
    image = gaussian_noise(image, tf.random.experimental.stateless_fold_in(s[_AFFINE], 1), r['noise_std'])
  if r['cutout_p'] and r['cutout_size']:
    cut_seed = tf.random.experimental.stateless_fold_in(s[_AFFINE], 2)
    image = _maybe(cut_seed, r['cutout_p'],
                   lambda x: cutout(x, tf.random.experimental.stateless_fold_in(cut_seed, 1), r['cutout_size']),
                   image)
  if r['mean'] is not None:
    image = normalize(image, r['mean'], r['std'])
  return image


def augment_views(image_bytes, seeds, recipes, channels: int = 3):
  """Several augmented views of one encoded image, decoding its JPEG once: the union of the views' crop
  windows is decoded (``decode_and_crop_jpeg``) and each view's window sliced from it.

  Same windows, flips and colour draws as :func:`augment_view` with the same seeds (pixels may differ
  slightly at window edges, where a cropped JPEG decode lacks the neighbouring blocks). Needs a crop in every
  recipe; non-JPEG bytes are decoded whole. When a recipe has ``colour_first``, the image is decoded whole, once,
  and every view is :func:`augment_view` of it (then equal to augment_view of the bytes for colour_first views).
  """
  rs = [full_recipe(r) for r in recipes]
  if not all(r['crop_size'] for r in rs):
    raise errors.ConfigError('augment_views needs a random resized crop in every recipe')
  if any(colour_first(r) for r in rs):
    whole = decode(image_bytes, channels)
    return [augment_view(whole, seed, r, channels) for seed, r in zip(seeds, rs)]
  subs = [tf.random.experimental.stateless_split(seed, 10) for seed in seeds]
  crops = decode_crops(image_bytes, lambda shape: crop_windows(shape, [s[_CROP] for s in subs],
                                                               [r['crop_scale'] for r in rs],
                                                               [r['crop_ratio'] for r in rs]), channels, tf.uint8)
  return [_after_crop(_resize(crop, r['crop_size'], r['crop_method'], channels), s, r)
          for crop, s, r in zip(crops, subs, rs)]
