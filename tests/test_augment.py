"""Augmentation ops: each op eagerly and inside a tf.data map (shape, dtype, range), the official recipe's coin
flips at their stated rates, the random-resized-crop window (fused with JPEG decoding or not) and its fallback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from vicreg_jax import config as schema
from vicreg_jax.data import augment, recipes

SIZE = 32
VIEW1, VIEW2 = schema.imagenet_views(SIZE)
IMAGE = tf.random.stateless_uniform((40, 48, 3), seed=[1, 2])
JPEG = tf.io.encode_jpeg(tf.image.convert_image_dtype(IMAGE, tf.uint8))
PNG = tf.io.encode_png(tf.image.convert_image_dtype(IMAGE, tf.uint8))
UNIT = (0.0, 1.0)
NORMALISED = ((0 - max(recipes.IMAGENET_MEAN)) / min(recipes.IMAGENET_STD),
              (1 - min(recipes.IMAGENET_MEAN)) / min(recipes.IMAGENET_STD))

# name: (fn(image, seed), input, output shape, value range)
OPS = {
    'random_resized_crop': (lambda x, s: augment.random_resized_crop(x, s, SIZE), IMAGE, (SIZE, SIZE, 3), UNIT),
    'decode_crop_jpeg': (lambda x, s: augment.decode_random_resized_crop(x, s, SIZE), JPEG, (SIZE, SIZE, 3), UNIT),
    'decode_crop_png': (lambda x, s: augment.decode_random_resized_crop(x, s, SIZE), PNG, (SIZE, SIZE, 3), UNIT),
    'decode': (lambda x, s: augment.decode(x), JPEG, (40, 48, 3), UNIT),
    'flip': (lambda x, s: augment.random_flip(x, s, 0.5), IMAGE, (40, 48, 3), UNIT),
    'color_jitter': (lambda x, s: augment.color_jitter(x, s), IMAGE, (40, 48, 3), UNIT),
    'grayscale': (lambda x, s: augment.augment_view(x, s, dict(gray_p=1.0)), IMAGE, (40, 48, 3), UNIT),
    'gaussian_blur': (lambda x, s: augment.gaussian_blur(x, s), IMAGE, (40, 48, 3), UNIT),
    'solarize': (lambda x, s: augment.solarize(x), IMAGE, (40, 48, 3), UNIT),
    'translate': (lambda x, s: augment.random_translate(x, s, 4), IMAGE, (40, 48, 3), UNIT),
    'affine': (lambda x, s: augment.random_affine(x, s, 30.0, (0.8, 1.2), 10.0), IMAGE, (40, 48, 3), UNIT),
    'normalize': (lambda x, s: augment.normalize(x, recipes.IMAGENET_MEAN, recipes.IMAGENET_STD), IMAGE,
                  (40, 48, 3), NORMALISED),
    'view1': (lambda x, s: augment.augment_view(x, s, VIEW1), IMAGE, (SIZE, SIZE, 3), NORMALISED),
    'view2': (lambda x, s: augment.augment_view(x, s, VIEW2), IMAGE, (SIZE, SIZE, 3), NORMALISED),
    'view2_from_jpeg': (lambda x, s: augment.augment_view(x, s, VIEW2), JPEG, (SIZE, SIZE, 3), NORMALISED),
}


@pytest.mark.parametrize('name', sorted(OPS))
def test_op_eagerly_and_in_tf_data(name):
  fn, x, shape, (lo, hi) = OPS[name]
  seeds = tf.constant([[i, 7] for i in range(4)], tf.int64)
  eager = np.stack([fn(x, s).numpy() for s in seeds])
  mapped = np.stack(list(tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: fn(x, s)).as_numpy_iterator()))
  for out in (eager, mapped):
    assert out.shape == (4,) + shape and out.dtype == np.float32
    assert lo - 1e-5 <= out.min() and out.max() <= hi + 1e-5
  np.testing.assert_allclose(eager, mapped, atol=1e-4)


def _decisions(recipe, n=2000):
  seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([tf.constant(11, tf.int64), i]))
  out = list(seeds.map(lambda s: augment.view_decisions(s, recipe)).batch(n).as_numpy_iterator())[0]
  return {k: v.mean() for k, v in out.items()}


def test_official_recipe_rates():
  """Rates of the coin flips augment_view makes (2,000 draws each; same sub-seeds as augment_view)."""
  r1, r2 = _decisions(VIEW1), _decisions(VIEW2)
  for r in (r1, r2):
    assert abs(r['flip'] - 0.5) <= 0.03 and abs(r['jitter'] - 0.8) <= 0.03 and abs(r['gray'] - 0.2) <= 0.03
  assert r1['blur'] == 1.0 and r1['solarize'] == 0.0
  assert abs(r2['blur'] - 0.1) <= 0.03 and abs(r2['solarize'] - 0.2) <= 0.03


@pytest.mark.parametrize('op', ['flip', 'jitter', 'gray', 'blur', 'solarize'])
def test_view_decisions_are_the_ops_that_fire(op):
  """Turning one op off changes the view exactly for the seeds whose decision says that op fired."""
  recipe = dict(VIEW2, mean=None, std=None, blur_p=0.5, blur_sigma=(1.0, 2.0))  # sigma 0.1 is ~identity
  off = dict(recipe, **{f'{op}_p': 0.0})
  fn = tf.function(lambda s: (augment.augment_view(IMAGE, s, recipe), augment.augment_view(IMAGE, s, off),
                              augment.view_decisions(s, recipe)[op]))
  fired = []
  for i in range(60):
    a, b, d = fn(tf.constant([i, 3], tf.int64))
    assert (np.abs(a.numpy() - b.numpy()).max() > 1e-6) == bool(d)
    fired.append(bool(d))
  assert 0 < sum(fired) < 60


def test_grayscale_output_channels_equal_iff_decided():
  recipe = dict(VIEW1, mean=None, std=None)
  fn = tf.function(lambda s: (augment.augment_view(IMAGE, s, recipe), augment.view_decisions(s, recipe)['gray']))
  for i in range(40):
    v, gray = fn(tf.constant([i, 5], tf.int64))
    v = v.numpy()
    assert bool(gray) == (np.allclose(v[..., 0], v[..., 1], atol=1e-6) and np.allclose(v[..., 1], v[..., 2],
                                                                                       atol=1e-6))


def _windows(shape, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  ds = tf.data.Dataset.range(n).map(
      lambda i: augment.crop_window(tf.constant(shape), tf.stack([tf.constant(3, tf.int64), i]), scale, ratio))
  return np.stack(list(ds.as_numpy_iterator()))


def test_crop_window_statistics_on_imagenet_sized_images():
  h, w = 375, 500
  win = _windows([h, w, 3], 2000)
  y, x, ch, cw = win.T
  assert (y >= 0).all() and (x >= 0).all() and (y + ch <= h).all() and (x + cw <= w).all()
  area = ch * cw / (h * w)
  aspect = cw / ch
  assert area.min() >= 0.08 and area.max() <= 1.0
  assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02  # integer sides: rounding only
  assert 0.3 < area.mean() < 0.7 and area.max() > 0.9 and area.min() < 0.1  # the range is used
  assert len({tuple(v) for v in win}) > 1900  # windows differ from seed to seed


def torchvision_get_params(height, width, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """NumPy/Python transcription of torchvision's ``RandomResizedCrop.get_params`` (v0.20), its random draws
  replaced by the uniforms ``u``: u[t] for the area of try t, u[10 + t] for its log aspect ratio, u[20], u[21]
  for the offsets (torch.randint(0, n) as floor(u·n))."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for t in range(10):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t])
    aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + t])
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = int(math.floor(u[20] * (height - h + 1)))
      j = int(math.floor(u[21] * (width - w + 1)))
      return i, j, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w = width
    h = height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize('shape,scale', [((375, 500), (0.08, 1.0)), ((500, 375), (0.08, 1.0)),
                                         ((26, 400), (0.08, 1.0)), ((32, 32), (0.2, 1.0)), ((12, 400), (0.08, 1.0))])
def test_crop_sampler_is_torchvisions_on_the_same_draws(shape, scale):
  """Given the same uniforms, the TF sampler returns torchvision's window, window for window."""
  u = np.random.default_rng(sum(shape)).uniform(size=(2000, 22))
  fn = tf.function(lambda us: tf.map_fn(lambda x: augment.crop_window_from_uniforms(tf.constant(shape), x, scale),
                                        us, fn_output_signature=tf.int32))
  ours = fn(tf.constant(u)).numpy()
  theirs = np.array([torchvision_get_params(*shape, row, scale) for row in u])
  np.testing.assert_array_equal(ours, theirs)


def test_crop_sampler_distribution_matches_torchvision():
  """On a 500×375 image: mean area, share of crops under 0.3 of the area (within 0.01 of a transcription of
  torchvision's algorithm on NumPy's own random numbers), and windows touching every edge."""
  h, w = 375, 500
  win = _windows([h, w, 3], 20_000)
  rng = np.random.default_rng(0)
  ref = np.array([torchvision_get_params(h, w, rng.uniform(size=22)) for _ in range(20_000)])
  area, ref_area = win[:, 2] * win[:, 3] / (h * w), ref[:, 2] * ref[:, 3] / (h * w)
  assert abs(area.mean() - ref_area.mean()) < 0.01
  assert abs((area < 0.3).mean() - (ref_area < 0.3).mean()) < 0.01
  y, x, ch, cw = win.T
  assert (y == 0).any() and (x == 0).any() and (y + ch == h).any() and (x + cw == w).any()


@pytest.mark.parametrize('shape,expected', [
    ((12, 400), [0, 192, 12, 16]),   # too wide: full height, width = round(12 · 4/3), centred
    ((400, 12), [192, 0, 16, 12]),   # too tall: full width, height = round(12 / (3/4)), centred
])
def test_crop_window_falls_back_to_torchvision_centre_crop(shape, expected):
  win = _windows(list(shape) + [3], 50)  # no crop of area ≥ 8% fits: every draw fails
  assert (win == expected).all()


def test_crop_window_on_an_extreme_aspect_image_is_valid_or_the_fallback():
  h, w = 26, 400  # an 8% crop of aspect ≤ 4/3 fits only for areas of 8–8.7% and ratios near 4/3: rare
  win = _windows([h, w, 3], 500)
  fallback = [0, (w - 35) // 2, 26, 35]
  is_fallback = (win == fallback).all(1)
  ok = win[~is_fallback]
  area, aspect = ok[:, 2] * ok[:, 3] / (h * w), ok[:, 3] / ok[:, 2]
  assert (area >= 0.08).all() and (aspect >= 3 / 4 - 0.03).all() and (aspect <= 4 / 3 + 0.03).all()
  assert 0 < is_fallback.sum() < 500  # both happen on this image
  # A whole-image window is valid when its aspect ratio is in range: not a failure, no fallback.
  assert (_windows([300, 300, 3], 200, scale=(1.0, 1.0)) == [0, 0, 300, 300]).all()


@pytest.mark.parametrize('shape', [(375, 500), (26, 400), (12, 400)])
def test_fused_jpeg_crop_equals_crop_of_decoded_image(shape):
  image = tf.image.convert_image_dtype(tf.random.stateless_uniform(shape + (3,), seed=[4, 4]), tf.uint8)
  jpeg = tf.io.encode_jpeg(image, quality=90)
  decoded = augment.decode(jpeg)
  for i in range(5):
    seed = tf.constant([i, 9], tf.int64)
    fused = augment.decode_random_resized_crop(jpeg, seed, 48)
    plain = augment.random_resized_crop(decoded, seed, 48)
    # Same window; libjpeg's cropped decode differs from the full decode only next to the window's edge
    # (chroma upsampling without the neighbours outside it), by a few levels.
    d = np.abs(fused.numpy() - plain.numpy())
    win = augment.crop_window(tf.shape(decoded), seed).numpy()
    edge = int(np.ceil(2 * 48 / min(win[2:]))) + 2  # two source pixels, in output pixels, + bicubic support
    assert d[edge:-edge, edge:-edge].max() <= 2 / 255 and d.mean() < 0.01
    # The whole view: the same ops on the same window (edge differences amplified by jitter and normalisation).
    diff = np.abs(augment.augment_view(jpeg, seed, VIEW2).numpy() - augment.augment_view(decoded, seed, VIEW2).numpy())
    assert diff.mean() < 0.03  # normalised units (1/std ≈ 4.4 per unit of pixel value)


def test_two_views_from_one_decode_equal_the_separate_views():
  """augment_views decodes the union of both crop windows once; each view equals augment_view with its seed
  (same window and draws; pixels only differ where the cropped decodes' edges differ)."""
  image = tf.image.convert_image_dtype(tf.random.stateless_uniform((375, 500, 3), seed=[5, 5]), tf.uint8)
  image = tf.cast(tf.image.resize(tf.image.resize(image, (24, 32)), (375, 500)), tf.uint8)  # smooth content
  jpeg = tf.io.encode_jpeg(image, quality=90)
  decoded = augment.decode(jpeg)
  for i in range(6):
    seeds = (tf.constant([i, 1], tf.int64), tf.constant([i, 2], tf.int64))
    both = augment.augment_views(jpeg, seeds, (VIEW1, VIEW2))
    for view, seed, recipe in zip(both, seeds, (VIEW1, VIEW2)):
      assert view.shape == (SIZE, SIZE, 3)
      diff = np.abs(view.numpy() - augment.augment_view(decoded, seed, recipe).numpy())
      assert diff.mean() < 0.03, (i, diff.mean())
  with pytest.raises(ValueError, match='crop'):
    augment.augment_views(jpeg, seeds, (VIEW1, dict(VIEW2, crop_size=0)))
  png = tf.io.encode_png(image)  # not a JPEG: decoded whole, then the same windows
  for view, seed, recipe in zip(augment.augment_views(png, seeds, (VIEW1, VIEW2)), seeds, (VIEW1, VIEW2)):
    np.testing.assert_allclose(view.numpy(), augment.augment_view(augment.decode(png), seed,
                                                                  recipe).numpy(), atol=1e-5)


def test_cutout_zeroes_one_square_anywhere_inside():
  image = tf.ones((16, 16, 1))
  corners = set()
  for i in range(300):
    out = augment.cutout(image, tf.constant([i, 2], tf.int64), 3).numpy()[..., 0]
    ys, xs = np.nonzero(out == 0)
    assert len(ys) == 9 and ys.max() - ys.min() == 2 and xs.max() - xs.min() == 2  # one 3×3 square, inside
    corners.add((ys.min(), xs.min()))
  assert {c[0] for c in corners} == set(range(14)) and {c[1] for c in corners} == set(range(14))  # every row/col


def test_noise_and_cutout_in_a_view_recipe():
  image = tf.fill((16, 16, 1), 0.5)
  recipe = dict(noise_std=0.1, cutout_p=0.5, cutout_size=3)
  fn = tf.function(lambda s: augment.augment_view(image, s, recipe, channels=1))
  views = np.stack([fn(tf.constant([i, 7], tf.int64)).numpy() for i in range(200)])
  cut = (views == 0).reshape(200, -1).sum(1)
  assert 0.35 < np.mean(cut == 9) < 0.65 and set(cut) <= {0, 9}  # half the views have the square (noise ≠ 0)
  kept = views[cut == 0] - 0.5
  assert abs(kept.std() - 0.1) < 0.005 and abs(kept.mean()) < 0.005  # N(0, 0.1²), not clipped


@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
def test_banded_resize_equals_tf_image_resize(method):
  """The block-banded resize gives tf.image.resize(antialias=True)'s values (to float rounding): shrinking,
  enlarging, one axis each way, a 1-pixel side, an output side that is no multiple of the block, uint8 or float."""
  for k, (h, w, size) in enumerate([(277, 301, 224), (40, 30, 48), (300, 50, 96), (1, 7, 30), (17, 500, 224)]):
    u8 = tf.cast(tf.random.stateless_uniform((h, w, 3), seed=[k, 3], maxval=256, dtype=tf.int32), tf.uint8)
    ref = tf.clip_by_value(tf.image.resize(tf.image.convert_image_dtype(u8, tf.float32), (size, size), method,
                                           antialias=True), 0.0, 1.0).numpy()
    for crop in (u8, tf.image.convert_image_dtype(u8, tf.float32)):
      out = augment._resize(crop, size, method, 3)
      assert out.shape == (size, size, 3) and out.dtype == tf.float32
      np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, err_msg=f'{h}x{w}->{size} {crop.dtype}')


def test_crop_then_resize_is_pils_on_the_same_window():
  """A view's crop and resize against PIL's (torchvision's resized_crop: crop, then an antialiased bicubic
  resize) on the same windows, mean absolute difference per pixel (0-255): on PIL's decoded pixels under half a
  level (PIL rounds to uint8 between its two passes); from the JPEG under 1.5 levels (tf's default IDCT,
  INTEGER_FAST, differs from PIL's by about 1 level)."""
  from PIL import Image
  import io
  smooth = tf.image.resize(tf.random.stateless_uniform((12, 16, 3), seed=[2, 2], maxval=255.0), (375, 500),
                           'bicubic')
  noisy = smooth + tf.random.stateless_normal((375, 500, 3), seed=[3, 3], stddev=8.0)
  jpeg = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(noisy, 0, 255), tf.uint8), quality=90)
  pil = Image.open(io.BytesIO(jpeg.numpy())).convert('RGB')
  pixels = np.asarray(pil)
  for i in range(6):
    seed = tf.constant([i, 5], tf.int64)
    y, x, h, w = augment.crop_window(tf.constant([375, 500, 3]), seed).numpy().tolist()
    ref = np.asarray(pil.crop((x, y, x + w, y + h)).resize((224, 224), Image.BICUBIC), np.float32)
    same_pixels = augment._resize(tf.constant(pixels[y:y + h, x:x + w]), 224, 'bicubic', 3).numpy() * 255
    from_jpeg = augment.decode_random_resized_crop(jpeg, seed, 224).numpy() * 255
    assert np.abs(same_pixels - ref).mean() < 0.5 and np.abs(from_jpeg - ref).mean() < 1.5, (i, h, w)


def test_crop_windows_rows_equal_crop_window():
  """crop_windows (all views at once, each with its scale and ratio) gives crop_window's window for each seed."""
  seeds = [tf.constant([i, 7], tf.int64) for i in range(6)]
  scales = [(0.08, 1.0), (0.14, 1.0), (0.05, 0.14), (0.08, 1.0), (0.9, 1.0), (0.5, 0.6)]
  ratios = [(3 / 4, 4 / 3), (3 / 4, 4 / 3), (3 / 4, 4 / 3), (0.5, 2.0), (3 / 4, 4 / 3), (1.0, 1.0)]
  for shape in ([375, 500, 3], [12, 400, 3], [64, 64, 3]):
    rows = augment.crop_windows(tf.constant(shape), seeds, scales, ratios).numpy()
    for row, seed, scale, ratio in zip(rows, seeds, scales, ratios):
      np.testing.assert_array_equal(row, augment.crop_window(tf.constant(shape), seed, scale, ratio).numpy())


def test_banded_blur_equals_the_depthwise_convolution():
  """gaussian_blur (banded matrix products) equals reflect padding and two depthwise convolutions with the same
  taps, for 10%-of-the-side and σ-sized kernels, one or three channels, a radius of side - 1."""
  for k, (shape, fraction) in enumerate([((64, 48, 3), 0.1), ((17, 33, 1), 0.1), ((96, 96, 3), 0.0),
                                         ((5, 9, 3), 0.0)]):
    image = tf.random.stateless_uniform(shape, seed=[k, 8])
    radius = recipes.blur_radius(shape[0], fraction, 2.0)
    for i in range(2):
      seed = tf.constant([i, k], tf.int64)
      s = tf.random.stateless_uniform((), seed=seed, minval=0.1, maxval=2.0)
      taps = tf.exp(-0.5 * (tf.range(-radius, radius + 1, dtype=tf.float32) / s)**2)
      taps /= tf.reduce_sum(taps)
      c = shape[-1]
      x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='REFLECT')
      x = tf.nn.depthwise_conv2d(x, tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, c, 1]), [1] * 4, 'VALID')
      x = tf.nn.depthwise_conv2d(x, tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, c, 1]), [1] * 4, 'VALID')
      np.testing.assert_allclose(augment.gaussian_blur(image, seed, kernel_fraction=fraction).numpy(), x[0].numpy(),
                                 atol=1e-5, err_msg=str(shape))
