"""Any TFDS dataset by name, prepared beforehand (never downloaded here): each process reads its own share of
the files."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from vicreg_jax import errors
from vicreg_jax.data import file_windows, sources, streams
from vicreg_jax.data.sources import folder


# How to provide datasets that TFDS cannot download by itself.
_MANUAL = {
    'imagenet2012': ('download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into '
                     'DIR, run `tfds build imagenet2012 --manual_dir=DIR --data_dir=DATA`, then pass '
                     '--config.data.data_dir=DATA (a local path or gs://bucket/tensorflow_datasets)'),
}
_MANUAL['imagenet2012_subset'] = _MANUAL['imagenet2012'].replace('build imagenet2012', 'build imagenet2012_subset')


def tfds_builder(name: str, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for ``name``, or :class:`errors.DataNotFoundError` saying how to prepare it.

  Never downloads: a dataset must have been built (``tfds build``) under ``data_dir`` (default:
  ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name, bad config name
    raise errors.DataNotFoundError(f'TFDS has no dataset {name!r} ({type(e).__name__}).') from None
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    where = builder.data_dir
    how = _MANUAL.get(name.split('/')[0],
                      f'run `tfds build {name} --data_dir=DATA` on a machine with network access, then pass '
                      f'--config.data.data_dir=DATA')
    raise errors.DataNotFoundError(f'Dataset {name!r} is not prepared at {where}: {how}.')
  return builder


def tfds_split(name: str, split, *, data_dir: Optional[str] = None, process_index: int = 0,
               process_count: int = 1, shuffle_files: bool = False, seed: int = 0,
               decode: bool = True) -> tf.data.Dataset:
  """This process's even share of a TFDS split (equal shares, the remainder dropped), as a dataset of
  ``{'image': uint8 [H,W,C], 'label'}``; with ``decode=False`` the image stays the encoded bytes (a string
  scalar), for fused decode-and-crop."""
  builder = tfds_builder(name, data_dir)
  if process_count > 1:
    split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16)
  decoders = None if decode else {'image': tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config, decoders=decoders)
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def tfds_share(name: str, split: str, data_dir: Optional[str] = None, process_index: int = 0,
               process_count: int = 1) -> tuple[tf.data.Dataset, int, int, int]:
  """For one pass over all of a TFDS split (``split`` may be sliced, e.g. 'validation[:1000]'): this process's
  contiguous share (``tfds.even_splits``, nothing dropped), the indices in the split of its first example and
  of the one after its last, and the split's size."""
  if '+' in split and process_count > 1:  # even_splits would split each part: shares not contiguous
    raise errors.ConfigError(f'evaluation split {split!r} on {process_count} processes: use one split (sliced if '
                     'need be), not a combination')
  builder = tfds_builder(name, data_dir)
  shares = tfds.even_splits(split, n=process_count, drop_remainder=False)
  sizes = [builder.info.splits[s].num_examples for s in shares]
  start = sum(sizes[:process_index])
  return (tfds_split(name, shares[process_index], data_dir=data_dir), start, start + sizes[process_index],
          sum(sizes))


def num_examples(name: str, split: str, data_dir: Optional[str] = None) -> int:
  """Number of examples in a TFDS split (the whole split, all processes together).

  For ``name='folder'`` (or a TFDS name not prepared under ``data_dir`` when ``data_dir`` is an image folder),
  the number of images in that split of the image folder ``data_dir`` (see :func:`folder.folder_split`; the default
  ``val_fraction`` of 0 unless the folder has train/ and val/ subfolders). Prefer ``get(data).num_examples``,
  which knows the config's source and ``val_fraction``.
  """
  if name == 'folder':
    return folder.folder_split(data_dir, split).num_examples
  try:
    builder = tfds_builder(name, data_dir)
  except errors.DataNotFoundError:
    if data_dir:  # an image folder given with the default name: count it; otherwise TFDS's own message
      try:
        return folder.folder_split(data_dir, split).num_examples
      except (errors.DataNotFoundError, ValueError):
        pass
    raise
  return builder.info.splits[split].num_examples


def _share_split(split: str, process_index: int, process_count: int):
  """This process's equal share of ``split`` (``tfds.even_splits``, the remainder dropped)."""
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]


def train_share(data, split: str, process_index: int = 0, process_count: int = 1, encoded: bool = False):
  """This process's share of a TFDS split for training: its pieces (:class:`file_windows.Pieces`: whole files
  but at the share's two ends, from the split's file instructions), ``read(piece, offset, count)`` giving their
  records, and ``decode(record)`` giving ``{'image', 'label'}`` (the image encoded if ``encoded``).

  The records are the files' serialized examples, read with TFDS's own file adapter and decoded by the
  dataset's features. A dataset whose files are absent (the metadata of ``tfds.testing.mock_data``) is read
  through ``as_dataset`` as one piece of the examples it yields, decoded already (each window skips into it: for
  tests)."""
  decoders = {'image': tfds.decode.SkipDecoding()} if encoded else None
  try:
    builder = tfds_builder(data.name, data.data_dir)
    files = builder.info.splits[_share_split(split, process_index, process_count)].file_instructions
  except errors.DataNotFoundError:
    files = []
  if files and tf.io.gfile.exists(files[0].filename):
    pieces = file_windows.Pieces(np.array([os.fspath(f.filename) for f in files]),
                                 np.array([f.skip for f in files], np.int64), np.array([f.take for f in files], np.int64))
    adapter = file_adapters.ADAPTER_FOR_FORMAT[builder.info.file_format]
    features = builder.info.features

    def decode(record):
      ex = features.deserialize_example(record, decoders=decoders)
      return {'image': ex['image'], 'label': ex['label']}

    return pieces, file_windows.file_reader(pieces, adapter.make_tf_data), decode
  share = tfds_split(data.name, split, data_dir=data.data_dir, process_index=process_index,
                     process_count=process_count, decode=not encoded)
  n = int(share.cardinality())  # what as_dataset yields (a mock's examples), else the metadata's count
  n = n if n > 0 else max(num_examples(data.name, split, data.data_dir) // process_count, 1)
  pieces = file_windows.Pieces(np.array(['']), np.zeros([1], np.int64), np.array([n], np.int64))
  return pieces, lambda piece, offset, count: share.skip(offset).take(count), lambda ex: ex


class Tfds(sources.Source):
  """A TFDS split per process (:func:`tfds_split`): images uint8, or encoded bytes for the fused decode-and-crop."""
  file_backed = True

  def num_examples(self, data, split: str) -> int:
    return num_examples(data.name, split, data.data_dir)

  def num_classes(self, data) -> int:
    return tfds_builder(data.name, data.data_dir).info.features['label'].num_classes

  def train_stream(self, data, split, seed, start_step, local_b, process_index, process_count, fn, indices=None,
                   encoded=False):
    """Per process, from this process's share of the split's files (:func:`train_share`), as a continuous stream
    of shuffled windows (:mod:`vicreg_jax.data.file_windows`: a file order per epoch and process, no wait at an
    epoch's end, a resume that skips whole files). Exactly resumable on the same number of processes: position
    p = start_step·local_b, augmentation seeded by (seed, process, p). A record that fails to read or decode is
    dropped (positions, hence seeds, are fixed before); the row after a gap counts the records dropped since the
    previous row."""
    if indices is not None:
      raise ValueError('A labelled subset of a TFDS split is chosen by the split name (e.g. '
                       "'imagenet2012_subset/1pct'), not by classifier.labels_per_class.")
    start = start_step * local_b
    pieces, read, decode = train_share(data, split, process_index, process_count, encoded)
    ds = file_windows.windowed_stream(pieces, read, data.shuffle_buffer, seed, process_index, start, data.cache)
    base_seed = tf.constant([seed, process_index], tf.int64)

    def example(pos, record):
      ex = decode(record)
      image = ex['image'] if encoded else tf.image.convert_image_dtype(ex['image'], tf.float32)
      return pos, fn(tf.random.experimental.stateless_fold_in(base_seed, pos), image, ex['label'])

    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start=start, dtype=tf.int64), ds)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    ds = ds.scan(tf.constant(start - 1, tf.int64), _count_dropped)
    return ds.batch(local_b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)

  def eval_batches(self, data, split, local_b, prepare, image_shape, process_index, process_count, max_examples):
    """A record that fails to decode is dropped (logged by tf.data), its place taken by the padding at the end."""
    if max_examples and ('[' in split or '+' in split):
      raise errors.ConfigError(f'max_examples with the sliced or combined split {split!r}: put the limit into the '
                               'split instead.')
    if max_examples:  # a limit above the split's size is the whole split (TFDS refuses such a slice)
      split = f'{split}[:{min(max_examples, num_examples(data.name, split, data.data_dir))}]'
    ds, a, b, total = tfds_share(data.name, split, data.data_dir, process_index, process_count)
    ds = tf.data.Dataset.zip(ds.map(lambda ex: (ex['image'], ex['label'])), tf.data.Dataset.range(a, b))
    ds = ds.map(lambda xy, i: ((prepare(xy[0]), xy[1]), i), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
    return streams.padded_batches(ds, local_b, streams.eval_batch_count(total, local_b, process_count))


def _count_dropped(previous, pos_out):
  pos, out = pos_out
  return pos, dict(out, **{streams.UNREADABLE: tf.cast(pos - previous - 1, tf.int32),
                           streams.UNREADABLE_PATH: tf.constant('')})


SOURCE = Tfds()
