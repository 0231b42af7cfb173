"""Several JAX processes on this machine (``jax.distributed`` on localhost, CPU collectives over gloo, 2 simulated
devices each): pretraining with its final probe stopped and resumed, the linear-evaluation and fine-tuning jobs,
resuming on other topologies, a killed peer, the sharded optimiser. Figures are compared with one process holding
the same 4 devices.

The comparisons are exact by construction, not within a tolerance tuned on one machine. Two things make one
process with 4 devices and two processes with 2 each compute the same bits (benchmarks/reduction_layouts.py
measures both):
- ``reductions='ordered'``: every sum over devices is an all-gather followed by a sum in device order
  (vicreg_jax/collectives.py). gloo and XLA's in-process all-reduce add the devices' values in orders of
  their own, so on the native reductions the two layouts differ in the last bits from the first step on.
- the same intra-op thread pool in every process: XLA:CPU sizes it max(``PJRT_NPROC`` or cores, local devices),
  and Eigen splits a convolution's weight gradient into as many partial sums as the pool allows, so a process
  with 4 devices and one with 2 compute different last bits for the same rows (on a 2-core machine).
With both, the parameters, BatchNorm statistics, probe figures and evaluation results are equal to the bit.

Two comparisons cannot be exact: the native reductions on two processes against one (gloo's order of addition
against XLA's), and a resume on 2 devices against 4 (each device's partial sums cover other rows). A training
step has kinks (ReLUs, the variance hinge): where an entry sits within rounding of one, a last-bit difference
decides its side and changes that step's update by a small fraction of itself, and the difference then stays.
Whether a given pair of runs meets such an entry is chance: measured over seeds 0-9 here, the two-process
difference was 1.2e-7 to 4.4e-5, and the distance between two one-process runs that differ only in the order
of their sums (the noise floor: 'reversed' against 'ordered') matched it in six seeds, was 87 and 366 times
smaller in two and 1,400 times larger in another. So these comparisons are bounded by the kinks' own scale,
measured in the same run: a fraction of how far the parameters moved over the compared steps (a bug changes the
updates themselves, i.e. about all of that motion); the noise floor is printed beside, and must lie below the
bound too.

The digits config runs here at LARS base_lr 0.01 (its own recipe, AdamW at 2e-3, normalises every gradient
entry and grows last-bit differences fastest) with the long-run features on: prefetch, uint8 transfer with the
colour ops on the devices (digits views without pixel noise), remat and two micro-batches.
"""

import json
import os
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
            '--config.optim.base_lr=0.01', '--config.optim.warmup_epochs=1', '--config.final_probe.draws=1',
            '--config.optim.name=lars', '--config.reductions=ordered',
            '--config.prefetch_to_device=2', '--config.augment.on_device=True', '--config.augment.view1.noise_std=0.0',
            '--config.augment.view2.noise_std=0.0', '--config.model.remat=True', '--config.grad_accum_steps=2']
NATIVE = [*PRETRAIN, '--config.reductions=native', '--config.final_probe.enabled=False']
REVERSED = [*PRETRAIN, '--config.reductions=reversed', '--config.final_probe.enabled=False']
LINEAR = ['--config=configs/digits_linear.py', '--config.epochs=40', '--config.poll_seconds=0.5',
          '--config.timeout_seconds=300', '--config.checkpoint_every_steps=100', '--config.reductions=ordered']
FINETUNE = ['--config=configs/digits_semi.py', '--config.epochs=20', '--config.log_every_steps=20',
            '--config.checkpoint_every_steps=40',  # 50 labels in batches of 48: 40 steps, the last one saved
            '--config.reductions=ordered',
            # ghost BatchNorm in groups of 24 rows: each group spans two of the 4 devices' shards of 12
            '--config.classifier.batchnorm=ghost', '--config.classifier.ghost_batch_size=24']
# The same intra-op thread pool size in every process, whatever its device count and the machine's core count:
# PJRT_NPROC as pytest was given it (another size changes the rounding of every convolution's weight gradient),
# else 4; at least 4, the most devices one process holds here.
SAME_POOL = {'PJRT_NPROC': str(max(int(os.environ.get('PJRT_NPROC', '4')), 4))}
# A difference that cannot be exact may be at most this fraction of the largest distance a parameter moved over
# steps 12-24. Measured on these runs over seeds 0-9 (40 such differences, either kind, both noise floors): at most
# 0.6 %; planted bugs (process 1's second view shifted by a row; micro-batches cut by device) 21-96 %.
MOTION_FRACTION = 0.05


def params(workdir, step=STEPS):
  return checkpoint_arrays(workdir / 'checkpoints' / str(step) / 'default')


def latest(checkpoints):
  return max((p for p in checkpoints.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def job(args, logs, name, processes=1, devices=2):
  return Job(args, logs, processes=processes, devices=devices, name=name, env=SAME_POOL)


def within_bound(what: str, diff: float, floor: float, moved: float) -> None:
  """``diff`` and the noise ``floor`` both within :data:`MOTION_FRACTION` of ``moved``."""
  bound = MOTION_FRACTION * moved
  print(f'{what}: max parameter difference {diff:.3e} ({diff / moved:.2%} of the motion {moved:.3e}); noise floor '
        f'{floor:.3e}; bound {bound:.3e}')
  assert floor <= bound, (what, 'the noise floor is above the bound: the comparison cannot tell a bug', floor, bound)
  assert diff <= bound, (what, diff, bound)


def motion(workdir) -> float:
  """The largest distance a parameter of the run in ``workdir`` moved from step 12 to step 24."""
  return max_abs_difference(params(workdir)['params'], params(workdir, 12)['params'])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The same pretraining run (stopped after 12 steps and resumed), linear job and fine-tuning job as two
  processes and as one process with 4 devices; the two-process run's step-12 checkpoint also resumed on one
  process with 4 and 2 devices; the run on the native reductions on two processes and on one; the floors (the
  run and the 4-device resume with the sums in reverse order). The one-process jobs run side by side (compiling
  is mostly single-threaded); a two-process job runs alone, because gloo gives up on a collective whose peer
  arrives more than 30 s later."""
  root = tmp_path_factory.mktemp('multiprocess')
  logs = root / 'logs'
  two, one = root / 'two', root / 'one'
  job([*PRETRAIN, f'--workdir={two}', '--config.max_steps_per_run=12'], logs, 'two_first', processes=2).check()
  assert sorted(p.name for p in (two / 'checkpoints').iterdir()) == ['12'] and not (two / 'summary.json').exists()
  resumes = {}
  for name in ('resume4', 'resume2', 'resume4_reversed'):  # copies of the run as the two processes left it at 12
    resumes[name] = root / name
    shutil.copytree(two, resumes[name])
  job([*PRETRAIN, f'--workdir={two}'], logs, 'two_resumed', processes=2).check()
  job([*LINEAR, f'--workdir={two}_linear', f'--config.pretrain_workdir={two}'], logs, 'two_linear',
      processes=2).check()
  job([*FINETUNE, f'--workdir={two}_finetune', f'--config.pretrain_workdir={two}'], logs, 'two_finetune',
      processes=2).check()
  job([*NATIVE, f'--workdir={root / "two_native"}'], logs, 'two_native', processes=2).check()

  def resume(name, devices, *extra):
    return job([*PRETRAIN, f'--workdir={resumes[name]}', '--config.final_probe.enabled=False', *extra], logs, name,
               devices=devices)

  for pair in ([job([*PRETRAIN, f'--workdir={one}'], logs, 'one', devices=4), resume('resume2', 2)],
               # Each runs a program 'one' compiled: they load it from the suite's compilation cache.
               [resume('resume4', 4), job([*LINEAR, f'--workdir={one}_linear', f'--config.pretrain_workdir={one}'],
                                          logs, 'one_linear', devices=4)],
               [job([*FINETUNE, f'--workdir={one}_finetune', f'--config.pretrain_workdir={one}'], logs,
                    'one_finetune', devices=4),
                job([*NATIVE, f'--workdir={root / "one_native"}'], logs, 'one_native', devices=4)],
               [job([*REVERSED, f'--workdir={root / "one_reversed"}'], logs, 'one_reversed', devices=4),
                resume('resume4_reversed', 4, '--config.reductions=reversed')]):
    for j in pair:
      j.check()
  return {'root': root, 'two': two, 'one': one, 'resumes': resumes, 'logs': logs}


def test_two_processes_stop_resume_and_match_one_process_exactly(runs):
  two, one = runs['two'], runs['one']
  diff = max_abs_difference(params(two)['params'], params(one)['params'])
  stats_diff = max_abs_difference(params(two)['batch_stats'], params(one)['batch_stats'])
  s2, s1 = (json.loads((w / 'summary.json').read_text()) for w in (two, one))
  print('two processes:', s2, '\none process: ', s1)
  print(f'two processes (stopped at 12, resumed) against one, ordered reductions: max difference {diff:.3e} in '
        f'the parameters, {stats_diff:.3e} in the BatchNorm statistics')
  assert diff == 0.0 and stats_diff == 0.0
  # The comparison is between trained parameters, not between two initial states.
  assert max_abs_difference(params(two)['params'], params(two, 12)['params']) > 1e-4
  # The same parameters, hence the same features and the same probe figures, to the last digit.
  assert s2['steps'] == s1['steps'] == STEPS and set(s2) == set(s1)
  assert {k: v for k, v in s2.items() if k != 'wall_seconds'} == {k: v for k, v in s1.items() if k != 'wall_seconds'}
  assert 0.2 < s2['linear_top1'] <= 1.0  # the probe ran on real features
  # Files in the workdir are written once (process 0): one event file, the config, summary and spectra.
  assert len(list(two.glob('events.out.tfevents*'))) == 2  # one per invocation (the stop and the resume)
  assert {p.name for p in two.iterdir()} >= {'config.json', 'summary.json', 'spectra.npz', 'checkpoints'}
  # Process 1 has the figures too (process 0 computed the probes and handed them over).
  lines = [(runs['logs'] / f'two_resumed{i}.out').read_text().strip().splitlines()[-1] for i in range(2)]
  assert json.loads(lines[0])['linear_top1'] == json.loads(lines[1])['linear_top1'] == s2['linear_top1']


def test_two_processes_on_the_native_reductions_match_one_process_within_the_kinks_scale(runs):
  """gloo adds the devices' values in another order than XLA's in-process all-reduce: not exact, but within
  what rounding can move through the step's kinks."""
  root = runs['root']
  two, one = params(root / 'two_native'), params(root / 'one_native')
  diff = max_abs_difference(two['params'], one['params'])
  floor = max_abs_difference(params(root / 'one_reversed')['params'], params(runs['one'])['params'])
  within_bound('two processes against one, native reductions', diff, floor, motion(root / 'one_native'))


def test_linear_job_on_two_processes_matches_one_process(runs):
  r2, r1 = (json.loads((w.parent / f'{w.name}_linear' / 'results.json').read_text()) for w in (runs['two'],
                                                                                             runs['one']))
  print('linear job, two processes:', r2, '\none process:', r1)
  assert sorted(r2, key=int) == sorted(r1, key=int) == ['12', '24']
  for step in r1:
    assert r2[step]['top1'] == r1[step]['top1'] and r2[step]['top5'] == r1[step]['top5'], step
  heads = [checkpoint_arrays(latest(w.parent / f'{w.name}_linear' / 'heads' / '24') / 'default')['params']
           for w in (runs['two'], runs['one'])]
  diff = max_abs_difference(*heads)
  print(f'linear job, two processes against one: max difference of the trained heads {diff:.3e}')
  assert diff == 0.0
  assert r2['24']['top1'] > 0.2


def test_finetuning_job_on_two_processes_matches_one_process_exactly(runs):
  two, one = (w.parent / f'{w.name}_finetune' for w in (runs['two'], runs['one']))
  r2, r1 = (json.loads((w / 'results.json').read_text()) for w in (two, one))
  tuned = [checkpoint_arrays(w / 'heads' / '24' / '40' / 'default')['params'] for w in (two, one)]
  diff = max_abs_difference(*tuned)
  print('fine-tuning job, two processes:', r2, '\none process:', r1)
  print(f'fine-tuning job, two processes against one: max parameter difference {diff:.3e}')
  assert list(r2) == list(r1) == ['24']
  assert diff == 0.0
  pretrained = params(runs['two'])['params']['backbone']
  assert max_abs_difference(tuned[0]['backbone'], pretrained) > 1e-4  # the backbone was trained too
  assert {k: v for k, v in r2['24'].items() if k not in ('seconds', 'finished_at')} == {
      k: v for k, v in r1['24'].items() if k not in ('seconds', 'finished_at')}
  assert r2['24']['top1'] > 0.15  # above chance (0.1) after 40 steps on 50 images
  assert {p.name for p in two.iterdir()} >= {'config.json', 'results.json'}


def test_checkpoint_of_two_processes_resumes_on_one_process_with_4_or_2_devices(runs):
  """On 4 devices exactly the two-process run; on 2 each device sums other rows (no order of the additions can
  make that exact): within what rounding can move through the step's kinks."""
  final = params(runs['two'])['params']
  for name in ('resume4', 'resume2'):
    log = (runs['logs'] / f'{name}0.err').read_text()
    assert 'Resumed from' in log and 'at step 12' in log, log[-2000:]
  exact = max_abs_difference(params(runs['resumes']['resume4'])['params'], final)
  print(f'resumed on 1 process with 4 devices against the two-process run: max parameter difference {exact:.3e}')
  assert exact == 0.0
  floor = max_abs_difference(params(runs['resumes']['resume4_reversed'])['params'], final)
  within_bound('resumed on 1 process with 2 devices against 4', max_abs_difference(
      params(runs['resumes']['resume2'])['params'], final), floor, motion(runs['two']))


# Each MoCo with its digits recipe and tiny heads. MoCo v2: ghost BatchNorm in groups of 32 rows (each spans two of
# the 4 devices' shards of 16, across the processes), the key view shuffled over every device, a queue of 5
# batches (its write position at the step-6 checkpoint 64, not 0).
MOCO = {'moco_v3': ['--config=configs/digits_moco_v3.py', '--config.moco_v3.predictor=32'],
        'moco_v2': ['--config=configs/digits_moco_v2.py', '--config.moco_v2.queue_length=320']}


@pytest.mark.parametrize('method', sorted(MOCO))
def test_moco_and_the_sharded_optimiser_on_two_processes_match_one_process_killed_and_resumed(tmp_path, method):
  """A method with extra state, MoCo's momentum encoder (its own parameters and BatchNorm statistics, moved
  inside every step before the keys; BYOL's EMA target is the same state, moved after the update) with v3's
  predictor or v2's queue, with ``optim.shard_state`` (ZeRO-1: the gradients reduce-scattered, each device a
  block of the LARS momentum and of the update, the whole parameters' norms summed over the blocks): two
  processes stopped at step 6 and resumed from the sharded checkpoint, against one process with 4 devices killed
  (SIGKILL) after its step-6 checkpoint and resumed by the same command. Equal to the bit in the parameters,
  BatchNorm statistics, optimiser state, momentum encoder and queue: the ordered reduce-scatter and norm sums make
  the two-process step the one-process step, and nothing of the state is lost or changed by a stop, a kill or a
  restore."""
  pretrain = [a for a in PRETRAIN if not a.startswith('--config.grad_accum_steps')]  # no micro-batches with an EMA
  moco = [*MOCO[method], *pretrain, '--config.model.projector=32-16', '--config.optim.shard_state=True',
          '--config.checkpoint_every_steps=6', '--config.final_probe.enabled=False', '--config.num_steps=12',
          '--config.log_every_steps=1']
  two, one, logs = tmp_path / 'two', tmp_path / 'one', tmp_path / 'logs'
  killed = job([*moco, f'--workdir={one}'], logs, 'moco_killed', devices=4)
  deadline = time.time() + 600
  while not ((one / 'checkpoints' / '6').is_dir() and '] step 8/' in killed.stderr()):
    assert killed.procs[0].poll() is None and time.time() < deadline, killed.stderr()[-3000:]
    time.sleep(0.05)
  killed.kill()
  killed.wait()
  assert not (one / 'checkpoints' / '12').exists()
  job([*moco, f'--workdir={one}'], logs, 'moco_resumed', devices=4).check()
  job([*moco, f'--workdir={two}', '--config.max_steps_per_run=6'], logs, 'moco_two_first', processes=2).check()
  job([*moco, f'--workdir={two}'], logs, 'moco_two', processes=2).check()
  assert all('Resumed from' in (logs / f'{name}0.err').read_text() for name in ('moco_resumed', 'moco_two'))
  a, b = (params(w, 12) for w in (two, one))
  diffs = {k: max_abs_difference(a[k], b[k]) for k in ('params', 'batch_stats', 'opt_state', 'extra')}
  print(f'{method} with the sharded optimiser, two processes (stopped at 6, resumed) against one process (killed '
        f'after step 6, resumed): max differences {diffs}')
  assert max(diffs.values()) == 0.0, diffs
  encoder = a['extra']['target']['params']
  assert set(encoder) == {'backbone', 'projector'} and ('predictor' in a['params']) == (method == 'moco_v3')
  assert max_abs_difference(encoder, {k: a['params'][k] for k in encoder}) > 1e-4  # it trails the online network
  assert max_abs_difference(encoder, params(two, 6)['extra']['target']['params']) > 1e-6  # and moved since step 6
  assert max_abs_difference(a['params'], params(two, 6)['params']) > 1e-4
  if method == 'moco_v2':  # the queue: written 12 times, 64 keys at a time, into 320 rows
    assert int(params(two, 6)['extra']['queue_ptr']) == 64 and int(a['extra']['queue_ptr']) == 128
    assert max_abs_difference(a['extra']['queue'], params(two, 6)['extra']['queue']) > 1e-3


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
             '--config.final_probe.enabled=False', f'--workdir={tmp_path / "run"}',
             f'--distributed_heartbeat_timeout={HEARTBEAT}'], tmp_path, processes=2, name='kill', env=SAME_POOL)
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
from vicreg_jax import distributed, main, train

def fail():
  raise RuntimeError('an unexpected error on purpose')

def job(config, workdir):
  distributed.share_from_process_0(fail)
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


def test_swav_multicrop_on_two_processes_matches_one_process(tmp_path):
  """Multi-crop: SwAV with 2 small crops of 8 px beside the two 16-px views (the backbone once per resolution,
  the heads over every crop, each crop's colour ops on the devices, two micro-batches, remat, the queue of the
  two views), on two processes and on one: the same bits."""
  swav = ['--config=configs/digits_swav.py', *PRETRAIN, '--config.model.projector=32-32', '--config.num_steps=6',
          '--config.swav.num_prototypes=12', '--config.swav.freeze_prototypes_steps=2', '--config.swav.queue_length=64',
          '--config.checkpoint_every_steps=6', '--config.final_probe.enabled=False', '--config.augment.small_crops=2',
          '--config.model.views_together=True', '--config.augment.small_view.crop_size=8',
          '--config.augment.small_view.crop_scale=(0.2,0.5)', '--config.augment.small_view.mean=(0.5,)',
          '--config.augment.small_view.std=(0.25,)']  # one channel
  two, one = tmp_path / 'two', tmp_path / 'one'
  job([*swav, f'--workdir={two}'], tmp_path / 'logs', 'multicrop_two', processes=2).check()
  job([*swav, f'--workdir={one}'], tmp_path / 'logs', 'multicrop_one', devices=4).check()
  a, b = (params(w, 6) for w in (two, one))
  diff = max_abs_difference(a['params'], b['params'])
  stats_diff = max_abs_difference(a['batch_stats'], b['batch_stats'])
  queue_diff = max_abs_difference(a['extra'], b['extra'])
  print(f'SwAV multi-crop, two processes against one: max difference {diff:.3e} in the parameters, {stats_diff:.3e} '
        f'in the BatchNorm statistics, {queue_diff:.3e} in the queue')
  assert diff == 0.0 and stats_diff == 0.0 and queue_diff == 0.0
  assert a['extra']['queue'].shape == (2, 64, 32) and 'prototypes' in a['params']
  assert float(abs(a['extra']['queue']).min(axis=-1).max()) > 0  # the queue holds embeddings (compared above)
