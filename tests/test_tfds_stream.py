"""The TFDS training stream on real record files (written here): each epoch a permutation of the process's share
with its own file order per epoch and process, an exact resume that starts inside a file, the same records with
``data.cache``, and no wait at an epoch boundary (benchmarks/epoch_boundary.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO, job_env
from vicreg_jax.data import file_windows, pipeline
from vicreg_jax.data.sources import tfds

_spec = importlib.util.spec_from_file_location('epoch_boundary', REPO / 'benchmarks' / 'epoch_boundary.py')
epoch_boundary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(epoch_boundary)

FILES = [10, 7, 12, 9, 11, 8]  # 57 examples in 6 files


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  epoch_boundary.write_dataset(root, FILES)
  return root


def _data(data_dir, **kw):
  return ml_collections.ConfigDict(dict(dict(name='cifar10', data_dir=str(data_dir), shuffle_buffer=8,
                                             cache=False), **kw))


def ids(data, start: int, count: int, process_index: int = 0, process_count: int = 1, seed: int = 0) -> list:
  """The example ids (written into the images) of ``count`` records of the stream from position ``start``."""
  pieces, read, decode = tfds.train_share(data, 'train', process_index, process_count)
  ds = file_windows.windowed_stream(pieces, read, data.shuffle_buffer, seed, process_index, start, data.cache)
  ds = ds.map(decode).map(lambda ex: ex['image'][0, 0])
  return [int(x[0]) + 256 * int(x[1]) for x in ds.take(count).as_numpy_iterator()]


def _runs(order, sizes):
  """The files (index in ``sizes``) that ``order``'s ids come from, each run of one file once."""
  bounds = np.cumsum(sizes)
  files = [int(np.searchsorted(bounds, i, side='right')) for i in order]
  return [f for k, f in enumerate(files) if k == 0 or files[k - 1] != f]


def test_each_epoch_is_a_permutation_of_the_share_with_its_own_file_order(data_dir):
  """Two processes: disjoint shares of 28 (even_splits, the remainder dropped), each epoch all of the share once;
  without shuffling (buffer 1) the files' runs show the file order, which differs between epochs and processes."""
  shares = []
  for p in range(2):
    epochs = np.array(ids(_data(data_dir), 0, 3 * 28, p, 2)).reshape(3, 28)
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert len(set(epochs[0])) == 28 and not all(np.array_equal(epochs[0], e) for e in epochs[1:])
    shares.append(set(epochs[0]))
  assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 56
  plain = _data(data_dir, shuffle_buffer=1)
  orders = [_runs(ids(plain, 57 * e, 57), FILES) for e in range(3)]
  assert all(sorted(o) == list(range(6)) for o in orders)  # every file read whole, in one run
  assert len({tuple(o) for o in orders}) == 3
  per_process = [file_windows.piece_order(file_windows.stream_seed(0, p), 0, 6).numpy().tolist() for p in range(2)]
  assert per_process[0] != per_process[1]


def test_resume_anywhere_equals_the_uninterrupted_stream(data_dir):
  """Restarted at any position (inside a window, at a window's or an epoch's start, epochs later), on each of two
  processes, the stream continues the uninterrupted one record for record; with data.cache too."""
  for p in range(2):
    fresh = ids(_data(data_dir), 0, 4 * 28, p, 2)
    for start in (5, 8, 28, 61):  # inside a window, a window's start, an epoch's start, epochs later
      assert ids(_data(data_dir), start, 20, p, 2) == fresh[start:start + 20], (p, start)
    assert ids(_data(data_dir, cache=True), 0, 4 * 28, p, 2) == fresh
    assert ids(_data(data_dir, cache=True), 30, 20, p, 2) == fresh[30:50]


def test_a_resumed_window_reads_from_inside_its_first_file():
  """The parts a window reads: the pieces in the epoch's order, cut at the window's edges."""
  take = np.array([10, 7, 12])
  order = np.array([2, 0, 1])  # records 0-11 from piece 2, 12-21 from piece 0, 22-28 from piece 1
  parts = [t.numpy().tolist() for t in file_windows.window_pieces(take, order, 8, 16)]
  assert parts == [[2, 0], [8, 0], [4, 4]]
  parts = [t.numpy().tolist() for t in file_windows.window_pieces(take, order, 24, 29)]
  assert parts == [[1], [2], [5]]


def test_training_batches_resume_exactly_on_real_files(data_dir):
  """The trainer's batches (views, labels) after a restart at step k equal an uninterrupted run's from step k."""
  config = epoch_boundary.cifar10_config(data_dir, 16, 12)
  fresh = [b for _, b in zip(range(8), pipeline.pretrain_dataset(config, 0).as_numpy_iterator())]
  for k in (3, 5):  # inside epochs 0 and 1 (57 examples, 16 per step)
    resumed = [b for _, b in zip(range(8 - k), pipeline.pretrain_dataset(config, k).as_numpy_iterator())]
    for a, b in zip(fresh[k:], resumed):
      for key in ('view1', 'view2', 'label'):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_no_wait_at_the_epoch_boundary():
  """benchmarks/epoch_boundary.py on a small slow-read dataset (5 ms per record read, 16 files of 8, a buffer of
  8 batches, 10 ms per step): the old stream waits at each boundary for its buffer to refill; the windowed one does not. Relative
  figures with generous slack (a loaded machine): the new boundary gap is under half the old one."""
  args = ['--files=16', '--per_file=8', '--batch=8', '--buffer=64', '--epochs=3', '--delay_ms=5', '--step_ms=10',
          '--json']

  def run(extra):  # its own process: the command never destroys its sleeping streams (epoch_boundary._ALIVE)
    r = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'epoch_boundary.py'), *args, *extra],
                       capture_output=True, text=True, timeout=300, env=job_env(1), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

  new, old = run([]), run(['--old'])
  assert new['boundary_max'] < old['boundary_max'] / 2, (new, old)
