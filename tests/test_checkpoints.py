"""Only a damaged checkpoint is set aside; any other reading error is retried, then stops the job with one line,
every checkpoint where it was (pretraining, the evaluation jobs' reader, one process and two). SIGTERM during
the linear job saves the head's state and exits 0; the same command continues to the uninterrupted results. Only
vicreg_jax/checkpoints.py imports orbax."""

import glob
import json
import os
import re
import signal
import time

import pytest

from conftest import REPO, Job, load_config, tiny_digits
from vicreg_jax import checkpoints, errors, train
from vicreg_jax.evaluate import linear

TINY = ['--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', '--config.batch_size=64',
        '--config.final_probe.enabled=False', '--config.log_every_steps=1', '--config.compilation_cache=']


def listing(work) -> list:
  return sorted(int(p.name) for p in (work / 'checkpoints').iterdir() if p.name.isdigit())


def mtimes(work) -> dict:
  return {p: os.path.getmtime(p) for p in glob.glob(str(work / 'checkpoints' / '*' / 'default' / '_METADATA'))}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny digits run stopped at step 4 with checkpoints 2 and 4 (of 6), and its config."""
  work = tmp_path_factory.mktemp('pre') / 'run'
  config = tiny_digits(num_steps=6, checkpoint_every_steps=2, keep_checkpoints=10, max_steps_per_run=4,
                       restore_retry_seconds=3.0)
  train.train_and_evaluate(config, str(work))
  assert listing(work) == [2, 4]
  return work, config


def copy_run(pretrained, tmp_path):
  import shutil
  work, config = pretrained
  shutil.copytree(work, tmp_path / 'run')
  config = config.copy_and_resolve_references()
  config.max_steps_per_run = 0
  return tmp_path / 'run', config


def test_inspect_finds_damage_in_the_files_only(pretrained, tmp_path):
  """Intact: None. Truncated array data, unparseable or missing metadata: a reason. Deleted: 'gone'. The storage
  failing while inspecting: InspectionError (no evidence either way)."""
  work, _ = copy_run(pretrained, tmp_path)
  d = str(work / 'checkpoints')
  assert checkpoints.inspect(d, 2) is None and checkpoints.inspect(d, 4) is None
  for data in glob.glob(os.path.join(checkpoints.path(d, 4), 'd', '*')):
    os.truncate(data, os.path.getsize(data) // 2)
  assert 'cannot be read back' in checkpoints.inspect(d, 4)
  meta = os.path.join(checkpoints.path(d, 2), '_METADATA')
  with open(meta, 'w') as f:
    f.write('{"tree_metadata": ')
  assert 'metadata does not parse' in checkpoints.inspect(d, 2)
  os.remove(meta)
  assert 'missing' in checkpoints.inspect(d, 2)
  assert checkpoints.inspect(d, 8) == 'gone'
  import tensorflow as tf
  original = tf.io.gfile.GFile

  def down(*args, **kwargs):
    raise tf.errors.UnavailableError(None, None, '503 Service Unavailable')

  tf.io.gfile.GFile = down
  try:
    os.makedirs(os.path.dirname(meta), exist_ok=True)
    open(meta, 'w').close()
    with pytest.raises(checkpoints.InspectionError, match='503'):
      checkpoints.inspect(d, 2)
  finally:
    tf.io.gfile.GFile = original


def test_a_storage_error_then_success_resumes_from_the_newest_with_nothing_set_aside(pretrained, tmp_path,
                                                                                       monkeypatch):
  work, config = copy_run(pretrained, tmp_path)
  original, calls = checkpoints._restore_state, []

  def flaky(directory, step, target):
    calls.append(step)
    if len(calls) == 1:
      raise OSError('503 Service Unavailable (injected)')
    return original(directory, step, target)

  monkeypatch.setattr(checkpoints, '_restore_state', flaky)
  t0 = time.time()
  summary = train.train_and_evaluate(config, str(work))
  print(f'one failed read of checkpoint 4 retried after {time.time() - t0:.1f} s in all; calls {calls}')
  assert calls == [4, 4] and summary['steps'] == 6
  assert listing(work) == [2, 4, 6] and not (work / 'damaged_checkpoints').exists()


@pytest.mark.parametrize('inspection', ['intact', 'storage down'])
def test_a_persistent_error_that_is_not_damage_stops_and_moves_nothing(pretrained, tmp_path, monkeypatch,
                                                                       inspection):
  """Every restore raising (out of memory), the checkpoint intact or its inspection failing too: after
  ``restore_retry_seconds`` of retries, CheckpointReadError naming the checkpoint; every checkpoint in place and
  unchanged, no new run from step 0."""
  work, config = copy_run(pretrained, tmp_path)
  before = mtimes(work)

  attempts, inspections, original = [], [], checkpoints.inspect

  def oom(directory, step, target):
    attempts.append(step)
    raise MemoryError('RESOURCE_EXHAUSTED: out of memory while restoring (injected)')

  def inspect(directory, step):
    inspections.append(step)
    if inspection == 'storage down':
      raise checkpoints.InspectionError('UNAVAILABLE: 503 (injected)')
    return original(directory, step)

  monkeypatch.setattr(checkpoints, '_restore_state', oom)
  monkeypatch.setattr(checkpoints, 'inspect', inspect)
  t0 = time.time()
  judged = (r'its files show no damage' if inspection == 'intact' else
            r'inspecting its files failed too \(UNAVAILABLE.*\)')
  expected = (r'^cannot read checkpoint 4 in .*checkpoints \(MemoryError: RESOURCE_EXHAUSTED.*\); '
              rf'{judged}, so it was left where it is; gave up after \d+ s')
  with pytest.raises(checkpoints.CheckpointReadError, match=expected) as e:
    train.train_and_evaluate(config, str(work))
  took = time.time() - t0
  print(f'{inspection}: gave up after {took:.1f} s (restore_retry_seconds=3), {len(attempts)} attempts, '
        f'{len(inspections)} inspections: {e.value}')
  assert '\n' not in str(e.value) and took < 60 and len(attempts) >= 2 and set(attempts) == {4}
  # a checkpoint found whole is inspected once; one whose inspection failed, after every attempt
  assert len(inspections) == (1 if inspection == 'intact' else len(attempts))
  assert listing(work) == [2, 4] and mtimes(work) == before and not (work / 'damaged_checkpoints').exists()


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_the_command_line_exits_1_with_one_line_and_the_checkpoints_in_place(pretrained, tmp_path):
  work, _ = copy_run(pretrained, tmp_path)
  before = mtimes(work)
  job = Job([*TINY, '--config.num_steps=6', '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=10',
             '--config.restore_retry_seconds=2', f'--workdir={work}'], tmp_path / 'logs', devices=8,
            env={checkpoints.RESTORE_FAULT_ENV: '0:1000:memory'})
  assert job.wait(300) == [1]
  errors_lines = [line for line in job.stderr().splitlines() if line.startswith('error:')]
  print(errors_lines)
  assert len(errors_lines) == 1 and 'cannot read checkpoint 4' in errors_lines[0]
  assert 'Traceback' not in job.stderr()
  assert listing(work) == [2, 4] and mtimes(work) == before and not (work / 'damaged_checkpoints').exists()


@pytest.mark.slow
def test_two_processes_resume_when_only_process_1s_first_read_fails(pretrained, tmp_path):
  work, _ = copy_run(pretrained, tmp_path)
  job = Job([*TINY, '--config.num_steps=6', '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=10',
             '--config.restore_retry_seconds=60', f'--workdir={work}'], tmp_path / 'logs', processes=2,
            env={checkpoints.RESTORE_FAULT_ENV: '1:1:storage'}).check(600)
  assert re.search(r'Cannot read checkpoint 4 in .*OSError: injected: 503.*trying again', job.stderr(1))
  for i in range(2):
    assert re.search(r'Resumed from .* at step 4\b', job.stderr(i)), job.stderr(i)[-2000:]
  assert listing(work) == [2, 4, 6] and not (work / 'damaged_checkpoints').exists()


# --- the linear job's reader ----------------------------------------------------------------------------------

def linear_config(pre, name='digits_linear', **overrides):
  cfg = load_config(name)
  cfg.update(pretrain_workdir=str(pre), epochs=1, poll_seconds=0.1, timeout_seconds=60.0, restore_retry_seconds=3.0,
             **overrides)
  return cfg


@pytest.fixture(scope='module')
def finished(pretrained, tmp_path_factory):
  """The tiny run of :func:`pretrained` run to its end (checkpoints 2, 4, 6)."""
  import shutil
  work = tmp_path_factory.mktemp('finished') / 'run'
  shutil.copytree(pretrained[0], work)
  config = pretrained[1].copy_and_resolve_references()
  config.max_steps_per_run = 0
  train.train_and_evaluate(config, str(work))
  return work


@pytest.mark.slow
def test_the_linear_reader_retries_a_storage_error_and_stops_on_a_persistent_one(finished, tmp_path, monkeypatch):
  original, calls = checkpoints.restore_subtrees, []

  def flaky(directory, step, target, fails=1):
    calls.append(step)
    if len(calls) <= fails:
      raise OSError('503 Service Unavailable (injected)')
    return original(directory, step, target)

  monkeypatch.setattr(checkpoints, 'restore_subtrees', flaky)
  results = linear.run(linear_config(finished), str(tmp_path / 'lin'))
  assert calls == [2, 2, 4, 6] and sorted(results, key=int) == ['2', '4', '6']
  calls.clear()
  monkeypatch.setattr(checkpoints, 'restore_subtrees', lambda *a: flaky(*a, fails=10 ** 6))
  with pytest.raises(checkpoints.CheckpointReadError, match=r'^cannot read pretraining checkpoint 2 in .*OSError'):
    linear.run(linear_config(finished), str(tmp_path / 'lin2'))
  assert len(calls) >= 2 and set(calls) == {2}
  assert listing(finished) == [2, 4, 6]


@pytest.mark.slow
def test_the_linear_reader_skips_a_damaged_checkpoint_and_stops_on_a_damaged_final_one(finished, tmp_path):
  import shutil
  pre = tmp_path / 'pre'
  shutil.copytree(finished, pre)
  for data in glob.glob(os.path.join(checkpoints.path(str(pre / 'checkpoints'), 4), 'd', '*')):
    os.truncate(data, os.path.getsize(data) // 2)
  results = linear.run(linear_config(pre), str(tmp_path / 'lin'))
  assert sorted(results, key=int) == ['2', '6'] and listing(pre) == [2, 4, 6]  # nothing moved by a reader
  os.remove(os.path.join(checkpoints.path(str(pre / 'checkpoints'), 6), '_METADATA'))
  with pytest.raises(errors.WorkdirError, match=r'^checkpoint 6 of .* is damaged \(its metadata file _METADATA is '
                                                r'missing\); run the pretraining command again'):
    linear.run(linear_config(pre), str(tmp_path / 'lin2'))


# --- SIGTERM during the linear job ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('processes', [1, 2])
def test_sigterm_during_the_linear_job_saves_the_head_and_the_same_command_continues(finished, tmp_path, processes):
  logs = tmp_path / 'logs'
  args = ['--config=configs/digits_linear.py', f'--config.pretrain_workdir={finished}', '--config.epochs=150',
          '--config.checkpoints=final', '--config.log_every_steps=20', '--config.checkpoint_every_steps=100000',
          '--config.poll_seconds=0.1', '--config.classifier.report=best']
  env = {checkpoints.RESTORE_FAULT_ENV: '1:1:storage'} if processes == 2 else {}
  Job([*args, f"--workdir={tmp_path / 'reference'}"], logs, processes=processes, name="reference").check()
  job = Job([*args, f'--workdir={tmp_path / "eval"}'], logs, processes=processes, name='stopped', env=env)
  deadline = time.time() + 300
  while not re.search(r'ckpt6: step \d+/', job.stderr(0)):
    assert time.time() < deadline and all(p.poll() is None for p in job.procs), job.stderr(0)[-3000:]
    time.sleep(0.05)
  job.procs[-1].send_signal(signal.SIGTERM)  # two processes: process 1 only, JAX's preemption service tells 0
  assert job.wait(120) == [0] * processes, job.stderr(0)[-3000:]
  m = re.search(r'Stopped at step (\d+) of (\d+) of the head of checkpoint 6 \(preempted \(SIGTERM\)\)', job.stdout(0))
  assert m, job.stdout(0)[-2000:] + job.stderr(0)[-2000:]
  k, total = int(m.group(1)), int(m.group(2))
  assert 0 < k < total and os.listdir(tmp_path / 'eval' / 'heads' / '6') == [str(k)]
  assert not (tmp_path / 'eval' / 'results.json').exists()
  if processes == 2:
    assert re.search(r'Cannot read pretraining checkpoint 6 .*injected: 503.*trying again', job.stderr(1))
  resumed = Job([*args, f'--workdir={tmp_path / "eval"}'], logs, processes=processes, name='resumed').check()
  assert re.search(rf'ckpt6: resumed head training at step {k}\b', resumed.stderr(0))
  ours, theirs = (json.loads((tmp_path / w / 'results.json').read_text())['6'] for w in ('eval', 'reference'))
  print(f'{processes} process(es): stopped at head step {k} of {total}; resumed: {ours}; uninterrupted: {theirs}')
  timing = ('seconds', 'finished_at')
  assert {k: v for k, v in ours.items() if k not in timing} == {k: v for k, v in theirs.items() if k not in timing}
  assert 'last_top1' in ours  # the best epoch's figures, kept across the restart


# --- one checkpoint module, one loop ----------------------------------------------------------------------------

def test_only_the_checkpoints_module_imports_orbax():
  importers = sorted(str(p.relative_to(REPO)) for p in (REPO / 'vicreg_jax').rglob('*.py')
                     if re.search(r'^\s*(import orbax|from orbax[ .])', p.read_text(), re.M))
  assert importers == ['vicreg_jax/checkpoints.py']
  # the check itself finds an import inside a function (as convert_weights.py had)
  assert re.search(r'^\s*(import orbax|from orbax[ .])', 'def f():\n  import orbax.checkpoint as ocp\n', re.M)


@pytest.mark.slow  # three jobs end to end, 9 s: the fast tier stays under 5 minutes
def test_pretraining_and_both_evaluation_jobs_run_through_the_loop(monkeypatch, tmp_path):
  """train.py and classifier.py call loop.run and define no step loop of their own."""
  from vicreg_jax import loop
  for module in ('train.py', 'evaluate/classifier.py'):
    text = (REPO / 'vicreg_jax' / module).read_text()
    assert 'loop.run(' in text and 'jax.block_until_ready(previous)' not in text, module
  seen = []
  original = loop.run
  monkeypatch.setattr(loop, 'run', lambda *a, **k: seen.append(k['checkpoint'].every) or original(*a, **k))
  pre = tmp_path / 'pre'
  train.train_and_evaluate(tiny_digits(num_steps=2, checkpoint_every_steps=2), str(pre))
  linear.run(linear_config(pre, checkpoints='final'), str(tmp_path / 'lin'))
  linear.run(linear_config(pre, 'digits_semi', checkpoints='final'), str(tmp_path / 'ft'), finetune=True)
  assert len(seen) == 3, seen


# --- what the pretraining run keeps -----------------------------------------------------------------------------

def _save_steps(mngr, steps) -> None:
  import jax.numpy as jnp
  for step in steps:
    checkpoints.save(mngr, step, {'w': jnp.full((3,), step, jnp.float32)})
    mngr.wait_until_finished()


@pytest.mark.parametrize('keep_every, first, second', [
    (4, [4, 8, 9, 10], [4, 8, 12, 13, 14]),
    (0, [9, 10], [13, 14]),
])
def test_keep_checkpoints_every_keeps_the_multiples_and_keep_checkpoints_trims_the_rest(tmp_path, keep_every, first,
                                                                                       second):
  """A real orbax manager keeping the newest 2: with ``keep_every`` 4 every multiple of 4 stays too, also across
  a restart (a new manager on the same directory, as a resumed run makes)."""
  directory = tmp_path / 'checkpoints'
  mngr = checkpoints.manager(str(directory), 2, keep_every=keep_every)
  _save_steps(mngr, range(1, 11))
  assert checkpoints.steps(mngr) == first
  mngr.close()
  mngr = checkpoints.manager(str(directory), 2, keep_every=keep_every)
  _save_steps(mngr, range(11, 15))
  assert checkpoints.steps(mngr) == second == sorted(int(p.name) for p in directory.iterdir())
  mngr.close()


def test_keep_checkpoints_every_is_a_multiple_of_the_checkpoint_period():
  """configs/imagenet.py keeps every 20th epoch's checkpoint; a period the saves never hit is one line."""
  from vicreg_jax import config as schema
  imagenet = load_config('imagenet')
  assert imagenet.keep_checkpoints_every == 20 * 625 and imagenet.keep_checkpoints_every % 2500 == 0
  schema.validate(imagenet)
  assert load_config('imagenet_linear').checkpoints == 'latest'
  with pytest.raises(errors.ConfigError, match=r'^config.keep_checkpoints_every must be a multiple of '
                                               r'config.checkpoint_every_steps \(2500\)'):
    schema.validate(tiny_digits(checkpoint_every_steps=2500, keep_checkpoints_every=6250))
