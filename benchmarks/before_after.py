"""The wall time of a run, this checkout against another one (a git worktree of an earlier commit), alternately,
each run its own process: the medians and their ratio. For changes that should cost nothing measurable (e.g.
writing the step metrics every 10 steps).

    git worktree add /tmp/before <commit>
    python benchmarks/before_after.py --before=/tmp/before [--runs=3] [--config=configs/digits.py] [--config.key=value ...]

Each run is ``python -m vicreg_jax.main`` in its checkout's folder (so it imports that checkout's package) with a
new workdir and no compilation cache; its time is the run's own ``wall_seconds`` (summary.json: from the start of
training to the end of the final probe) and the process's (imports and start-up included). Run it on an
otherwise idle machine: the difference sought is smaller than the noise of a busy one.
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


def run_once(checkout: str, workdir: str, args: list[str]) -> tuple[float, float]:
  """(the run's wall_seconds, the process's seconds) of one run from ``checkout``."""
  started = time.perf_counter()
  r = subprocess.run([sys.executable, '-m', 'vicreg_jax.main', *args, f'--workdir={workdir}',
                      '--config.compilation_cache='], cwd=checkout, capture_output=True, text=True)
  took = time.perf_counter() - started
  if r.returncode:
    raise SystemExit(f'run in {checkout} failed:\n{r.stderr[-3000:]}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)['wall_seconds'], took


def main(argv: list[str]) -> None:
  before, runs, args = None, 3, []
  for arg in argv:
    if arg.startswith('--before='):
      before = os.path.abspath(arg.split('=', 1)[1])
    elif arg.startswith('--runs='):
      runs = int(arg.split('=', 1)[1])
    else:
      args.append(arg)
  if before is None or not os.path.isdir(os.path.join(before, 'vicreg_jax')):
    raise SystemExit('--before=DIR must name another checkout (git worktree add DIR COMMIT)')
  if not any(a.startswith('--config=') for a in args):
    args.insert(0, '--config=configs/digits.py')
  tmp = tempfile.mkdtemp(prefix='before_after_')
  times = {'before': [], 'after': []}
  for i in range(runs):
    for name, checkout in (('before', before), ('after', REPO)):
      wall, took = run_once(checkout, os.path.join(tmp, f'{name}{i}'), args)
      times[name].append((wall, took))
      print(f'run {i + 1} {name}: {wall:.1f} s (process {took:.1f} s)', flush=True)
  med = {name: [statistics.median(t[k] for t in ts) for k in (0, 1)] for name, ts in times.items()}
  for k, what in enumerate(('wall_seconds', 'process seconds')):
    b, a = med['before'][k], med['after'][k]
    print(f'median {what}: before {b:.1f}, after {a:.1f}; after / before {a / b:.3f} ({a / b - 1:+.1%})')


if __name__ == '__main__':
  main(sys.argv[1:])
