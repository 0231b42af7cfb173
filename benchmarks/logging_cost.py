"""What writing the step metrics every 10 steps costs a run: the digits config run alternately with the default
``metrics_every_steps=10`` and with the step metrics written only with the progress line (every
``log_every_steps``, 100), each as its own process, the wall time of each run printed, then the medians and
their ratio.

    python benchmarks/logging_cost.py [--runs=3] [--config.key=value ...]

Run it on an otherwise idle machine: the two variants differ by less than the noise of a busy one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {'every 10 steps': ['--config.metrics_every_steps=10'],
            'with the progress line only': ['--config.metrics_every_steps=100000']}


def run_once(workdir: str, extra: list[str]) -> tuple[float, float]:
  """(seconds from start to exit, the run's own wall_seconds) of one digits run."""
  started = time.perf_counter()
  r = subprocess.run([sys.executable, '-m', 'vicreg_jax.main', '--config=configs/digits.py', f'--workdir={workdir}',
                      '--config.compilation_cache=', *extra], cwd=REPO, capture_output=True, text=True)
  took = time.perf_counter() - started
  if r.returncode:
    raise SystemExit(f'run failed:\n{r.stderr[-3000:]}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    return took, json.load(f)['wall_seconds']


def main(argv: list[str]) -> None:
  runs = 3
  extra = []
  for arg in argv:
    if arg.startswith('--runs='):
      runs = int(arg.split('=')[1])
    else:
      extra.append(arg)
  tmp = tempfile.mkdtemp(prefix='logging_cost_')
  times = {name: [] for name in VARIANTS}
  for i in range(runs):
    for name, flags in VARIANTS.items():
      took, wall = run_once(os.path.join(tmp, f'{len(times[name])}_{name.split()[0]}'), [*flags, *extra])
      times[name].append(wall)
      print(f'run {i + 1}, step metrics {name}: {wall:.1f} s (process {took:.1f} s)', flush=True)
  medians = {name: statistics.median(t) for name, t in times.items()}
  (a, ma), (b, mb) = medians.items()
  print(f'median wall time: {a} {ma:.1f} s, {b} {mb:.1f} s; ratio {ma / mb:.3f} ({(ma / mb - 1):+.1%})')


if __name__ == '__main__':
  main(sys.argv[1:])
