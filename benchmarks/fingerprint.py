"""Fingerprints of what a refactoring must not change: the bytes of the first batches of the input pipelines and
the lowered train step, printed as hashes (and the step's text written to a folder, to diff).

    python benchmarks/fingerprint.py --out=/tmp/fp_after [--batches=50]

Run it in two checkouts (``git worktree add /tmp/before COMMIT``) and compare the printed lines (and
``diff -r`` the folders). Pipelines: digits (pretraining views, the linear job's train and test batches) and
mocked ImageNet through ``tfds.testing.mock_data`` (pretraining views at batch 8, the linear job's train and
validation batches). Steps: every method's digits config (``configs/digits*.py`` but the evaluation jobs') and
``configs/imagenet.py`` lowered on 8 simulated CPU devices (``.lower(...).as_text()``, nothing compiled or run).
"""

from __future__ import annotations

import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def digest(ds, batches: int) -> str:
  """sha256 over the first ``batches`` batches: every array's key, dtype, shape and bytes."""
  h = hashlib.sha256()
  for batch in ds.take(batches).as_numpy_iterator():
    for key in sorted(batch):
      a = batch[key]
      h.update(f'{key}{a.dtype}{a.shape}'.encode())
      # strings (object arrays) by their contents: tobytes() would hash the objects' addresses
      h.update(b'\0'.join(a.ravel().tolist()) if a.dtype == object else a.tobytes())
  return h.hexdigest()[:16]


def pipelines(batches: int) -> dict:
  from vicreg_jax.data import pipeline
  try:
    from vicreg_jax.evaluate import protocols
  except ImportError:  # checkouts before the evaluation protocols: the linear config holds VICReg's values
    protocols = None
  out = {}
  c = load_config('digits')
  out['digits/pretrain'] = digest(pipeline.pretrain_dataset(c, 0, 0, 1), batches)
  out['digits/pretrain@step7,proc1of2'] = digest(pipeline.pretrain_dataset(c, 7, 1, 2), batches)
  lin = load_config('digits_linear')
  lin.data.image_size = 16
  out['digits/linear_train'] = digest(pipeline.labelled_dataset(lin.data, {'translate': 2}, 64, 0), batches)
  out['digits/linear_test'] = digest(pipeline.eval_dataset(lin.data, 'test', 64, crop=16), batches)
  out.update(mock_imagenet(batches))
  return out


def mock_imagenet(batches: int) -> dict:
  import tensorflow_datasets as tfds
  from vicreg_jax.data import pipeline
  try:
    from vicreg_jax.evaluate import protocols
  except ImportError:  # checkouts before the evaluation protocols: the linear config holds VICReg's values
    protocols = None
  out = {}
  with tempfile.TemporaryDirectory() as data_dir:
    builder = tfds.builder('imagenet2012', data_dir=data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
        for s, n in {'train': 1_281_167, 'validation': 50_000}.items()]))
    pathlib.Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=64, data_dir=data_dir):
      c = load_config('imagenet')
      c.batch_size = 8
      c.data.update(data_dir=data_dir, shuffle_buffer=32)
      out['imagenet/pretrain'] = digest(pipeline.pretrain_dataset(c, 0, 0, 1), batches)
      lin = load_config('imagenet_linear')
      lin = protocols.resolve(lin, 'vicreg')[0] if protocols else lin
      lin.data.update(data_dir=data_dir, shuffle_buffer=32)
      out['imagenet/linear_train'] = digest(pipeline.labelled_dataset(lin.data, dict(lin.transforms.train), 8, 0),
                                            batches)
      t = lin.transforms.eval
      out['imagenet/linear_validation'] = digest(pipeline.eval_dataset(
          lin.data, 'validation[:200]', 8, crop=t.crop, resize=t.resize, mean=t.mean, std=t.std), batches)
  return out


def lowered_steps(folder: pathlib.Path) -> dict:
  import jax
  import jax.numpy as jnp
  from vicreg_jax import methods, parallel, step
  out = {}
  digits = sorted(p.stem for p in (REPO / 'configs').glob('digits*.py')
                  if p.stem not in ('digits_linear', 'digits_semi', 'digits_supervised'))  # each method's
  for name, image, classes in [(d, 16, 10) for d in digits] + [('imagenet', 224, 1000)]:
    c = load_config(name)
    mesh = parallel.make_mesh()
    tx, schedule = methods.make_optimizer(c, 1000, 100)
    online = make_probe(c, classes)
    state = jax.eval_shape(lambda k: step.init_state(c, step.build_model(c, None), tx, k, online), jax.random.key(0))
    train_step = step.make_train_step(c, step.build_model(c), tx, schedule, mesh, online, total_steps=1000)
    dtype = jnp.uint8 if c.augment.on_device else jnp.float32
    view = jax.ShapeDtypeStruct((c.batch_size, image, image, c.data.channels), dtype)
    text = train_step.lower(state, {'view1': view, 'view2': view,
                                    'label': jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)}).as_text()
    (folder / f'{name}_step.mlir').write_text(text)
    out[f'step/{name}'] = hashlib.sha256(text.encode()).hexdigest()[:16]
  return out


def make_probe(config, classes):
  """The online probe: ``step.make_probe``, or ``train.make_probe`` in checkouts that keep it there."""
  from vicreg_jax import step
  if hasattr(step, 'make_probe'):
    return step.make_probe(config, classes)
  from vicreg_jax import train
  return train.make_probe(config, classes)


def main(argv):
  folder, batches = None, 50
  for arg in argv:
    if arg.startswith('--out='):
      folder = pathlib.Path(arg.split('=', 1)[1])
    elif arg.startswith('--batches='):
      batches = int(arg.split('=', 1)[1])
  if folder is None:
    raise SystemExit('--out=FOLDER is required (the lowered steps are written there)')
  folder.mkdir(parents=True, exist_ok=True)
  results = {**pipelines(batches), **lowered_steps(folder)}
  lines = [f'{k}  {v}' for k, v in results.items()]
  (folder / 'hashes.txt').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main(sys.argv[1:])
