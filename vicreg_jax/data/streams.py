"""What the sources' streams share: the global stream over in-memory examples (arrays, or an image folder's file
paths read and decoded here, unreadable files replaced by later candidates), the batch of rows that may fail
(:func:`readable_batch`), and the padded batches of an evaluation share. The determinism these give is described
in :mod:`vicreg_jax.data.pipeline`."""

from __future__ import annotations

import os
from typing import Callable

import tensorflow as tf

from vicreg_jax.data import augment


# Per-row fields of the batches of file-backed sources: how many unreadable images the row stands for (int32;
# replaced ones in training, 1 on a masked-out row in evaluation, records dropped just before it in a TFDS
# stream) and the path of the first (b'' when none or unknown).
UNREADABLE = 'unreadable'
UNREADABLE_PATH = 'unreadable_path'
# Candidates tried for one position of an image folder before giving up (all unreadable: the folder is broken).
MAX_TRIES = 32


def threads(data) -> int:
  """The parallelism of the nested datasets (which tf.data does not autotune): the thread pool's size."""
  return data.threadpool_size or os.cpu_count() or 1


def batch_of(rows: tf.data.Dataset, size: int):
  """The elements of the finite ``rows`` (at most ``size``) as one batch, empty (0 rows) if there are none."""
  batched = rows.batch(size)
  empty = tf.nest.map_structure(lambda s: tf.zeros([0] + [d or 0 for d in s.shape[1:]], s.dtype),
                                batched.element_spec)
  return batched.concatenate(tf.data.Dataset.from_tensors(empty)).take(1).get_single_element()


def _missing(ids, size: int):
  """The ids in [0, ``size``) that ``ids`` lacks, ascending (int64)."""
  present = tf.scatter_nd(ids[:, None], tf.ones_like(ids, tf.int32), [size])
  return tf.where(present == 0)[:, 0]


def _merge(ids, batch, fill_ids, fill, size: int):
  """The rows of ``batch`` (ids ``ids``) and ``fill`` (``fill_ids``) together, in the order of their ids."""
  order = tf.argsort(tf.concat([ids, fill_ids], 0))
  return tf.nest.map_structure(lambda a, b: tf.ensure_shape(tf.gather(tf.concat([a, b], 0), order),
                                                            [size] + a.shape[1:]), batch, fill)


def readable_batch(data, size: int, row: Callable, fill: Callable, count=None):
  """A batch of ``size`` rows: ``row(i)`` (a dict) for i in [0, ``count``) (default: all), computed in parallel,
  except those that raise (an unreadable image), which, with the rows from ``count`` on, are ``fill(their ids)``
  (a batch of as many rows).

  The rows of one batch run in one nested dataset (a sub-dataset per row would instantiate the row's function,
  the whole augmentation, once per row: 2 ms)."""
  rows = tf.data.Dataset.range(size if count is None else count).map(
      lambda i: (i, row(i)), num_parallel_calls=threads(data), deterministic=True)
  ids, batch = batch_of(rows.ignore_errors(), size)
  missing = _missing(ids, size)

  def complete():
    return tf.nest.map_structure(lambda x: tf.ensure_shape(x, [size] + x.shape[1:]), batch)

  return tf.cond(tf.size(missing) > 0, lambda: _merge(ids, batch, missing, fill(missing), size), complete)


# --- the global stream over in-memory examples -------------------------------------------------------------

def example_index(pos, seed: int, n: int):
  """The example shown at global stream position ``pos``: ``index_shuffle(pos mod n)`` of a permutation of the
  ``n`` examples seeded by (``seed``, epoch = pos // n)."""
  return tf.random.experimental.index_shuffle(
      pos % n, seed=tf.stack([tf.constant(seed, tf.int64), pos // n]), max_index=n - 1)


def _check_examples(labels) -> int:
  if len(labels) == 0:
    raise ValueError('The training split has no examples.')
  return len(labels)


def array_stream(images, labels, seed: int, start_step: int, local_b: int, process_index: int,
                 process_count: int, fn: Callable) -> tf.data.Dataset:
  """The train stream (:meth:`Source.train_stream`) of in-memory ``images`` (float [N, H, W, C] in [0, 1]) and
  ``labels``: position ``pos = step·global_batch + process·local_b + slot`` shows example
  :func:`example_index` with seed ``fold_in((seed, 0), pos)``; the same for any number of processes."""
  n = _check_examples(labels)
  images, labels = tf.constant(images), tf.constant(labels)
  global_b = local_b * process_count
  base_seed = tf.constant([seed, 0], tf.int64)

  def load(t):
    pos = (start_step + t // local_b) * global_b + process_index * local_b + t % local_b
    idx = example_index(pos, seed, n)
    return fn(tf.random.experimental.stateless_fold_in(base_seed, pos), tf.gather(images, idx),
              tf.gather(labels, idx))

  return tf.data.Dataset.counter(dtype=tf.int64).map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(
      local_b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)


class _FileStream:
  """The train stream of in-memory file ``paths`` (read here, decoded if ``decode``): the positions, seeds and
  examples of :func:`array_stream`; the rows of a batch are computed together (:func:`readable_batch`), and a
  position whose file is unreadable shows the first readable of its further candidates j = 1, 2, ... (the
  examples of positions ``pos + j·n``, the same slot of later epochs), still with the augmentation seed of
  ``pos``."""

  def __init__(self, paths, labels, data, seed, start_step, local_b, process_index, process_count, fn, decode):
    self.n = _check_examples(labels)
    self.paths, self.labels = tf.constant(paths), tf.constant(labels)
    self.data, self.seed, self.start_step, self.local_b = data, seed, start_step, local_b
    self.process_index, self.global_b = process_index, local_b * process_count
    self.fn, self.decode = fn, decode
    self.base_seed = tf.constant([seed, 0], tf.int64)
    # One trace, and one function to optimise, for the first and the further candidates.
    self.example = tf.function(self._example,
                               input_signature=[tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)])

  def _example(self, pos, idx):
    item = tf.io.read_file(tf.gather(self.paths, idx))
    if self.decode:
      item = augment.decode(item, self.data.channels)
    return self.fn(tf.random.experimental.stateless_fold_in(self.base_seed, pos), item, tf.gather(self.labels, idx))

  def index(self, pos):
    return example_index(pos, self.seed, self.n)

  def dataset(self) -> tf.data.Dataset:
    # Two batches at a time: each batch's rows already run in parallel; the second fills the first one's tail.
    return tf.data.Dataset.counter(dtype=tf.int64).map(self.local_batch, num_parallel_calls=2, deterministic=True)

  def local_batch(self, k):
    first = (self.start_step + k) * self.global_b + self.process_index * self.local_b
    return readable_batch(self.data, self.local_b, lambda i: self.row(first + i),
                          lambda missing: self.replacements(first, missing))

  def row(self, pos):
    return dict(self.example(pos, self.index(pos)), **{UNREADABLE: tf.constant(0), UNREADABLE_PATH: tf.constant('')})

  def replacements(self, first, missing):
    rows = tf.data.Dataset.from_tensor_slices(missing).interleave(
        lambda i: self.first_readable(first, i), cycle_length=threads(self.data),
        num_parallel_calls=threads(self.data), deterministic=True)
    return batch_of(rows, self.local_b)[1]

  def first_readable(self, first, i):
    """Row i of a later candidate: a sub-dataset per unreadable row (rare)."""
    pos = first + i
    first_path = tf.gather(self.paths, self.index(pos))

    def attempt(j):
      out = self.example(pos, self.index(pos + j * self.n))
      return i, dict(out, **{UNREADABLE: tf.cast(j, tf.int32), UNREADABLE_PATH: first_path})

    def give_up(_):  # reached only when every candidate failed: an error that says so
      fail = tf.debugging.Assert(pos < 0, [f'{MAX_TRIES} images in a row are unreadable (stream position', pos,
                                           'first', first_path, '); is data.data_dir a folder of images?'])
      with tf.control_dependencies([fail]):
        return tf.nest.map_structure(tf.identity, placeholder)

    tries = tf.data.Dataset.range(1, MAX_TRIES).map(attempt).ignore_errors()
    placeholder = tf.nest.map_structure(lambda s: tf.zeros([d or 1 for d in s.shape], s.dtype), tries.element_spec)
    return tries.concatenate(tf.data.Dataset.from_tensors(0).map(give_up)).take(1)


def file_stream(paths, labels, data, seed: int, start_step: int, local_b: int, process_index: int,
                process_count: int, fn: Callable, decode: bool) -> tf.data.Dataset:
  """The train stream of an image folder's files ``paths`` (see :class:`_FileStream`); ``decode``: images
  decoded here, else ``fn`` gets the encoded bytes."""
  return _FileStream(paths, labels, data, seed, start_step, local_b, process_index, process_count, fn,
                     decode).dataset()


# --- evaluation shares -------------------------------------------------------------------------------------

def share_bounds(total: int, process_index: int = 0, process_count: int = 1) -> tuple[int, int]:
  """This process's contiguous share ``[start, stop)`` of ``total`` examples (sizes differ by at most one)."""
  return process_index * total // process_count, (process_index + 1) * total // process_count


def eval_batch_count(total: int, local_b: int, process_count: int) -> int:
  """Batches of ``local_b`` that hold the largest process's share of ``total``: every process yields as many."""
  largest_share = -(-total // process_count)
  return -(-largest_share // local_b)


def padded_batches(ds: tf.data.Dataset, local_b: int, batches: int) -> tf.data.Dataset:
  """``batches`` batches ``{'image', 'label', 'index', 'mask'}`` of ``local_b`` rows from ``ds`` (elements
  ``((image, label), index)``), padded after its end with rows of mask 0 and index -1."""
  ds = ds.map(lambda xy, i: {'image': xy[0], 'label': tf.cast(xy[1], tf.int32), 'index': i, 'mask': tf.constant(1.0)})
  pad = {'image': tf.zeros(ds.element_spec['image'].shape, tf.float32), 'label': tf.constant(0),
         'index': tf.constant(-1, tf.int64), 'mask': tf.constant(0.0)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(batches * local_b)
  return ds.batch(local_b)
