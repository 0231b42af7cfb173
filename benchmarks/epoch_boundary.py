"""The wait at an epoch boundary of the TFDS training stream, on a slow-read TFDS dataset written here.

  python benchmarks/epoch_boundary.py [--old] [--delay_ms=1] [--files=8] [--per_file=128] [--batch=32]
                                      [--buffer=640] [--epochs=5] [--step_ms=0] [--resume]

Writes a real TFDS dataset (cifar10's features, ``--files`` record files of ``--per_file`` examples) to a
temporary folder and slows every record read by ``--delay_ms`` (TFDS's TFRecord file adapter, which both the TFDS
reader and :mod:`vicreg_jax.data.sources.tfds` read files with, gets tf.data's testing ``sleep`` per record:
each open file yields at most one record per delay). Then it times the batches of
``pipeline.pretrain_dataset`` (the trainer's stream: cifar10's config, batch ``--batch``, ``shuffle_buffer``
``--buffer``) over ``--epochs`` epochs, the consumer waiting ``--step_ms`` per batch (a stand-in for the train
step), and prints the largest gap between consecutive batches across an epoch boundary and the median gap within
the epochs (the first epoch's first buffer left out: start-up); ``--resume`` also times the first batch of a
stream started at step 0 and at the last step of the first epoch (building the stream included). ``--old`` runs the stream this module replaced
(:func:`old_train_stream`: a new ``shuffle(buffer)`` per epoch over the share in fixed file order).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds_lib  # noqa: E402
from tensorflow.python.data.experimental.ops import testing as tf_data_testing  # noqa: E402
from tensorflow_datasets.core import file_adapters  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vicreg_jax.data import pipeline  # noqa: E402
from vicreg_jax.data.sources import tfds  # noqa: E402


def write_dataset(data_dir, shard_lengths, split: str = 'train', name: str = 'cifar10') -> None:
  """A prepared TFDS dataset ``name`` (cifar10's features) under ``data_dir`` whose ``split`` has record files of
  ``shard_lengths`` examples: example i has id ``str(i)``, label i % 10 and an image of value i % 256 (channel
  0) and i // 256 (channel 1)."""
  builder = tfds_lib.builder(name, data_dir=str(data_dir))
  info = tfds_lib.core.SplitInfo(name=split, shard_lengths=list(shard_lengths), num_bytes=0,
                                 filename_template=tfds_lib.core.ShardedFileTemplate(
                                     data_dir=builder.data_path, dataset_name=builder.name, split=split,
                                     filetype_suffix='tfrecord'))
  builder.info.set_splits(tfds_lib.core.SplitDict([info]))
  pathlib.Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  features, i = builder.info.features, 0
  for path, length in zip(info.filename_template.sharded_filepaths(len(shard_lengths)), shard_lengths):
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
      for _ in range(length):
        image = np.zeros([32, 32, 3], np.uint8)
        image[..., 0], image[..., 1] = i % 256, i // 256
        writer.write(features.serialize_example({'id': str(i), 'image': image, 'label': i % 10}))
        i += 1


@contextlib.contextmanager
def slow_reads(delay_ms: float):
  """Every TFRecord file TFDS's adapter opens yields a record at most every ``delay_ms``."""
  adapter = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.TFRECORD]
  original = adapter.make_tf_data

  def make_tf_data(filename, buffer_size=None):
    return original(filename, buffer_size).apply(tf_data_testing.sleep(int(delay_ms * 1000)))

  with mock.patch.object(adapter, 'make_tf_data', make_tf_data):
    yield


def old_train_stream(self, data, split, seed, start_step, local_b, process_index, process_count, fn, indices=None,
                     encoded=False):
  """The TFDS train stream before the windowed stream (vicreg_jax/data/sources/tfds.py at 91aa362): a fixed file
  order, each epoch a new ``shuffle(buffer)`` seeded by (seed, epoch), a resume skipping into the epoch."""
  del indices
  start = start_step * local_b
  base = tfds.tfds_split(data.name, split, data_dir=data.data_dir, process_index=process_index,
                         process_count=process_count, decode=not encoded)
  if data.cache:
    base = base.cache()
  n = max(tfds.num_examples(data.name, split, data.data_dir) // process_count, 1)
  first_epoch, offset = divmod(start, n)
  seed_base = tf.constant(seed, tf.int64) * 1_000_003 + process_index * 7_919

  def epoch(e):
    return base.shuffle(data.shuffle_buffer, seed=seed_base + e, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.counter(start=first_epoch, dtype=tf.int64).flat_map(epoch).skip(offset)
  base_seed = tf.constant([seed, process_index], tf.int64)

  def example(pos, ex):
    image = ex['image'] if encoded else tf.image.convert_image_dtype(ex['image'], tf.float32)
    return pos, fn(tf.random.experimental.stateless_fold_in(base_seed, pos), image, ex['label'])

  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start=start, dtype=tf.int64), ds)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
  ds = ds.scan(tf.constant(start - 1, tf.int64), tfds._count_dropped)  # pylint: disable=protected-access
  return ds.batch(local_b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)


def cifar10_config(data_dir, batch: int, buffer: int):
  """configs/cifar10.py with a batch of ``batch``, ``shuffle_buffer`` ``buffer``, the data under ``data_dir``."""
  spec = importlib.util.spec_from_file_location('cifar10', REPO / 'configs' / 'cifar10.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.batch_size = batch
  config.data.update(data_dir=str(data_dir), shuffle_buffer=buffer)
  return config


# The streams' iterators stay alive until the process ends: destroying one while its files sleep can deadlock in
# tf.data's testing ``sleep`` (its cancellation waits on a lock, seen once in CI), so the command ends with
# ``os._exit`` after printing, and tests run it as its own process.
_ALIVE: list = []


def batch_times(config, batches: int, step_s: float, old: bool) -> np.ndarray:
  """When each of the first ``batches`` batches of the trainer's stream arrived (s), the consumer spending
  ``step_s`` on each."""
  patch = mock.patch.object(tfds.Tfds, 'train_stream', old_train_stream) if old else contextlib.nullcontext()
  with patch:
    it = pipeline.pretrain_dataset(config).as_numpy_iterator()
    _ALIVE.append(it)
    times = []
    for _ in range(batches):
      next(it)
      times.append(time.perf_counter())
      time.sleep(step_s)
  return np.array(times)


def first_batch_s(config, step: int, old: bool) -> float:
  """Seconds from building the trainer's stream at ``step`` to its first batch."""
  patch = mock.patch.object(tfds.Tfds, 'train_stream', old_train_stream) if old else contextlib.nullcontext()
  with patch:
    t = time.perf_counter()
    _ALIVE.append(pipeline.pretrain_dataset(config, step).as_numpy_iterator())
    next(_ALIVE[-1])
  return time.perf_counter() - t


def gaps(times: np.ndarray, batch: int, n: int, skip: int) -> tuple[np.ndarray, np.ndarray]:
  """The gaps before each batch that reaches into a new epoch (its rows span positions k·n) and the others, the
  first ``skip`` batches left out."""
  d = np.diff(times)  # d[k - 1]: the wait for batch k
  k = np.arange(1, len(times))
  crosses = (k * batch) // n != ((k + 1) * batch - 1) // n
  crosses |= (k * batch) % n == 0
  keep = k >= skip
  return d[keep & crosses], d[keep & ~crosses]


def measure(args) -> dict:
  """Writes the dataset, times the stream, returns the figures."""
  with tempfile.TemporaryDirectory() as tmp:
    write_dataset(tmp, [args.per_file] * args.files)
    n = args.per_file * args.files
    config = cifar10_config(tmp, args.batch, args.buffer)
    batches = args.epochs * n // args.batch
    with slow_reads(args.delay_ms):
      times = batch_times(config, batches, args.step_ms / 1000, args.old)
      starts = [first_batch_s(config, step, args.old) for step in (0, n // args.batch - 1)] if args.resume else []
  boundary, within = gaps(times, args.batch, n, skip=args.buffer // args.batch + 1)
  return dict(boundary_max=float(boundary.max()), within_median=float(np.median(within)),
              within_max=float(within.max()), ratio=float(boundary.max() / np.median(within)),
              boundaries=[round(float(x) * 1e3, 1) for x in boundary], starts=starts)


def n_steps(args) -> int:
  """Steps per epoch."""
  return args.files * args.per_file // args.batch


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--old', action='store_true')
  parser.add_argument('--delay_ms', type=float, default=1.0)
  parser.add_argument('--files', type=int, default=8)
  parser.add_argument('--per_file', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--buffer', type=int, default=640)
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--step_ms', type=float, default=0.0)
  parser.add_argument('--resume', action='store_true', help="also time the first batch at step 0 and at the "
                      "epoch's last step (a resume)")
  parser.add_argument('--json', action='store_true', help='print the figures as one JSON line')
  args = parser.parse_args(argv)
  r = measure(args)
  if args.json:
    print(json.dumps(r), flush=True)
    return r
  print(f"{'old' if args.old else 'new'} stream: largest gap across an epoch boundary {r['boundary_max'] * 1e3:.1f} ms "
        f"(each boundary: {r['boundaries']} ms), median gap within an epoch {r['within_median'] * 1e3:.1f} ms, ratio "
        f"{r['ratio']:.2f} (buffer {args.buffer} = {args.buffer / args.batch:g} batches of {args.batch}, "
        f"{args.files} files of {args.per_file}, {args.delay_ms:g} ms per record read, {args.step_ms:g} ms per step); "
        f"largest gap within an epoch {r['within_max'] * 1e3:.1f} ms")
  if r['starts']:
    print(f"first batch: {r['starts'][0]:.2f} s at step 0, {r['starts'][1]:.2f} s at step {n_steps(args) - 1} (a "
          'resume in the last step of an epoch)')
  return r


if __name__ == '__main__':
  main()
  sys.stdout.flush()
  os._exit(0)  # without destroying the sleeping streams (see _ALIVE)
