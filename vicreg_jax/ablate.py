"""The VICReg paper's ablations (Tables 7, 4 and 8), or a comparison of every method, over seeds, by one command.

  python -m vicreg_jax.ablate --config=configs/digits.py --workdir=runs/ablation            # the paper's rows
  python -m vicreg_jax.ablate --config=configs/digits.py --workdir=runs/methods --suite=methods

Each row is a pretraining config run once per seed into ``WORKDIR/ROW/seedS``, each with the end-of-run probe
(linear top-1, k labels per class, 20-NN, RankMe, embedding std). A row's method other than the base config's
comes from the sibling config ``<config>_<method>.py`` (configs/digits_byol.py for configs/digits.py) where one
exists. A run whose ``summary.json`` exists is not run again, so an interrupted command continues where it
stopped; a run that fails (a non-finite loss) is recorded as failed and the others go on. Every row runs for
``--epochs`` (shorter than the headline recipes, to fit the 20 rows × 3 seeds in an hour on 2 cores).
Writes ``WORKDIR/ablation.md`` (mean ± sample std over seeds), ``ablation.json`` and ``ablation.png`` (a bar
chart with error bars); the methods suite writes ``methods.md``, ``.json`` and ``.png``. The two suites can
share a workdir: their common rows (VICReg, BYOL, SimSiam at the same budget) run once.

A run counts as collapsed (:func:`collapsed`) when its embeddings on the training set shrink towards a point
(per-dimension std below 0.05, a twentieth of VICReg's hinge target; healthy runs here have 0.4–1.5), point
the same way (scaled to unit norm, they vary less than 0.1 of what spread-out ones do), or span one direction
(RankMe of the embeddings below 2); or when the loss became non-finite.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time

from absl import app, flags, logging
import numpy as np

_CONFIG = flags.DEFINE_string('config', 'configs/digits.py', 'Base pretraining config file (VICReg).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where every row and seed runs, and the tables go.', required=True)
_SUITE = flags.DEFINE_enum('suite', 'paper', ['paper', 'methods'], "'paper': the VICReg paper's ablation rows "
                           "that fit the base config; 'methods': every method with its own config.")
_SEEDS = flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.')
_EPOCHS = flags.DEFINE_integer('epochs', 25, 'Pretraining epochs of every run (0: each config\'s own).')
_ROWS = flags.DEFINE_string('rows', '', 'Comma-separated row names to run (default: all of the suite).')
_SET = flags.DEFINE_multi_string('set', [], 'KEY=VALUE (Python literal) applied to every row, e.g. '
                                 '--set=batch_size=128.')

COLLAPSE = {'embedding_std': 0.05, 'embedding_std_unit': 0.1, 'rankme_embeddings': 2.0}  # below: collapsed
COLUMNS = (('linear_top1', 'linear top-1'), ('linear_top1_5_per_class', '5-per-class top-1'),
           ('knn_top1_20', '20-NN top-1'), ('rankme', 'RankMe'), ('embedding_std', 'embedding std'),
           ('embedding_std_unit', 'unit-norm std'))


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  label: str
  method: str = 'vicreg'
  overrides: tuple = ()
  paper: str = ''  # the paper's figure (ImageNet linear top-1), for the table


VAR, VAR_COV = (('std_coeff', 1.0),), (('std_coeff', 1.0), ('cov_coeff', 0.01))


def _m(method, pairs):
  return tuple((f'{method}.{k}', v) for k, v in pairs)


PAPER_ROWS = (
    Row('vicreg', 'VICReg, λ/μ/ν 25/25/1 (full)', paper='68.6 (Table 7)'),
    Row('inv_only', 'invariance only', overrides=(('vicreg.std_coeff', 0.0), ('vicreg.cov_coeff', 0.0)),
        paper='collapse'),
    Row('inv_var', 'invariance + variance', overrides=(('vicreg.cov_coeff', 0.0),), paper='57.5'),
    Row('inv_cov', 'invariance + covariance', overrides=(('vicreg.std_coeff', 0.0),), paper='collapse'),
    Row('coeff_1_1_1', 'coefficients 1/1/1', overrides=(('vicreg.sim_coeff', 1.0), ('vicreg.std_coeff', 1.0)),
        paper='collapse'),
    Row('coeff_5_5_1', 'coefficients 5/5/1', overrides=(('vicreg.sim_coeff', 5.0), ('vicreg.std_coeff', 5.0)),
        paper='within 0.5 of 25/25/1'),
    Row('coeff_50_50_1', 'coefficients 50/50/1',
        overrides=(('vicreg.sim_coeff', 50.0), ('vicreg.std_coeff', 50.0)), paper='within 0.5 of 25/25/1'),
    Row('vicreg_no_bn', 'VICReg, no BatchNorm in the projector', overrides=(('model.projector_bn', False),),
        paper='67.4 (Table 8)'),
    Row('byol', 'BYOL', 'byol', paper='69.3 (Table 4)'),
    Row('byol_var', 'BYOL + variance', 'byol', _m('byol', VAR), paper='70.2'),
    Row('byol_var_cov', 'BYOL + variance + covariance', 'byol', _m('byol', VAR_COV), paper='69.5'),
    Row('simsiam', 'SimSiam', 'simsiam', paper='67.9'),
    Row('simsiam_var', 'SimSiam + variance', 'simsiam', _m('simsiam', VAR), paper='68.1'),
    Row('simsiam_var_cov', 'SimSiam + variance + covariance', 'simsiam', _m('simsiam', VAR_COV), paper='68.0'),
    Row('simsiam_no_pred', 'SimSiam, no predictor (stop-gradient only)', 'simsiam',
        (('simsiam.predictor', ''),), paper='collapse'),
    Row('simsiam_no_pred_var', 'SimSiam, no predictor, + variance', 'simsiam',
        (('simsiam.predictor', ''), *_m('simsiam', VAR)), paper='56.8'),
    # SimSiam's official projector ends in a BatchNorm without affine, which holds every dimension's std at 1:
    # there VICReg's variance hinge is zero and its gradient too. These two rows remove that last BatchNorm.
    Row('simsiam_no_pred_no_out_bn', 'SimSiam, no predictor, no output BatchNorm', 'simsiam',
        (('simsiam.predictor', ''), ('model.projector_output_bn', False)), paper='–'),
    Row('simsiam_no_pred_no_out_bn_var', 'SimSiam, no predictor, no output BatchNorm, + variance', 'simsiam',
        (('simsiam.predictor', ''), ('model.projector_output_bn', False), *_m('simsiam', VAR)), paper='–'),
    Row('simsiam_no_bn', 'SimSiam, no BatchNorm in the projector', 'simsiam', (('model.projector_bn', False),),
        paper='35.1'),
    Row('simsiam_no_bn_var', 'SimSiam, no projector BatchNorm, + variance', 'simsiam',
        (('model.projector_bn', False), *_m('simsiam', VAR)), paper='67.3'),
)

# The ImageNet linear top-1 of the variant each configs/imagenet_NAME.py implements (docs/methods.md: SimSiam at
# its 100 epochs, SwAV with multi-crop, MoCo v3 with a ViT-S/16, its ResNet-50 reaching 74.6; MoCo v2 at 200
# epochs, 71.1 at 800).
METHOD_ROWS = tuple(Row(m, label, m, paper=paper) for m, label, paper in (
    ('vicreg', 'VICReg', '73.2'), ('barlow_twins', 'Barlow Twins', '73.2'), ('wmse', 'W-MSE', ''),
    ('simclr', 'SimCLR', '69.3'), ('byol', 'BYOL', '74.3'), ('simsiam', 'SimSiam', '68.1'),
    ('swav', 'SwAV', '75.3'), ('moco_v3', 'MoCo v3', '73.2'), ('moco_v2', 'MoCo v2', '67.5')))


def load_config_file(path: str):
  """``get_config()`` of the config file at ``path``."""
  spec = importlib.util.spec_from_file_location(f'_ablate_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _parse_value(text: str):
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def row_config(base_path: str, row: Row, seed: int, epochs: int, settings: list[str]):
  """The config of ``row`` at ``seed``: the method's sibling config of ``base_path`` (or the base with the
  method set), the row's overrides, ``--set`` values, the seed and the epoch budget."""
  stem, ext = os.path.splitext(base_path)
  sibling = f'{stem}_{row.method}{ext}'
  config = load_config_file(sibling if os.path.exists(sibling) else base_path)
  config.method = row.method
  pairs = list(row.overrides) + [(k, _parse_value(v)) for k, v in (s.split('=', 1) for s in settings)]
  for key, value in pairs:
    *path, last = key.split('.')
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  config.seed = seed
  if epochs:
    config.epochs, config.num_steps = epochs, 0
  config.final_probe.enabled = True
  return config


def run_one(config, workdir: str) -> dict:
  """One pretraining run (or its recorded summary): the summary dict, ``{'failed': reason}`` if it failed."""
  from vicreg_jax import train
  path = os.path.join(workdir, 'summary.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  try:
    return train.train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # a diverging row is a result, not a reason to stop the others
    summary = {'failed': str(e)}
    with open(path, 'w') as f:
      json.dump(summary, f)
    return summary


def collapsed(summary: dict) -> bool:
  """Whether a run's embeddings collapsed: any of the :data:`COLLAPSE` figures below its threshold, or the run
  failed (a non-finite loss)."""
  return 'failed' in summary or any(summary.get(k, limit) < limit for k, limit in COLLAPSE.items())


def cell(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '–'
  if len(values) == 1:
    return f'{values[0]:.3g}'
  mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
  return f'{mean:.3f} ± {std:.3f}' if abs(mean) < 10 else f'{mean:.1f} ± {std:.1f}'


def markdown(rows, results: dict, header: str) -> str:
  lines = [header, '', '| row | ' + ' | '.join(c for _, c in COLUMNS) + ' | collapsed | paper (ImageNet) |',
           '|' + '---|' * (len(COLUMNS) + 3)]
  for row in rows:
    runs = results.get(row.name, [])
    if not runs:
      continue
    n_coll = sum(collapsed(r) for r in runs)
    coll = 'no' if n_coll == 0 else f'yes ({n_coll}/{len(runs)})'
    lines.append(f'| {row.label} | ' + ' | '.join(cell([r.get(k) for r in runs]) for k, _ in COLUMNS) +
                 f' | {coll} | {row.paper or "–"} |')
  return '\n'.join(lines) + '\n'


def bar_chart(rows, results: dict, path: str, title: str):
  """Linear and 5-per-class top-1 per row, mean with sample-std error bars, as a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  rows = [r for r in rows if results.get(r.name)]
  fig = Figure(figsize=(10, 0.45 * len(rows) + 1.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  y = np.arange(len(rows))
  for i, (key, label) in enumerate(COLUMNS[:2]):
    vals = [[r.get(key, 0.0) or 0.0 for r in results[row.name]] for row in rows]
    ax.barh(y + (i - 0.5) * 0.4, [np.mean(v) for v in vals], 0.4,
            xerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], label=label, capsize=2)
  labels = [r.label + (' (collapsed)' if any(collapsed(s) for s in results[r.name]) else '') for r in rows]
  ax.set_yticks(y, labels)
  ax.invert_yaxis()
  low = min(0.5, min(np.mean([s.get('linear_top1_5_per_class', 0) or 0 for s in results[r.name]]) for r in rows))
  ax.set_xlim(max(0.0, np.floor(low * 10) / 10 - 0.1), 1)
  ax.set_xlabel('top-1 on the test split')
  ax.set_title(title, fontsize=9, wrap=True)
  ax.legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the runs' step lines; this command prints one line per run
  rows = PAPER_ROWS if _SUITE.value == 'paper' else METHOD_ROWS
  if _ROWS.value:
    names = _ROWS.value.split(',')
    unknown = sorted(set(names) - {r.name for r in rows})
    if unknown:
      raise app.UsageError(f'unknown rows {unknown}; the {_SUITE.value} suite has {[r.name for r in rows]}')
    rows = tuple(r for r in rows if r.name in names)
  seeds = [int(s) for s in _SEEDS.value.split(',')]
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  jobs = [(row, s) for row in rows for s in seeds]
  results, t0, ran = {}, time.time(), 0
  for k, (row, seed) in enumerate(jobs, 1):
    w = os.path.join(workdir, row.name, f'seed{seed}')
    fresh = not os.path.exists(os.path.join(w, 'summary.json'))
    summary = run_one(row_config(_CONFIG.value, row, seed, _EPOCHS.value, _SET.value), w)
    results.setdefault(row.name, []).append(summary)
    ran += fresh
    elapsed = time.time() - t0
    eta = elapsed / ran * (len(jobs) - k) if ran else 0.0
    figure = summary.get('failed') or f"linear {summary.get('linear_top1', float('nan')):.3f}"
    print(f'[{k}/{len(jobs)}] {row.name} seed {seed}: {figure}, collapsed {"yes" if collapsed(summary) else "no"}'
          f'{"" if fresh else " (done before)"}  elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min', flush=True)
  budget = f'{_EPOCHS.value} epochs' if _EPOCHS.value else "each config's epochs"
  rule = ' or '.join(f'{k} < {v}' for k, v in COLLAPSE.items())
  header = (f'{_SUITE.value} suite on {_CONFIG.value}, {budget} per run, seeds {_SEEDS.value} '
            f'(mean ± sample std); collapsed: {rule}')
  table = markdown(rows, results, header)
  stem = os.path.join(workdir, 'ablation' if _SUITE.value == 'paper' else 'methods')
  with open(stem + '.md', 'w') as f:
    f.write(table)
  with open(stem + '.json', 'w') as f:
    json.dump(results, f, indent=1)
  bar_chart(rows, results, stem + '.png', f'{_SUITE.value} suite, {budget} per run, seeds {_SEEDS.value}, mean ± std')
  print(table)
  print(f'Wrote {stem}.md, .json and .png.')


if __name__ == '__main__':
  sys.path.insert(0, os.getcwd())
  app.run(main)
