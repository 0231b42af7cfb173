"""The checkpoint follower's cadence (vicreg_jax/evaluate/watch.py): 'latest' never evaluates a checkpoint older
than one it has evaluated and always evaluates the final one; a checkpoint deleted between listing and reading is
skipped. A fake listing for the choice; a real orbax directory, written as a pretraining run keeping 3
checkpoints and every 4th step, for the follower."""

import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vicreg_jax import checkpoints, parallel
from vicreg_jax.evaluate import watch


class Listing:
  """A stand-in for an orbax manager that lists ``steps``."""

  def __init__(self, steps):
    self.steps = list(steps)

  def reload(self):
    pass

  def all_steps(self):
    return self.steps


@pytest.mark.parametrize('mode, listed, done, want', [
    ('latest', [4, 8, 10, 11], {}, 11),
    ('latest', [4, 8, 10, 11], {'11': {}}, None),         # 10 was never evaluated, but 11 was: never back
    ('latest', [4, 8, 10, 11], {'10': {}}, 11),
    ('latest', [4, 8, 10, 11], {'9': {}}, 11),
    ('latest', [4, 8], {'10': 'gone'}, None),              # a skipped step counts as done
    ('latest', [4, 8, 10, 11, 12], {'11': {}}, 12),
    ('latest', [4, 8, 12], {'13': {}}, 12),                # the final one, even after a newer step
    ('latest', [4, 8, 12], {'4': {}, '12': {}}, None),
    ('all', [4, 8, 10, 11], {'4': {}}, 8),                 # every one, oldest first
    ('all', [4, 8, 10, 11], {'11': {}}, 4),
    ('final', [4, 8, 10, 11], {}, None),
    ('final', [4, 8, 12], {}, 12),
])
def test_which_checkpoint_is_next(mode, listed, done, want):
  config = ml_collections.ConfigDict({'checkpoints': mode})
  assert watch.next_checkpoint(Listing(listed), done, config, final_step=12) == want


class Run:
  """A pretraining run's checkpoint directory, written by the trainer's manager: a checkpoint every step,
  the newest 3 kept and every multiple of 4; each holds a backbone whose one array is its step."""

  def __init__(self, directory, final: int):
    self.mngr, self.step, self.final = checkpoints.manager(directory, 3, keep_every=4), 0, final

  def advance(self, n: int):
    for _ in range(min(n, self.final - self.step)):
      self.step += 1
      tree = {'params': {'backbone': {'w': jnp.full((2,), self.step, jnp.float32)}, 'projector': jnp.zeros(3)},
              'batch_stats': {'backbone': {'m': jnp.zeros((2,))}}}
      checkpoints.save(self.mngr, self.step, tree)
      self.mngr.wait_until_finished()  # the save, and the deletions it decided, done

  def listing(self):
    return sorted(int(p.name) for p in self.mngr.directory.iterdir() if p.name.isdigit())


@pytest.mark.parametrize('mode, lag, gone_at, evaluated', [
    ('latest', 3, None, [2, 5, 8, 11, 12]),
    ('latest', 3, 5, [2, 8, 11, 12]),       # 5 deleted between listing and reading: skipped, the newest taken
    ('latest', 0, None, list(range(2, 13))),  # faster than the run: waits for the next one, never takes 1
    ('all', 3, None, [1, 3, 4, 8, 10, 11, 12]),  # behind the run: what is still on disk, every kept multiple of 4
])
def test_the_follower_beside_a_run(tmp_path, monkeypatch, mode, lag, gone_at, evaluated):
  """Each evaluation takes as long as ``lag`` of the run's checkpoints, each wait for a new one as long as one;
  the follower's choices, each read for real."""
  run, picked = Run(tmp_path / 'pre' / 'checkpoints', final=12), []
  run.advance(2)
  monkeypatch.setattr(watch, 'time', types.SimpleNamespace(time=time.time, sleep=lambda seconds: run.advance(1)))
  read = checkpoints.read_backbone

  def read_backbone(directory, step, mesh, retry_seconds):
    listed = run.listing()
    if step == gone_at:
      run.advance(3)  # the run's next saves delete it meanwhile
    outcome, value = read(directory, step, mesh, retry_seconds)
    picked.append((step, listed, outcome))
    return outcome, value

  def evaluate(step, backbone):
    assert np.all(np.asarray(jax.device_get(backbone['params']['w'])) == step)  # that checkpoint's backbone
    run.advance(lag)
    return {'top1': step / 100}

  monkeypatch.setattr(checkpoints, 'read_backbone', read_backbone)
  config = ml_collections.ConfigDict(dict(checkpoints=mode, poll_seconds=0.01, timeout_seconds=30.0,
                                          restore_retry_seconds=5.0))
  results = {}
  (tmp_path / 'eval').mkdir()
  assert not watch.follow(config, str(tmp_path / 'pre'), 12, results, str(tmp_path / 'eval'),
                          parallel.make_mesh(), evaluate)
  assert [int(s) for s in results] == evaluated
  assert watch.load_results(str(tmp_path / 'eval')) == {str(s): {'top1': s / 100} for s in evaluated}
  if mode == 'latest':  # each pick the newest listed at the time
    assert all(step == listed[-1] for step, listed, _ in picked), picked
  assert [(s, outcome) for s, _, outcome in picked if outcome != checkpoints.READ] == (
      [(gone_at, checkpoints.GONE)] if gone_at else [])
  assert run.listing() == [4, 8, 10, 11, 12]  # the newest 3 and the multiples of 4
  run.mngr.close()


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """The workdir of a finished run of :class:`Run` (checkpoints 4, 8, 10, 11, 12 kept)."""
  pre = tmp_path_factory.mktemp('finished')
  run = Run(pre / 'checkpoints', final=12)
  run.advance(12)
  run.mngr.close()
  return str(pre)


@pytest.mark.parametrize('mode, added', [('all', [4, 10]), ('latest', []), ('final', [])])
def test_after_the_run_all_adds_what_latest_skipped(finished, tmp_path, mode, added):
  """The results of a 'latest' follower (2, 5, 8, 11, 12) and a finished run keeping 4, 8, 10, 11, 12: the same
  job run again with 'all' evaluates 4 and 10, oldest first; with 'latest' or 'final', nothing."""
  (tmp_path / 'eval').mkdir()
  results, evaluated = {str(s): {'top1': 0.0} for s in (2, 5, 8, 11, 12)}, []
  config = ml_collections.ConfigDict(dict(checkpoints=mode, poll_seconds=0.01, timeout_seconds=30.0,
                                          restore_retry_seconds=5.0))
  assert not watch.follow(config, finished, 12, results, str(tmp_path / 'eval'), parallel.make_mesh(),
                          lambda step, backbone: evaluated.append(step) or {'top1': 1.0})
  assert evaluated == added and sorted(map(int, results)) == sorted([2, 5, 8, 11, 12] + added)
