"""Soak test: the digits pretraining command killed at random moments (SIGKILL, and now and then SIGTERM, as a
preemption sends) and restarted by the same command for a given time, then run to its end; its final state is
compared with an uninterrupted run's.

  python benchmarks/soak.py --minutes=10 [--steps=400] [--seed=0] [--workdir=/tmp/soak]

Prints one line per kill and a summary: kills by signal, restarts, steps redone, and the max abs difference of
the parameters, BatchNorm statistics and optimiser state to the uninterrupted run (exactly 0 expected: the same
batches at the same steps on the same devices).
"""

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, steps: int) -> list:
  """The pretraining command of the soak: digits, the ConvNet at ×1/4 width, 32³ projector, batch 64, a
  checkpoint every 10 steps, no final probe."""
  return [sys.executable, '-m', 'vicreg_jax.main', '--config=configs/digits.py', f'--workdir={workdir}',
          '--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', '--config.batch_size=64',
          f'--config.num_steps={steps}', '--config.checkpoint_every_steps=10', '--config.keep_checkpoints=2',
          '--config.log_every_steps=1', '--config.final_probe.enabled=False']


def environment(cache: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', JAX_COMPILATION_CACHE_DIR=cache)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  return env


def state(workdir: str, step: int) -> dict:
  from vicreg_jax import checkpoints
  return checkpoints.numpy_arrays(checkpoints.path(os.path.join(workdir, 'checkpoints'), step))


def max_diff(a, b) -> float:
  import jax
  import numpy as np
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def last_step(log: str) -> int:
  steps = re.findall(r'\] step (\d+)/', log)
  return int(steps[-1]) if steps else 0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--minutes', type=float, default=10.0, help='how long to keep killing (then the run finishes)')
  ap.add_argument('--steps', type=int, default=400)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--workdir', default='/tmp/vicreg_jax_soak')
  ap.add_argument('--max-interval', type=float, default=20.0, help='longest wait (s) before a kill')
  a = ap.parse_args()
  rng = random.Random(a.seed)
  shutil.rmtree(a.workdir, ignore_errors=True)
  os.makedirs(a.workdir)
  env = environment(os.path.join(a.workdir, 'compile_cache'))
  reference, soaked = os.path.join(a.workdir, 'reference'), os.path.join(a.workdir, 'soaked')

  t0 = time.time()
  subprocess.run(command(reference, a.steps), cwd=REPO, env=env, check=True, capture_output=True)
  print(f'uninterrupted run: {a.steps} steps in {time.time() - t0:.0f} s', flush=True)

  kills = {'SIGKILL': 0, 'SIGTERM': 0}
  redone, starts, previous, t0 = 0, 0, 0, time.time()
  log_path = os.path.join(a.workdir, 'soaked.log')
  while True:
    killing = time.time() - t0 < a.minutes * 60
    with open(log_path, 'w') as log:
      proc = subprocess.Popen(command(soaked, a.steps), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    starts += 1
    if not killing:
      assert proc.wait() == 0, open(log_path).read()[-3000:]
      break
    # A fifth of the kills while starting up (restoring, compiling), the rest a random time into training.
    if rng.random() >= 0.2:
      while proc.poll() is None and not re.search(r'\] step \d+/', open(log_path).read()):
        time.sleep(0.05)
    try:
      proc.wait(timeout=rng.uniform(0.5, a.max_interval))
      break  # finished before the kill
    except subprocess.TimeoutExpired:
      pass
    sig = signal.SIGTERM if rng.random() < 0.25 else signal.SIGKILL
    reached = last_step(open(log_path).read())
    proc.send_signal(sig)
    code = proc.wait()
    kills[sig.name] += 1
    text = open(log_path).read()
    resumed = re.search(r'Resumed from .* at step (\d+)', text)
    m = re.search(r'Stopped at step (\d+)', text)
    if sig == signal.SIGTERM and code != 0:
      raise SystemExit(f'SIGTERM: exit status {code}\n' + text[-3000:])
    saved = int(m.group(1)) if m else None
    print(f'{time.time() - t0:6.0f} s  {sig.name} at step {reached} (started from '
          f'{resumed.group(1) if resumed else 0}; exit {code}{f", saved step {saved}" if saved else ""})', flush=True)
    redone += max(previous - (int(resumed.group(1)) if resumed else 0), 0)  # what the last kill cost
    previous = reached if saved is None else saved
  ours, theirs = state(soaked, a.steps), state(reference, a.steps)
  diff = {k: max_diff(ours[k], theirs[k]) for k in ('params', 'batch_stats', 'opt_state')}
  print(f'soak: {sum(kills.values())} kills ({kills["SIGKILL"]} SIGKILL, {kills["SIGTERM"]} SIGTERM) in '
        f'{(time.time() - t0) / 60:.1f} min, {starts} starts, {redone} steps redone; finished at step {a.steps}; '
        'max abs '
        f'difference to the uninterrupted run: ' + ', '.join(f'{k} {v:.3g}' for k, v in diff.items()), flush=True)
  if max(diff.values()) > 1e-6:
    raise SystemExit('FAILED: the soaked run does not end where the uninterrupted one does')


if __name__ == '__main__':
  main()
