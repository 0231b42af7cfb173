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

from vicreg_jax import defaults  # noqa: E402
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


def _rate(iterator, examples_per_item: int, total: int, warmup: int = 1) -> float:
  it = iter(iterator)
  for _ in range(warmup):
    next(it)
  t0, seen = time.perf_counter(), 0
  for _ in range(total):
    next(it)
    seen += examples_per_item
  return seen / (time.perf_counter() - t0)


def ours_rate(root: str, n: int, epochs: int, size: int, batch: int = 16, on_device: bool = False) -> float:
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
  view1, view2 = defaults.imagenet_views(size)
  config.augment.view1, config.augment.view2 = view1, view2
  config.augment.on_device = on_device
  ds = _single_thread(pipeline.pretrain_dataset(config))
  return _rate(ds.as_numpy_iterator(), batch, epochs * n // batch)


def unfused_rate(paths: list[str], epochs: int, size: int, batch: int = 16) -> float:
  """(a'): decode the whole JPEG once, then the two views crop the decoded image."""
  view1, view2 = defaults.imagenet_views(size)

  def views(i, path):
    image = augment.decode(tf.io.read_file(path))
    s = tf.random.experimental.stateless_split(tf.stack([tf.constant(0, tf.int64), i]), 2)
    return augment.augment_view(image, s[0], view1), augment.augment_view(image, s[1], view2)

  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().repeat().map(views).batch(batch).prefetch(1)
  return _rate(_single_thread(ds).as_numpy_iterator(), batch, epochs * len(paths) // batch)


def decode_rate(paths: list[str], epochs: int) -> float:
  """(c): read and decode each JPEG, nothing else."""
  ds = tf.data.Dataset.from_tensor_slices(paths).repeat().map(lambda p: tf.io.decode_jpeg(tf.io.read_file(p)))
  return _rate(_single_thread(ds).as_numpy_iterator(), 1, epochs * len(paths), warmup=5)


def device_colour_ops(size: int, batch: int = 64, repeats: int = 5) -> tuple[float, float]:
  """Seconds per batch of ``batch`` two-view images for the device colour ops of both views (jit, on this CPU),
  and their FLOPs per image from XLA's cost analysis."""
  import jax
  from vicreg_jax.data import device_augment
  view1, view2 = defaults.imagenet_views(size)
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


# --- (b): the official recipe's operations with PIL (or torchvision) ------------------------------------------

def _pil_views(size: int):
  """Two view functions (PIL image -> float32 array [size, size, 3], normalised) of the official recipe."""
  from PIL import Image, ImageEnhance, ImageFilter, ImageOps
  try:
    import torchvision.transforms as T
  except ImportError:
    T = None
  if T is not None:  # the official code's transforms, verbatim apart from its custom blur/solarize classes
    def make(blur_p, sol_p):
      return T.Compose([
          T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(0.5),
          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
          T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=blur_p), T.RandomSolarize(128, p=sol_p),
          T.ToTensor(), T.Normalize(recipes.IMAGENET_MEAN, recipes.IMAGENET_STD)])
    return make(1.0, 0.0), make(0.1, 0.2), 'torchvision'

  mean = np.array(recipes.IMAGENET_MEAN, np.float32)
  std = np.array(recipes.IMAGENET_STD, np.float32)

  def crop(img):  # torchvision RandomResizedCrop.get_params, then PIL crop + bicubic resize
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

  def hue(img, f):  # torchvision's PIL adjust_hue: shift H in HSV with uint8 wrap-around
    h, s, v = img.convert('HSV').split()
    h = Image.fromarray((np.asarray(h, np.uint8) + np.uint8(int(f * 255) % 256)).astype(np.uint8), 'L')
    return Image.merge('HSV', (h, s, v)).convert('RGB')

  def jitter(img):
    ops = [lambda x: ImageEnhance.Brightness(x).enhance(random.uniform(0.6, 1.4)),
           lambda x: ImageEnhance.Contrast(x).enhance(random.uniform(0.6, 1.4)),
           lambda x: ImageEnhance.Color(x).enhance(random.uniform(0.8, 1.2)),
           lambda x: hue(x, random.uniform(-0.1, 0.1))]
    random.shuffle(ops)
    for op in ops:
      img = op(img)
    return img

  def make(blur_p, sol_p):
    def view(img):
      img = crop(img)
      if random.random() < 0.5:
        img = ImageOps.mirror(img)
      if random.random() < 0.8:
        img = jitter(img)
      if random.random() < 0.2:
        img = img.convert('L').convert('RGB')
      if random.random() < blur_p:
        img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
      if random.random() < sol_p:
        img = ImageOps.solarize(img, 128)
      return (np.asarray(img, np.float32) / 255.0 - mean) / std
    return view

  return make(1.0, 0.0), make(0.1, 0.2), 'PIL'


def reference_rate(paths: list[str], epochs: int, size: int) -> tuple[float, str]:
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=200)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--size', type=int, default=224)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    paths = make_images(root, args.num_images)
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f'{args.num_images} JPEGs of 500x375 (mean {mean_kb:.0f} kB), two views at {args.size}, one thread each, '
          f'{args.epochs} epochs')
    c = decode_rate(paths, args.epochs)
    print(f'(c)  decode only (tf.io.decode_jpeg):          {c:8.1f} images/s')
    a = ours_rate(root, args.num_images, args.epochs, args.size)
    print(f'(a)  ours: fused decode+crop, two views:        {a:8.1f} images/s')
    a_dev = ours_rate(root, args.num_images, args.epochs, args.size, on_device=True)
    print(f'(a_dev) ours, host part with colour ops on the accelerator: {a_dev:8.1f} images/s')
    a2 = unfused_rate(paths, args.epochs, args.size)
    print(f"(a') ours without fusion (decode, then crop):  {a2:8.1f} images/s")
    b, kind = reference_rate(paths, args.epochs, args.size)
    print(f'(b)  reference ({kind}), two views:            {b:8.1f} images/s')
    print(f'a/b = {a / b:.2f}   a/c = {a / c:.2f}   a_dev/b = {a_dev / b:.2f}   a_dev/c = {a_dev / c:.2f}')
    seconds, flops = device_colour_ops(args.size)
    print(f'device colour ops (jax.jit on this CPU, one thread), both views of 64 images at {args.size}: '
          f'{seconds * 1e3:.0f} ms per batch ({64 / seconds:.1f} images/s), {flops / 1e6:.0f} MFLOP per image '
          f'(XLA cost analysis).')
    resnet50 = 2 * 3 * 4.1e9  # two views, forward + backward ~ 3 x the published 4.1 GFLOP forward at 224
    print(f'On an accelerator they run inside the train step, next to a ResNet-50 training step of about '
          f'{resnet50 / 1e9:.0f} GFLOP per image (2 views x 3 x 4.1 GFLOP at 224): {flops / resnet50:.2%} of its '
          'FLOPs, so negligible there (estimated from FLOP counts; no accelerator time was measured here).')


if __name__ == '__main__':
  main()
