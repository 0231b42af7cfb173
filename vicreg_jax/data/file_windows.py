"""A continuous, exactly resumable training stream over one process's share of record files.

The share is a list of pieces (a file, the records skipped at its start, the records taken: whole files but at
the share's two ends). Epoch ``e`` reads the pieces in an order drawn from (seed, process, e), so every epoch and
every process has its own file order. The epoch's records, in that order, are cut into windows of ``window``
records (the last one shorter); a window is read whole (its pieces, cut at the window's edges, 16 at a time in a
fixed interleave) and permuted by a seed from (seed, process, window). The stream is the windows one after
another, epoch after epoch, with no seam at an epoch's end: one window is kept ready ahead (read and permuted by
a prefetch thread while the current one is emitted), so the next epoch's first window fills while the current
epoch's last one drains. RAM: two windows of records (as read: serialized, or rows of memory with ``cache``),
briefly three while a window's records are batched.

Exact resume: position ``p`` lies in epoch ``p // n`` and window ``(p % n) // window``; the windows before it are
not read, that window's first piece is read from its offset (a skip inside one file), and the ``p % window``
records of the window already emitted are dropped after its permutation (no read beyond the window). The stream
from ``p`` is the uninterrupted stream's from ``p`` on the same number of processes (the pieces differ with it).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf


# Pieces of a window read at once (TFDS's own interleave cycle). A constant: the order of a window's records,
# hence its shuffle, depends on it.
PARALLEL_READS = 16
# Salts of the two kinds of seed.
_FILE_ORDER, _WINDOW = 1, 2


class Pieces(NamedTuple):
  """A process's share: piece i is ``take[i]`` records of file ``path[i]`` after its first ``skip[i]``."""
  path: np.ndarray  # str
  skip: np.ndarray  # int64
  take: np.ndarray  # int64

  @property
  def num_records(self) -> int:
    return int(np.sum(self.take))


def stream_seed(seed: int, process_index: int):
  """The root of this process's stream seeds (int64 [2])."""
  return tf.constant([seed, process_index], tf.int64)


def _seed(root, salt: int, index):
  return tf.random.experimental.stateless_fold_in(tf.random.experimental.stateless_fold_in(root, salt), index)


def piece_order(root, epoch, count: int):
  """The order of the ``count`` pieces in ``epoch`` (int64 [count]): a permutation seeded by (root, epoch)."""
  return tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), _seed(root, _FILE_ORDER, epoch))


def window_pieces(take, order, start, stop):
  """The parts of the pieces (lengths ``take``, read in ``order``) that hold the records [``start``, ``stop``) of
  the epoch: (piece, offset in the piece, count) of each part, in reading order (int64 tensors)."""
  lengths = tf.gather(tf.constant(take, tf.int64), order)
  ends = tf.cumsum(lengths)
  begins = ends - lengths
  first = tf.maximum(begins, start)
  count = tf.minimum(ends, stop) - first
  keep = count > 0
  return (tf.boolean_mask(order, keep), tf.boolean_mask(first - begins, keep), tf.boolean_mask(count, keep))


class WindowStream:
  """The stream over ``pieces`` (see the module docstring); ``read(piece, offset, count)`` gives those records of
  a piece as a dataset."""

  def __init__(self, pieces: Pieces, read: Callable, window: int, seed: int, process_index: int):
    self.take, self.read = pieces.take, read
    self.n = pieces.num_records
    if self.n == 0:
      raise ValueError('The training split has no examples for this process.')
    self.size = max(1, min(window, self.n))  # records per window
    self.per_epoch = -(-self.n // self.size)  # windows per epoch
    self.seed, self.process_index = seed, process_index

  def window(self, g) -> tf.data.Dataset:
    """Window ``g`` of the stream (windows counted over all epochs) as one element: its records (one batch, read
    in a fixed order) and the order to emit them in (a permutation seeded by (seed, process, g)); no element if
    its files hold no records. A dataset, not a value: the window's reads run in the pipeline's own threads
    (a dataset computed inside another's function, with ``get_single_element``, can wait forever for threads
    the outer pipeline holds)."""
    root = stream_seed(self.seed, self.process_index)
    epoch, j = g // self.per_epoch, g % self.per_epoch
    start = j * self.size
    parts = window_pieces(self.take, piece_order(root, epoch, len(self.take)), start,
                          tf.minimum(start + self.size, self.n))
    records = tf.data.Dataset.from_tensor_slices(parts).interleave(
        self.read, cycle_length=PARALLEL_READS, block_length=1, num_parallel_calls=PARALLEL_READS,
        deterministic=True)

    def with_order(rows):
      count = tf.shape(tf.nest.flatten(rows)[0], out_type=tf.int64)[0]
      return rows, tf.random.experimental.stateless_shuffle(tf.range(count), _seed(root, _WINDOW, g))

    return batched(records, self.size).map(with_order)

  def dataset(self, start: int) -> tf.data.Dataset:
    """The records from stream position ``start`` on, without end."""
    epoch, offset = divmod(start, self.n)
    first = epoch * self.per_epoch + offset // self.size
    # One window ready ahead: while a window's rows are emitted, the next one is read and shuffled (flat_map
    # takes the windows one after the other; a map would run its calls in parallel, reading further ahead).
    windows = tf.data.Dataset.counter(start=first, dtype=tf.int64).flat_map(self.window).prefetch(1)
    return windows.flat_map(_permuted).skip(offset % self.size)


def _permuted(rows, order) -> tf.data.Dataset:
  """The rows of ``rows`` in ``order``, one at a time (no permuted copy of the window)."""
  def row(i):
    return tf.nest.map_structure(lambda x: _dense(tf.gather(x, i)), rows)

  return tf.data.Dataset.from_tensor_slices(order).map(row)


def _dense(x):
  return x.to_tensor() if isinstance(x, tf.RaggedTensor) else x


def batched(records: tf.data.Dataset, most: int) -> tf.data.Dataset:
  """The (at most ``most``) elements of the finite ``records`` as one batch (no element if there are none),
  ragged where their shapes differ."""
  if all(s.shape.is_fully_defined() for s in tf.nest.flatten(records.element_spec)):
    return records.batch(most)
  return records.ragged_batch(most)


def file_reader(pieces: Pieces, make_records: Callable) -> Callable:
  """``read(piece, offset, count)`` over files: ``make_records(path)`` (a dataset of the file's records) from
  the piece's own skip plus ``offset``, ``count`` records."""
  paths, skips = tf.constant(pieces.path), tf.constant(pieces.skip, tf.int64)

  def read(piece, offset, count):
    return make_records(tf.gather(paths, piece)).skip(tf.gather(skips, piece) + offset).take(count)

  return read


def memory_reader(records, pieces: Pieces) -> Callable:
  """``read(piece, offset, count)`` over ``records``: every piece's records, piece after piece (a tensor or a
  structure of tensors, one row per record)."""
  begins = tf.constant(np.cumsum(pieces.take) - pieces.take, tf.int64)

  def read(piece, offset, count):
    return tf.data.Dataset.from_tensor_slices(records).skip(tf.gather(begins, piece) + offset).take(count)

  return read


def load(pieces: Pieces, read: Callable) -> tf.data.Dataset:
  """One element: every record of ``pieces``, piece after piece, batched (ragged where record shapes differ),
  read ``PARALLEL_READS`` pieces at a time."""
  count = len(pieces.take)
  parts = tf.data.Dataset.from_tensor_slices((tf.range(count, dtype=tf.int64), tf.zeros([count], tf.int64),
                                              tf.constant(pieces.take, tf.int64)))
  longest = max(int(np.max(pieces.take)), 1)
  records = parts.interleave(read, cycle_length=PARALLEL_READS, block_length=longest,
                             num_parallel_calls=PARALLEL_READS, deterministic=True)
  return batched(records, max(pieces.num_records, 1)).take(1)


def windowed_stream(pieces: Pieces, read: Callable, window: int, seed: int, process_index: int, start: int,
                    cache: bool) -> tf.data.Dataset:
  """The records of this process's stream from position ``start`` (see the module docstring); ``cache``: read
  every piece into memory first, then the windows from there (the same records in the same order)."""
  if not cache:
    return WindowStream(pieces, read, window, seed, process_index).dataset(start)
  return load(pieces, read).flat_map(
      lambda records: WindowStream(pieces, memory_reader(records, pieces), window, seed, process_index).dataset(
          start))
