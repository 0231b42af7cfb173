"""Two-view input pipeline throughput per CPU core, on generated ImageNet-like JPEGs (about 500×375).

  python benchmarks/input_pipeline.py [--num_images=200] [--epochs=2] [--size=224]

Prints images per second (each image giving the two views of the official VICReg recipe, at ``--size``) for
  (a)  our tf.data pipeline (vicreg_jax.data.pipeline.pretrain_dataset on an image folder): each view decodes only
       its random crop window of the JPEG, then flip, colour jitter, grayscale, blur, solarize, normalisation;
  (a_dev) our pipeline with ``augment.on_device``: the host part only (fused decode+crop, flip, uint8 out); the
       colour ops (jitter, grayscale, blur, solarize, normalisation) run in the train step on the accelerator;
  (a') the same ops on a JPEG decoded once per image (no fused crop), for comparison;
  (b)  a reference built from the official PyTorch recipe's operations with PIL (torchvision's transforms if
       importable): RandomResizedCrop (bicubic), flip, ColorJitter in random order, grayscale, GaussianBlur,
       solarize, to float and normalise;
  (c)  decoding only (tf.io.decode_jpeg of each file), the practical limit;
and the ratios a/b, a/c, a_dev/b and a_dev/c. Everything runs on one thread: TF intra/inter-op threads 1, tf.data
private thread pool 1 and max intra-op parallelism 1. For information it also times the device colour ops
(``device_augment.apply_colour_ops``, jit, both views of a batch of 64) on this CPU with XLA on one thread, and
prints their FLOP count from XLA's cost analysis.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_v, '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1').strip()

import argparse  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from vicreg_jax import config as schema  # noqa: E402
from vicreg_jax.data import augment, pipeline, recipes  # noqa: E402


def make_images(root: str, n: int, seed: int = 0) -> list[str]:
  """``n`` JPEGs (quality 90) of 500×375 (every fourth 375×500) with photo-like content: smooth random colour
  fields plus fine noise, in two class folders."""
  rng = np.random.default_rng(seed)
  paths = []
  for k in range(n):
    h, w = (375, 500) if k % 4 else (500, 375)
    low = rng.integers(0, 256, (rng.integers(4, 24), rng.integers(4, 24), 3)).astype(np.float32)
    image = tf.image.resize(low, (h, w), method='bicubic') + rng.normal(0, 8, (h, w, 3))
    image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
    d = os.path.join(root, f'class{k % 2}')
    os.makedirs(d, exist_ok=True)
    paths.append(os.path.join(d, f'{k:05d}.jpg'))
    tf.io.write_file(paths[-1], tf.io.encode_jpeg(image, quality=90))
  return paths


def _single_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = 1
  opts.threading.max_intra_op_parallelism = 1
  return ds.with_options(opts)


def _rate(iterator, examples_per_item: int, total: int, warmup: int = 1) -> tuple[float, float]:
  """Examples per second of wall time and per second of this process's CPU time (all its threads) over
  ``total`` items of ``iterator`` after ``warmup``. With one worker thread the CPU rate is the speed of one
  core's work, and it holds up better than the wall rate when other processes share the cores."""
  it = iter(iterator)
  for _ in range(warmup):
    next(it)
  t0, c0, seen = time.perf_counter(), time.process_time(), 0
  for _ in range(total):
    next(it)
    seen += examples_per_item
  return seen / (time.perf_counter() - t0), seen / (time.process_time() - c0)


def ours_rate(root: str, n: int, epochs: int, size: int, batch: int = 16,
              on_device: bool = False) -> tuple[float, float]:
  """(a): the training pipeline itself, from the imagenet config on an image folder; (a_dev) with
  ``on_device``: only its host part (the colour ops are left to the accelerator)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('imagenet', os.path.join(os.path.dirname(__file__), '..',
                                                                         'configs', 'imagenet.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.batch_size = batch
  config.data.update(source='folder', data_dir=root, image_size=size, threadpool_size=1, prefetch=1)
  view1, view2 = schema.imagenet_views(size)
  config.augment.view1, config.augment.view2 = view1, view2
  config.augment.on_device = on_device
  ds = _single_thread(pipeline.pretrain_dataset(config))
  return _rate(ds.as_numpy_iterator(), batch, epochs * n // batch)


def unfused_rate(paths: list[str], epochs: int, size: int, batch: int = 16) -> tuple[float, float]:
  """(a'): decode the whole JPEG once, then the two views crop the decoded image."""
  view1, view2 = schema.imagenet_views(size)

  def views(i, path):
    image = augment.decode(tf.io.read_file(path))
    s = tf.random.experimental.stateless_split(tf.stack([tf.constant(0, tf.int64), i]), 2)
    return augment.augment_view(image, s[0], view1), augment.augment_view(image, s[1], view2)

  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().repeat().map(views).batch(batch).prefetch(1)
  return _rate(_single_thread(ds).as_numpy_iterator(), batch, epochs * len(paths) // batch)


def decode_rate(paths: list[str], epochs: int) -> tuple[float, float]:
  """(c): read and decode each JPEG, nothing else."""
  ds = tf.data.Dataset.from_tensor_slices(paths).repeat().map(lambda p: tf.io.decode_jpeg(tf.io.read_file(p)))
  return _rate(_single_thread(ds).as_numpy_iterator(), 1, epochs * len(paths), warmup=5)


def device_colour_ops(size: int, batch: int = 64, repeats: int = 5) -> tuple[float, float]:
  """Seconds per batch of ``batch`` two-view images for the device colour ops of both views (jit, on this CPU),
  and their FLOPs per image from XLA's cost analysis."""
  import jax
  from vicreg_jax.data import device_augment
  view1, view2 = schema.imagenet_views(size)
  rng = np.random.default_rng(0)
  x1, x2 = (jax.device_put(rng.integers(0, 256, (batch, size, size, 3), np.uint8)) for _ in range(2))

  @jax.jit
  def both(x1, x2, key):
    k1, k2 = jax.random.split(key)
    return device_augment.apply_colour_ops(x1, k1, view1), device_augment.apply_colour_ops(x2, k2, view2)

  key = jax.random.key(0)
  compiled = both.lower(x1, x2, key).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(x1, x2, key))
  t0 = time.perf_counter()
  for i in range(repeats):
    jax.block_until_ready(compiled(x1, x2, jax.random.key(i + 1)))
  return (time.perf_counter() - t0) / repeats, float(cost.get('flops', float('nan'))) / batch


def resize_difference(paths: list[str], size: int, per_image: int = 4) -> tuple[float, float]:
  """Mean absolute difference per pixel (0-255) of our crop-and-resize against PIL's (torchvision's
  ``resized_crop``: crop, then an antialiased bicubic resize) on the same windows: on PIL's decoded pixels (the
  resize alone), and from the JPEG through our decode (``decode_random_resized_crop``)."""
  from PIL import Image
  same, fused = [], []
  for k, path in enumerate(paths):
    with Image.open(path) as f:
      pil = f.convert('RGB')
    data, pixels = tf.io.read_file(path), np.asarray(pil)
    for i in range(per_image):
      seed = tf.constant([k, i], tf.int64)
      y, x, h, w = augment.crop_window(tf.shape(pixels), seed).numpy().tolist()
      ref = np.asarray(pil.crop((x, y, x + w, y + h)).resize((size, size), Image.BICUBIC), np.float32)
      ours = augment.random_resized_crop(tf.image.convert_image_dtype(pixels, tf.float32), seed, size)
      same.append(np.abs(ours.numpy() * 255 - ref).mean())
      fused.append(np.abs(augment.decode_random_resized_crop(data, seed, size).numpy() * 255 - ref).mean())
  return float(np.mean(same)), float(np.mean(fused))


def stage_times(paths: list[str], size: int, repeats: int = 3) -> dict:
  """CPU milliseconds per call of each host stage, one thread, in a tf.function on this process's CPU time:
  decoding (whole, and the fused crop), the crop's resize (ours, tf.image.resize with and without antialias)
  on the crops of the ImageNet recipe's windows, and each colour op on a [size, size, 3] image; an empty
  call's overhead is subtracted."""
  data = [tf.io.read_file(p) for p in paths]
  seeds = [tf.constant([0, i], tf.int64) for i in range(len(data))]
  wins = [augment.crop_window(tf.image.extract_jpeg_shape(b), s) for b, s in zip(data, seeds)]
  crops = [tf.image.decode_and_crop_jpeg(b, w, channels=3) for b, w in zip(data, wins)]

  def timed(fn, args):
    f = tf.function(fn, reduce_retracing=True, autograph=False)
    for a in args[:3]:
      f(*a)
    t0 = time.process_time()
    for _ in range(repeats):
      for a in args:
        f(*a)
    return (time.process_time() - t0) / (repeats * len(args)) * 1e3

  def tf_resize(c, antialias):
    return tf.image.resize(tf.image.convert_image_dtype(c, tf.float32), (size, size), 'bicubic', antialias=antialias)

  image, seed = tf.random.stateless_uniform([size, size, 3], seed=[1, 2]), tf.constant([1, 2], tf.int64)
  view2 = schema.imagenet_views(size)[1]
  colour = dict(flip=lambda x, s: tf.image.flip_left_right(x), jitter=lambda x, s: augment.color_jitter(x, s),
                brightness=lambda x, s: augment._jitter_brightness(x, s, 0.4),
                contrast=lambda x, s: augment._jitter_contrast(x, s, 0.4),
                saturation=lambda x, s: augment._jitter_saturation(x, s, 0.2, True),
                hue=lambda x, s: augment._jitter_hue(x, s, 0.1, True), grayscale=lambda x, s: augment._grayscale(x),
                blur=lambda x, s: augment.gaussian_blur(x, s), solarize=lambda x, s: augment.solarize(x),
                normalize=lambda x, s: augment.normalize(x, view2['mean'], view2['std']))
  empty = timed(lambda x: x, [(c,) for c in crops])
  times = {'decode (whole)': timed(lambda b: tf.io.decode_jpeg(b, channels=3), [(b,) for b in data]),
           'decode (crop window)': timed(lambda b, w: tf.image.decode_and_crop_jpeg(b, w, channels=3),
                                         list(zip(data, wins))),
           'resize (ours)': timed(lambda c: augment._resize(c, size, 'bicubic', 3), [(c,) for c in crops]),
           'resize (tf.image, antialias)': timed(lambda c: tf_resize(c, True), [(c,) for c in crops]),
           'resize (tf.image, no antialias)': timed(lambda c: tf_resize(c, False), [(c,) for c in crops])}
  times.update({name: timed(fn, [(image, seed)] * len(data)) for name, fn in colour.items()})
  return {name: t - empty for name, t in times.items()}


# --- (b): the official recipe's operations with PIL (or torchvision) ------------------------------------------

def _torchvision_views(size: int):
  """The official code's two view transforms with torchvision, verbatim apart from its custom blur/solarize
  classes; None without torchvision."""
  try:
    import torchvision.transforms as T
  except ImportError:
    return None

  def make(blur_p, sol_p):
    return T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=blur_p), T.RandomSolarize(128, p=sol_p),
        T.ToTensor(), T.Normalize(recipes.IMAGENET_MEAN, recipes.IMAGENET_STD)])
  return make(1.0, 0.0), make(0.1, 0.2)


def _pil_crop(img, size: int):
  """torchvision's RandomResizedCrop.get_params (scale 0.08-1, ratio 3/4-4/3), then PIL crop + bicubic resize."""
  from PIL import Image
  w, h = img.size
  area = w * h
  for _ in range(10):
    target = area * random.uniform(0.08, 1.0)
    ar = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = random.randint(0, w - cw), random.randint(0, h - ch)
      break
  else:
    r = w / h
    cw, ch = (w, int(round(w / (3 / 4)))) if r < 3 / 4 else ((int(round(h * 4 / 3)), h) if r > 4 / 3 else (w, h))
    x, y = (w - cw) // 2, (h - ch) // 2
  return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))


def _pil_hue(img, f: float):
  """torchvision's PIL adjust_hue: shift H in HSV with uint8 wrap-around."""
  from PIL import Image
  h, s, v = img.convert('HSV').split()
  h = Image.fromarray((np.asarray(h, np.uint8) + np.uint8(int(f * 255) % 256)).astype(np.uint8), 'L')
  return Image.merge('HSV', (h, s, v)).convert('RGB')


def _pil_jitter(img):
  """Colour jitter (0.4, 0.4, 0.2, 0.1) in a random order, as torchvision's ColorJitter."""
  from PIL import ImageEnhance
  ops = [lambda x: ImageEnhance.Brightness(x).enhance(random.uniform(0.6, 1.4)),
         lambda x: ImageEnhance.Contrast(x).enhance(random.uniform(0.6, 1.4)),
         lambda x: ImageEnhance.Color(x).enhance(random.uniform(0.8, 1.2)),
         lambda x: _pil_hue(x, random.uniform(-0.1, 0.1))]
  random.shuffle(ops)
  for op in ops:
    img = op(img)
  return img


def _pil_view(size: int, blur_p: float, sol_p: float):
  """One view function of the official recipe with PIL: image -> float32 array [size, size, 3], normalised."""
  from PIL import ImageFilter, ImageOps
  mean = np.array(recipes.IMAGENET_MEAN, np.float32)
  std = np.array(recipes.IMAGENET_STD, np.float32)

  def view(img):
    img = _pil_crop(img, size)
    if random.random() < 0.5:
      img = ImageOps.mirror(img)
    if random.random() < 0.8:
      img = _pil_jitter(img)
    if random.random() < 0.2:
      img = img.convert('L').convert('RGB')
    if random.random() < blur_p:
      img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    if random.random() < sol_p:
      img = ImageOps.solarize(img, 128)
    return (np.asarray(img, np.float32) / 255.0 - mean) / std
  return view


def _pil_views(size: int):
  """Two view functions (PIL image -> float32 array [size, size, 3], normalised) of the official recipe, with
  torchvision where installed, else with PIL; and which."""
  if (views := _torchvision_views(size)) is not None:
    return (*views, 'torchvision')
  return _pil_view(size, 1.0, 0.0), _pil_view(size, 0.1, 0.2), 'PIL'


def reference_rate(paths: list[str], epochs: int, size: int) -> tuple[tuple[float, float], str]:
  """(b): open and decode with PIL, two views of the official recipe (one thread; the official code's loader)."""
  from PIL import Image
  random.seed(0)
  view1, view2, kind = _pil_views(size)

  def items():
    while True:
      for p in paths:
        with Image.open(p) as f:
          img = f.convert('RGB')
        yield view1(img), view2(img)

  return _rate(items(), 1, epochs * len(paths), warmup=2), kind


def _print_rates(root: str, paths: list[str], args) -> None:
  """(c), then ``args.rounds`` rounds of (a), (a_dev), (a'), (b) in turn, each as wall and CPU rates; the
  ratios of every round and the median CPU ratios over the rounds."""
  c = decode_rate(paths, args.epochs)
  print(f'(c)  decode only (tf.io.decode_jpeg):          {c[0]:8.1f} images/s   (CPU: {c[1]:8.1f})')
  ratios = []
  for k in range(args.rounds):
    a = ours_rate(root, args.num_images, args.epochs, args.size)
    print(f'(a)  ours: fused decode+crop, two views:        {a[0]:8.1f} images/s   (CPU: {a[1]:8.1f})')
    a_dev = ours_rate(root, args.num_images, args.epochs, args.size, on_device=True)
    print(f'(a_dev) ours, host part with colour ops on the accelerator: {a_dev[0]:8.1f} images/s   '
          f'(CPU: {a_dev[1]:8.1f})')
    a2 = unfused_rate(paths, args.epochs, args.size)
    print(f"(a') ours without fusion (decode, then crop):  {a2[0]:8.1f} images/s   (CPU: {a2[1]:8.1f})")
    b, kind = reference_rate(paths, args.epochs, args.size)
    print(f'(b)  reference ({kind}), two views:            {b[0]:8.1f} images/s   (CPU: {b[1]:8.1f})')
    for i, clock in enumerate(('wall', 'CPU')):
      print(f'round {k + 1}, {clock}: a/b = {a[i] / b[i]:.2f}   a/c = {a[i] / c[i]:.2f}   '
            f'a_dev/b = {a_dev[i] / b[i]:.2f}   a_dev/c = {a_dev[i] / c[i]:.2f}')
    ratios.append((a[1] / b[1], a_dev[1] / b[1]))
  med = np.median(np.array(ratios), 0)
  print(f'median over {args.rounds} rounds (CPU time): a/b = {med[0]:.2f}   a_dev/b = {med[1]:.2f}')


def _print_device_ops(size: int) -> None:
  """The device colour ops' time on this CPU and their FLOPs against a ResNet-50 step (information)."""
  seconds, flops = device_colour_ops(size)
  print(f'device colour ops (jax.jit on this CPU, one thread), both views of 64 images at {size}: '
        f'{seconds * 1e3:.0f} ms per batch ({64 / seconds:.1f} images/s), {flops / 1e6:.0f} MFLOP per image '
        f'(XLA cost analysis).')
  resnet50 = 2 * 3 * 4.1e9  # two views, forward + backward ~ 3 x the published 4.1 GFLOP forward at 224
  print(f'On an accelerator they run inside the train step, next to a ResNet-50 training step of about '
        f'{resnet50 / 1e9:.0f} GFLOP per image (2 views x 3 x 4.1 GFLOP at 224): {flops / resnet50:.2%} of its '
        'FLOPs, so negligible there (estimated from FLOP counts; no accelerator time was measured here).')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=200)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--rounds', type=int, default=1, help='rounds of (a), (a_dev), (a\'), (b) in turn')
  parser.add_argument('--stages', action='store_true', help='also the CPU time of each host stage')
  parser.add_argument('--no_device_ops', action='store_true', help='skip timing the device colour ops')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    paths = make_images(root, args.num_images)
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f'{args.num_images} JPEGs of 500x375 (mean {mean_kb:.0f} kB), two views at {args.size}, one thread each, '
          f'{args.epochs} epochs; rates per second of wall time and of this process\'s CPU time')
    _print_rates(root, paths, args)
    same, fused = resize_difference(paths[:25], args.size)
    print(f'crop-and-resize against PIL\'s on the same windows, mean absolute difference per pixel (0-255): '
          f'{same:.3f} on PIL\'s decoded pixels, {fused:.3f} from the JPEG through our decode')
    if args.stages:
      for name, ms in stage_times(paths[:40], args.size).items():
        print(f'  {name:32s} {ms:6.3f} ms CPU per call')
    if not args.no_device_ops:
      _print_device_ops(args.size)


if __name__ == '__main__':
  main()
