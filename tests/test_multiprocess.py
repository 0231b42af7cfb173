"""Several JAX processes on this machine (``jax.distributed`` on localhost, CPU collectives over gloo, 2 simulated
devices each): pretraining with its final probe stopped and resumed, the linear-evaluation and fine-tuning jobs,
resuming on other topologies, a killed peer. Figures are compared with one process holding the same 4 devices.

The digits config runs here at base_lr 0.01: at its own lr (0.3) the first steps are chaotic, and the
cross-process all-reduce adds the devices' values in another order than the in-process one (ulp-level
differences, grown to 0.19 in the parameters by step 12); at 0.01 the runs stay within ~1e-6 of each other.
"""

import json
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, Job, checkpoint_arrays, free_port, job_env, max_abs_difference

pytestmark = pytest.mark.slow

STEPS = 24
PRETRAIN = ['--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', '--config.batch_size=64',
            f'--config.num_steps={STEPS}', '--config.checkpoint_every_steps=12', '--config.log_every_steps=12',
            '--config.optim.base_lr=0.01', '--config.optim.warmup_epochs=1', '--config.eval.draws=1',
            # LARS at a small lr: gloo sums the devices' gradients in another order than one process does, and
            # the digits recipe's AdamW (which normalises every gradient entry) grew those last-bit differences to
            # 4.4e-4 in the parameters by step 24; LARS at 0.01 keeps them near 1e-6.
            '--config.optim.name=lars',
            # The long-run features on (issue 13): prefetch, uint8 transfer with the colour ops on the devices
            # (digits views without pixel noise), remat and two micro-batches. Measured with them: two processes
            # and every resume within 1.2e-7 of one process. Not every device count stays that close: a run from
            # step 0 on 2 devices was 3.9e-5 away from the 4-device run by step 24. The cause is a kink of
            # the ReLUs: perturbing the parameters by 1e-7 (relative) changed a step's update by 8.8e-4
            # (relative) on 4 devices too, so the step is discontinuous there and rounding picks the side.
            '--config.prefetch_to_device=2', '--config.augment.on_device=True', '--config.augment.view1.noise_std=0.0',
            '--config.augment.view2.noise_std=0.0', '--config.model.remat=True', '--config.grad_accum_steps=2']
LINEAR = ['--config=configs/digits_linear.py', '--config.epochs=40', '--config.poll_seconds=0.5',
          '--config.timeout_seconds=300']
FINETUNE = ['--config=configs/digits_semi.py', '--config.epochs=20', '--config.log_every_steps=20',
            '--config.checkpoint_every_steps=40']  # 50 labels in batches of 48: 40 steps, the last one saved


def params(workdir, step=STEPS):
  return checkpoint_arrays(workdir / 'checkpoints' / str(step) / 'default')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The same pretraining run (stopped after 12 steps and resumed), linear job and fine-tuning job as two
  processes and as one process with 4 devices; the two-process run's step-12 checkpoint also resumed on one
  process with 4 and 2 devices. The one-process jobs run side by side (compiling is mostly single-threaded); a two-process job runs
  alone, because gloo gives up on a collective whose peer arrives more than 30 s later."""
  root = tmp_path_factory.mktemp('multiprocess')
  logs = root / 'logs'
  two, one = root / 'two', root / 'one'
  Job([*PRETRAIN, f'--workdir={two}', '--config.max_steps_per_run=12'], logs, processes=2, name='two_first').check()
  assert sorted(p.name for p in (two / 'checkpoints').iterdir()) == ['12'] and not (two / 'summary.json').exists()
  resumes = {}
  for devices in (4, 2):  # copies of the run as the two processes left it at step 12
    resumes[devices] = root / f'resume{devices}'
    shutil.copytree(two, resumes[devices])
  Job([*PRETRAIN, f'--workdir={two}'], logs, processes=2, name='two_resumed').check()
  Job([*LINEAR, f'--workdir={two}_linear', f'--config.pretrain_workdir={two}'], logs, processes=2,
      name='two_linear').check()
  Job([*FINETUNE, f'--workdir={two}_finetune', f'--config.pretrain_workdir={two}'], logs, processes=2,
      name='two_finetune').check()
  def resume(devices):
    return Job([*PRETRAIN, f'--workdir={resumes[devices]}', '--config.eval.final_probe=False'], logs,
               devices=devices, name=f'resume{devices}')

  for job in [Job([*PRETRAIN, f'--workdir={one}'], logs, devices=4, name='one'), resume(2)]:
    job.check()
  # The 4-device resume runs the program 'one' compiled: it loads it from the suite's compilation cache.
  later = [resume(4), Job([*LINEAR, f'--workdir={one}_linear', f'--config.pretrain_workdir={one}'], logs, devices=4,
                          name='one_linear'),
           Job([*FINETUNE, f'--workdir={one}_finetune', f'--config.pretrain_workdir={one}'], logs, devices=4,
               name='one_finetune')]
  for job in later:
    job.check()
  return {'two': two, 'one': one, 'resumes': resumes, 'logs': logs}


def test_two_processes_stop_resume_and_match_one_process(runs):
  two, one = runs['two'], runs['one']
  diff = max_abs_difference(params(two)['params'], params(one)['params'])
  assert diff <= 1e-5, diff
  assert max_abs_difference(params(two)['batch_stats'], params(one)['batch_stats']) <= 1e-5
  # The comparison is between trained parameters, not between two initial states.
  assert max_abs_difference(params(two)['params'], params(two, 12)['params']) > 1e-4
  s2, s1 = (json.loads((w / 'summary.json').read_text()) for w in (two, one))
  print('two processes:', s2, '\none process: ', s1, '\nmax parameter difference:', diff)
  assert s2['steps'] == s1['steps'] == STEPS and set(s2) == set(s1)
  # The same figures, up to what parameters 1e-6 apart can move: a borderline example of the 540 test images
  # on the other side of a probe's boundary (seen with XLA's -O0 code), the 4th digit of RankMe or the std.
  for k in set(s1) - {'steps', 'wall_seconds'}:
    if 'top1' in k:
      assert abs(s2[k] - s1[k]) <= 1 / 540 + 1e-4, (k, s2[k], s1[k])  # + the summary's rounding to 4 digits
    else:
      assert s2[k] == pytest.approx(s1[k], rel=1e-3), k
  assert 0.2 < s2['linear_top1'] <= 1.0  # the probe ran on real features
  # Files in the workdir are written once (process 0): one event file, the config, summary and spectra.
  assert len(list(two.glob('events.out.tfevents*'))) == 2  # one per invocation (the stop and the resume)
  assert {p.name for p in two.iterdir()} >= {'config.json', 'summary.json', 'spectra.npz', 'checkpoints'}
  # Process 1 has the figures too (process 0 computed the probes and handed them over).
  lines = [(runs['logs'] / f'two_resumed{i}.out').read_text().strip().splitlines()[-1] for i in range(2)]
  assert json.loads(lines[0])['linear_top1'] == json.loads(lines[1])['linear_top1'] == s2['linear_top1']


def test_linear_job_on_two_processes_matches_one_process(runs):
  r2, r1 = (json.loads((w.parent / f'{w.name}_linear' / 'results.json').read_text()) for w in (runs['two'],
                                                                                             runs['one']))
  print('linear job, two processes:', r2, '\none process:', r1)
  assert sorted(r2, key=int) == sorted(r1, key=int) == ['12', '24']
  for step in r1:
    assert r2[step]['top1'] == r1[step]['top1'] and r2[step]['top5'] == r1[step]['top5'], step
  assert r2['24']['top1'] > 0.2


def test_finetuning_job_on_two_processes_matches_one_process(runs):
  two, one = (w.parent / f'{w.name}_finetune' for w in (runs['two'], runs['one']))
  r2, r1 = (json.loads((w / 'results.json').read_text()) for w in (two, one))
  tuned = [checkpoint_arrays(w / 'heads' / '24' / '40' / 'default')['params'] for w in (two, one)]
  diff = max_abs_difference(*tuned)
  print('fine-tuning job, two processes:', r2, '\none process:', r1, '\nmax parameter difference:', diff)
  assert list(r2) == list(r1) == ['24']
  # From pretrained backbones 1.2e-7 apart (two processes against one), 40 steps of SGD on 50 images: 1.2e-7.
  assert diff <= 1e-5
  pretrained = params(runs['two'])['params']['backbone']
  assert max_abs_difference(tuned[0]['backbone'], pretrained) > 1e-4  # the backbone was trained too
  # The whole network trained on the same 50 labelled images in the same batches: the same figures, up to a
  # borderline test image (parameters ~1e-6 apart, as in pretraining).
  for k in ('top1', 'top5'):
    assert abs(r2['24'][k] - r1['24'][k]) <= 1 / 540 + 1e-4, (k, r2, r1)
  assert r2['24']['top1'] > 0.15  # above chance (0.1) after 40 steps on 50 images
  assert {p.name for p in two.iterdir()} >= {'config.json', 'results.json'}


def test_checkpoint_of_two_processes_resumes_on_one_process_with_4_or_2_devices(runs):
  final = params(runs['two'])
  for devices, workdir in runs['resumes'].items():
    log = (runs['logs'] / f'resume{devices}0.err').read_text()
    assert 'Resumed from' in log and 'at step 12' in log, log[-2000:]
    diff = max_abs_difference(params(workdir)['params'], final['params'])
    print(f'resumed on 1 process with {devices} devices: max parameter difference {diff:.2e}')
    assert diff <= 1e-5


def test_byol_on_two_processes_matches_one_process(tmp_path):
  """A method with extra state: BYOL's EMA target network (its own parameters and BatchNorm statistics, moved
  after every step) and predictor, on two processes and on one (with a checkpoint at step 6)."""
  pretrain = [a for a in PRETRAIN if not a.startswith('--config.grad_accum_steps')]  # BYOL has no micro-batches
  byol = ['--config=configs/digits_byol.py', *pretrain, '--config.byol.predictor=32', '--config.checkpoint_every_steps=6',
          '--config.model.projector=32-32', '--config.eval.final_probe=False', '--config.num_steps=12']
  two, one = tmp_path / 'two', tmp_path / 'one'
  Job([*byol, f'--workdir={two}'], tmp_path / 'logs', processes=2, name='byol_two').check()
  Job([*byol, f'--workdir={one}'], tmp_path / 'logs', devices=4, name='byol_one').check()
  a, b = (params(w, 12) for w in (two, one))
  diff = max_abs_difference(a['params'], b['params'])
  target_diff = max_abs_difference(a['extra']['target'], b['extra']['target'])
  print('BYOL, two processes vs one: params', diff, 'target', target_diff)
  assert diff <= 1e-5 and target_diff <= 1e-5
  assert 'predictor' in a['params'] and max_abs_difference(a['extra']['target']['params'], a['params']) > 1e-3
  assert max_abs_difference(a["extra"]["target"]["params"], params(two, 6)["extra"]["target"]["params"]) > 1e-6


def wait_for(condition, timeout: float, what: str) -> None:
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline:
      raise AssertionError(f'timed out after {timeout} s waiting for {what}')
    time.sleep(0.2)


def last_error_line(job, i) -> str:
  """The last line of process ``i``'s stderr, once it is an error line (the stderr filter writes it as the
  process ends)."""
  wait_for(lambda: job.stderr(i).strip().splitlines()[-1:][0].startswith('error: ')
           if job.stderr(i).strip() else False, 15, f'the error line of {job.name} process {i}')
  return job.stderr(i).strip().splitlines()[-1]


HEARTBEAT = 5


@pytest.mark.parametrize('killed', [1, 0], ids=['peer', 'coordinator'])
def test_a_killed_process_ends_the_other_with_one_line_within_the_heartbeat_timeout(tmp_path, killed):
  # The pretraining run above (its compiled steps are in the cache), slowed down by a checkpoint every step.
  job = Job([*PRETRAIN, '--config.log_every_steps=1', '--config.checkpoint_every_steps=1',
             '--config.eval.final_probe=False', f'--workdir={tmp_path / "run"}',
             f'--distributed_heartbeat_timeout={HEARTBEAT}'], tmp_path, processes=2, name='kill')
  survivor = 1 - killed
  try:
    wait_for(lambda: 'step 2/' in job.stderr(survivor), 400, 'training to start')
    job.procs[killed].kill()
    started = time.time()
    code = job.procs[survivor].wait(HEARTBEAT + 60)
    elapsed = time.time() - started
  finally:
    job.kill()
  job.wait(30)
  line = last_error_line(job, survivor)
  print(f'killed process {killed}; process {survivor} exited {code} after {elapsed:.1f} s: {line}')
  assert code != 0 and elapsed < HEARTBEAT + 30
  # A collective in flight fails at once ('another process stopped responding'); otherwise the runtime notices
  # the silent peer after the heartbeat timeout, or a lost coordinator at once.
  assert line.startswith('error: distributed run stopped: ')
  assert any(k in line for k in ('another process stopped responding', 'process 1 stopped responding' if killed
                                 else 'lost the coordinator (process 0)')), line
  err = job.stderr(survivor)
  assert 'Traceback' not in err and 'Check failure' not in err and '    @ ' not in err
  assert len([ln for ln in err.splitlines() if ln.startswith('error')]) == 1


# The pretraining job replaced by one that fails on process 0 while process 1 waits for its value in the
# key-value store. (Process 1 failing while process 0 waits in a collective ends too, process 0 30 s later,
# gloo's limit for a peer: left out to save CI time; the killed-peer test covers a peer lost to a collective.)
FAILING_JOB = """
import time
from vicreg_jax import main, parallel, train

def fail():
  raise RuntimeError('an unexpected error on purpose')

def job(config, workdir):
  parallel.share_from_process_0(fail)
  time.sleep(600)

train.train_and_evaluate = job
main.run()
"""


def test_an_unexpected_error_on_one_process_ends_both_soon(tmp_path):
  """Not through the runtime's orderly shutdown, whose barrier waits minutes for a peer stuck in a collective
  or in the key-value store: the failing process shows its traceback and exits at once, and the other ends
  with one line (at once: the coordinator, process 0, is gone)."""
  failing = 0
  script = tmp_path / 'failing_job.py'
  script.write_text(FAILING_JOB)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(script), f'--workdir={tmp_path / "run"}',
                             f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
                            cwd=REPO, env=job_env(2), stderr=subprocess.PIPE, text=True) for i in range(2)]
  ended = {}
  try:
    while len(ended) < 2:
      for i, p in enumerate(procs):
        if i not in ended and p.poll() is not None:
          ended[i] = time.time()
      assert time.time() - min(ended.values(), default=time.time()) < 60, 'the other process is still running'
      time.sleep(0.1)
    errs = [p.communicate()[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  other = 1 - failing
  print(f'process {failing} failed; process {other} exited {procs[other].returncode} '
        f'{ended[other] - ended[failing]:.1f} s later: {errs[other].strip().splitlines()[-1]}')
  assert procs[failing].returncode != 0 and 'Traceback' in errs[failing]
  assert errs[failing].strip().splitlines()[-1] == (f'error: RuntimeError on process {failing}: an unexpected '
                                                    'error on purpose')
  assert procs[other].returncode != 0
  assert errs[other].strip().splitlines()[-1].startswith('error: distributed run stopped: '), errs[other][-2000:]
