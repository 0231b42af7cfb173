"""The digits benchmark: every method's end-of-run probe over seeds, as mean ± std, beside raw pixels and the
supervised reference of the same backbone.

  python benchmarks/digits_methods.py --workdir=runs/digits_bench [--seeds=0,1,2] [--rows=vicreg,barlow_twins]

Each row is a config (and overrides) run once per seed with ``python -m vicreg_jax.main`` into
``WORKDIR/ROW/seedS``; a run whose ``summary.json`` (pretraining) or ``results.json`` (supervised) exists is
not run again, so an interrupted benchmark continues where it stopped. Raw pixels are probed in-process by the
same probes (standardised logistic regression, 5 labels per class over 5 draws, weighted 20-NN) on the 8×8
images and on the 16×16 ones the backbone sees. Prints one table (markdown) and writes ``WORKDIR/table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {
    'vicreg': ('configs/digits.py', []),
    'vicreg_vit': ('configs/digits_vit.py', []),
    'barlow_twins': ('configs/digits_barlow_twins.py', []),
    'vicreg_invariance_only': ('configs/digits.py', ['--config.vicreg.std_coeff=0', '--config.vicreg.cov_coeff=0']),
}
KEYS = ('linear_top1', 'linear_top1_5_per_class', 'knn_top1_20', 'rankme', 'embedding_std', 'wall_seconds')


def run(args: list, log: str) -> None:
  """``python -m vicreg_jax.main ARGS`` from the repository root, output to ``log``; raises on failure."""
  t0 = time.time()
  with open(log, 'w') as f:
    r = subprocess.run([sys.executable, '-m', 'vicreg_jax.main', *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if r.returncode:
    raise SystemExit(f'failed ({r.returncode}): {" ".join(args)}; see {log}')
  print(f'  done in {time.time() - t0:.0f} s', flush=True)


def pretrain_row(name: str, workdir: str, seeds) -> list[dict]:
  config, overrides = ROWS[name]
  out = []
  for s in seeds:
    w = os.path.join(workdir, name, f'seed{s}')
    summary = os.path.join(w, 'summary.json')
    if not os.path.exists(summary):
      print(f'{name} seed {s} ...', flush=True)
      os.makedirs(w, exist_ok=True)
      run([f'--config={config}', f'--workdir={w}', f'--config.seed={s}', *overrides], w + '.log')
    with open(summary) as f:
      out.append(json.load(f))
  return out


def supervised_row(workdir: str, seeds) -> list[dict]:
  """configs/digits_supervised.py (the backbone of the VICReg row's seed-0 run, trained from scratch on every
  label) per seed."""
  pre = os.path.join(workdir, 'vicreg', f'seed{seeds[0]}')
  out = []
  for s in seeds:
    w = os.path.join(workdir, 'supervised', f'seed{s}')
    results = os.path.join(w, 'results.json')
    if not os.path.exists(results):
      print(f'supervised seed {s} ...', flush=True)
      os.makedirs(w, exist_ok=True)
      run(['--config=configs/digits_supervised.py', f'--workdir={w}', f'--config.pretrain_workdir={pre}',
           f'--config.seed={s}'], w + '.log')
    with open(results) as f:
      r = json.load(f)['0']
    out.append({'linear_top1': r['top1'], 'wall_seconds': r['seconds']})
  return out


def raw_pixels(size: int) -> dict:
  """The end-of-run probes on the pixels themselves."""
  sys.path.insert(0, REPO)
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
  from vicreg_jax.data.sources import digits
  from vicreg_jax.evaluate import knn, probe
  tr, te = digits.load('train', size), digits.load('test', size)
  h_tr, h_te = tr.images.reshape(len(tr.labels), -1), te.images.reshape(len(te.labels), -1)
  return {'linear_top1': probe.linear_probe(h_tr, tr.labels, h_te, te.labels),
          'linear_top1_5_per_class': probe.few_label_probe(h_tr, tr.labels, h_te, te.labels, 5, 5, 0),
          'knn_top1_20': knn.knn_accuracy(h_tr, tr.labels, h_te, te.labels, ks=(20,))[20]}


def cell(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return ''
  if len(values) == 1:
    return f'{values[0]:.4g}'
  return f'{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--rows', default=','.join([*ROWS, 'supervised']))
  a = parser.parse_args()
  seeds = [int(s) for s in a.seeds.split(',')]
  table = {}
  for name in a.rows.split(','):
    if name == 'supervised':
      table[name] = supervised_row(a.workdir, seeds)
    elif name in ROWS:
      table[name] = pretrain_row(name, a.workdir, seeds)
    else:
      raise SystemExit(f'unknown row {name!r}: choose from {[*ROWS, "supervised"]}')
  table['raw_pixels_8x8'] = [raw_pixels(8)]
  table['raw_pixels_16x16'] = [raw_pixels(16)]
  with open(os.path.join(a.workdir, 'table.json'), 'w') as f:
    json.dump(table, f, indent=2)
  print(f'\nseeds {a.seeds} (mean ± sample std)\n')
  print('| row | ' + ' | '.join(KEYS) + ' |')
  print('|' + '---|' * (len(KEYS) + 1))
  for name, runs in table.items():
    print(f'| {name} | ' + ' | '.join(cell([r.get(k) for r in runs]) for k in KEYS) + ' |')


if __name__ == '__main__':
  main()
