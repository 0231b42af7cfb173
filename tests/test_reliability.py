"""Nothing is lost to a kill, a preemption, a NaN or a damaged checkpoint: the pretraining command killed
(SIGKILL) at chosen moments, one of them while a save is held open, and preempted (SIGTERM), on one process and
on two, resumed by the same command; non-finite steps stopped or skipped; damaged checkpoints set aside."""

import glob
import os
import re
import shutil
import signal
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import Job, checkpoint_arrays, max_abs_difference, tiny_digits
from vicreg_jax import checkpoints, errors, train
from vicreg_jax.evaluate import watch

# The long-run features on (issue 13): prefetch to the devices, uint8 transfer with the colour ops on the devices
# (the digits views without their pixel noise, which uint8 would clip), remat and two micro-batches per step.
FEATURES = {'prefetch_to_device': 2, 'augment.on_device': True, 'augment.view1.noise_std': 0.0,
            'augment.view2.noise_std': 0.0, 'model.remat': True, 'grad_accum_steps': 2}
TINY = ['--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', '--config.batch_size=64',
        '--config.final_probe.enabled=False', '--config.log_every_steps=1', '--config.optim.warmup_epochs=1',
        *(f'--config.{k}={v}' for k, v in FEATURES.items())]


def wait_for(condition, what: str, job: Job, timeout: float = 300):
  deadline = time.time() + timeout
  while not condition():
    if any(p.poll() is not None for p in job.procs):
      raise AssertionError(f'{job.name} ended while waiting for {what}:\n' + job.stderr()[-3000:])
    if time.time() > deadline:
      job.kill()
      raise AssertionError(f'{job.name}: no {what} after {timeout} s:\n' + job.stderr()[-3000:])
    time.sleep(0.05)


def logged_step(job: Job, process: int = 0) -> int:
  """The last step the run's progress line reported (0 before the first)."""
  steps = re.findall(r'\] step (\d+)/', job.stderr(process))
  return int(steps[-1]) if steps else 0


def stopped_at(job: Job, process: int = 0) -> int:
  m = re.search(r'Stopped at step (\d+) of \d+ \(preempted \(SIGTERM\)\)', job.stdout(process))
  assert m, job.stdout(process)[-2000:] + job.stderr(process)[-2000:]
  return int(m.group(1))


@pytest.mark.slow
def test_kills_and_a_preemption_end_with_the_uninterrupted_state(tmp_path):
  """Killed while the save of checkpoint 8 is held open, killed between checkpoints, preempted, killed while
  starting up, then run to the end: the same parameters, BatchNorm statistics and optimiser state as a run
  never interrupted (data order included: the same batches at the same steps)."""
  steps, logs = 24, tmp_path / 'logs'
  args = [*TINY, f'--config.num_steps={steps}', '--config.checkpoint_every_steps=4', '--config.keep_checkpoints=10']
  reference = Job([*args, f'--workdir={tmp_path / "reference"}'], logs, name='reference')
  work = tmp_path / 'run'
  command = [*args, f'--workdir={work}']

  held = Job(command, logs, name='held', env={checkpoints.HOLD_SAVE_ENV: '8'})
  wait_for((work / 'save_held').exists, 'held save', held)
  in_flight = (work / 'save_held').read_text()
  assert os.path.isdir(in_flight) and '8.orbax-checkpoint-tmp' in in_flight, in_flight
  assert not (work / 'checkpoints' / '8').exists()  # the save is provably still in flight ...
  assert checkpoints.reader(str(work / 'checkpoints')).all_steps() == [4]  # ... and no reader lists it
  held.kill()
  held.wait()

  between = Job(command, logs, name='between')
  wait_for(lambda: logged_step(between) >= 10, 'step 10', between)
  between.kill()
  between.wait()
  assert re.search(r'Resumed from .* at step 4\b', between.stderr())

  preempted = Job(command, logs, name='preempted')
  wait_for(lambda: logged_step(preempted) >= 13, 'step 13', preempted)
  preempted.procs[0].send_signal(signal.SIGTERM)
  signalled = time.time()
  assert preempted.wait(120) == [0], preempted.stderr()[-3000:]
  took = time.time() - signalled
  k = stopped_at(preempted)
  assert 13 <= k < steps and (work / 'checkpoints' / str(k)).is_dir(), k
  assert took < 30, took

  starting = Job(command, logs, name='starting')
  wait_for(lambda: 'Resumed from' in starting.stderr(), 'resume', starting)
  starting.kill()
  starting.wait()
  assert re.search(rf'Resumed from .* at step {k}\b', starting.stderr())

  Job(command, logs, name='last').check()
  reference.check()
  assert not glob.glob(str(work / 'checkpoints' / '*tmp*'))  # leftovers of the killed saves were cleaned up
  ours, theirs = (checkpoint_arrays(w / 'checkpoints' / str(steps) / 'default') for w in (work, tmp_path / 'reference'))
  diff = {k: max_abs_difference(ours[k], theirs[k]) for k in ('params', 'batch_stats', 'opt_state')}
  print(f'preempted at step {k} ({took:.1f} s to exit); max abs difference to the uninterrupted run: {diff}')
  # The same program on the same devices from a bitwise restored state: exact by construction, on any machine.
  assert max(diff.values()) == 0.0, diff
  start = checkpoint_arrays(work / 'checkpoints' / '4' / 'default')
  assert max_abs_difference(start['params'], ours['params']) > 1e-4  # trained parameters, not initial ones


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_with_a_checkpoint(tmp_path):
  logs, work = tmp_path / 'logs', tmp_path / 'run'
  command = [*TINY, '--config.num_steps=5000', '--config.checkpoint_every_steps=5000', f'--workdir={work}']
  job = Job(command, logs, processes=2, name='two')
  wait_for(lambda: logged_step(job) >= 3, 'step 3', job)
  job.procs[1].send_signal(signal.SIGTERM)  # process 1 only: JAX's preemption service tells process 0
  signalled = time.time()
  assert job.wait(120) == [0, 0], job.stderr(0)[-2000:] + job.stderr(1)[-2000:]
  took = time.time() - signalled
  k = stopped_at(job, 0)
  assert stopped_at(job, 1) == k and k >= 3 and (work / 'checkpoints' / str(k)).is_dir()
  resumed = Job([*command, '--config.max_steps_per_run=2'], logs, processes=2, name='resumed').check()
  for i in range(2):
    assert re.search(rf'Resumed from .* at step {k}\b', resumed.stderr(i))
  assert sorted(int(p.name) for p in (work / 'checkpoints').iterdir()) == [k, k + 2]
  print(f'two processes preempted at step {k}, both exited 0 within {took:.1f} s; resumed to {k + 2}')
  assert took < 60, took


@pytest.mark.slow
def test_a_nan_stops_the_run_at_its_step_with_the_checkpoints_intact_or_is_skipped(tmp_path):
  config = tiny_digits(num_steps=8, checkpoint_every_steps=2, keep_checkpoints=10, debug_nan_at_step=5, **FEATURES)
  with pytest.raises(errors.NonFiniteError, match=r'^step 5: loss became nan; stopped'):
    train.train_and_evaluate(config, str(tmp_path / 'stop'))
  steps = checkpoints.reader(str(tmp_path / 'stop' / 'checkpoints')).all_steps()
  assert steps == [2, 4], steps  # nothing saved after the bad step
  last_good = checkpoint_arrays(tmp_path / 'stop' / 'checkpoints' / '4' / 'default')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(last_good))

  config.nonfinite = 'skip'
  summary = train.train_and_evaluate(config, str(tmp_path / 'skip'))
  assert summary['steps'] == 8
  final = checkpoint_arrays(tmp_path / 'skip' / 'checkpoints' / '8' / 'default')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))
  # The skipped step changed nothing: the state after step 5 is the state after step 4 (its step counter aside).
  config.update(num_steps=5, checkpoint_every_steps=1)
  shutil.copytree(tmp_path / 'skip' / 'checkpoints' / '4', tmp_path / 'five' / 'checkpoints' / '4')
  train.train_and_evaluate(config, str(tmp_path / 'five'))
  five = checkpoint_arrays(tmp_path / 'five' / 'checkpoints' / '5' / 'default')
  four = checkpoint_arrays(tmp_path / 'skip' / 'checkpoints' / '4' / 'default')
  assert max_abs_difference({k: five[k] for k in ('params', 'opt_state')},
                            {k: four[k] for k in ('params', 'opt_state')}) == 0.0
  assert max_abs_difference(final['params'], four['params']) > 1e-4  # the other steps trained


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path):
  work = tmp_path / 'run'
  config = tiny_digits(num_steps=8, checkpoint_every_steps=2, keep_checkpoints=10, max_steps_per_run=6)
  train.train_and_evaluate(config, str(work))
  reference = {s: checkpoint_arrays(work / 'checkpoints' / str(s) / 'default') for s in (4, 6)}
  for data in glob.glob(str(work / 'checkpoints' / '6' / 'default' / 'd' / '*')):  # truncated array data
    os.truncate(data, os.path.getsize(data) // 2)
  os.remove(work / 'checkpoints' / '4' / 'default' / '_METADATA')  # and one with a file missing
  config.max_steps_per_run = 0
  summary = train.train_and_evaluate(config, str(work))
  assert summary['steps'] == 8
  aside = sorted(p.name.split('-')[0] for p in (work / 'damaged_checkpoints').iterdir())
  assert aside == ['4', '6'], aside
  assert sorted(int(p.name) for p in (work / 'checkpoints').iterdir()) == [2, 4, 6, 8]
  # Resumed from step 2 (the newest good one), the run redid steps 3-6 exactly as before.
  redone = checkpoint_arrays(work / 'checkpoints' / '6' / 'default')
  redo_diff = max_abs_difference(redone['params'], reference[6]['params'])
  print(f'steps 3-6 redone from checkpoint 2: max parameter difference {redo_diff:.3e}')
  assert redo_diff == 0.0

  # The evaluation job lists only finalised checkpoints: a save in flight (its temporary folder) is not one.
  shutil.copytree(work / 'checkpoints' / '8', work / 'checkpoints' / '10.orbax-checkpoint-tmp-1234')
  mngr = checkpoints.reader(str(work / 'checkpoints'))
  eval_config = ml_collections.ConfigDict({'checkpoints': 'all'})
  assert watch.next_checkpoint(mngr, {str(s): {} for s in (2, 4, 6)}, eval_config, 10) == 8
  assert watch.next_checkpoint(mngr, {str(s): {} for s in (2, 4, 6, 8)}, eval_config, 10) is None
