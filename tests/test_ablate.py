"""The ablation command: its rows' configs, its table, and a resumable end-to-end run."""

import json

import pytest

from conftest import REPO, job_env, run_module
from vicreg_jax import ablate, methods


def test_rows_build_configs_of_their_method_with_their_overrides():
  base = str(REPO / 'configs' / 'digits.py')
  rows = {r.name: r for r in ablate.PAPER_ROWS}
  c = ablate.row_config(base, rows['coeff_1_1_1'], seed=2, epochs=7, settings=['model.width_multiplier=0.5'])
  assert (c.method, c.vicreg.sim_coeff, c.vicreg.std_coeff, c.vicreg.cov_coeff) == ('vicreg', 1.0, 1.0, 1.0)
  assert (c.seed, c.epochs, c.num_steps, c.model.width_multiplier, c.final_probe.enabled) == (2, 7, 0, 0.5, True)
  s = ablate.row_config(base, rows['simsiam_no_pred_var'], seed=0, epochs=0, settings=[])
  # From configs/digits_simsiam.py: its projector with the output BatchNorm, no predictor, μ = 1.
  assert s.method == 'simsiam' and s.model.projector_output_bn and s.simsiam.predictor == ''
  assert s.simsiam.std_coeff == 1.0 and s.simsiam.cov_coeff == 0.0 and s.epochs == 150
  b = ablate.row_config(base, rows['byol_var_cov'], seed=0, epochs=0, settings=[])
  assert b.method == 'byol' and (b.byol.std_coeff, b.byol.cov_coeff) == (1.0, 0.01)
  assert ablate.row_config(base, rows['vicreg_no_bn'], 0, 0, []).model.projector_bn is False
  # Every row is a valid config of a known method.
  for row in (*ablate.PAPER_ROWS, *ablate.METHOD_ROWS):
    methods.make_optimizer(ablate.row_config(base, row, 0, 1, []), 10, 1)
  assert {r.method for r in ablate.METHOD_ROWS} == set(methods.METHODS)


def test_table_has_mean_std_and_collapse_counts():
  rows = ablate.PAPER_ROWS[:2]
  ok = {'linear_top1': 0.9, 'linear_top1_5_per_class': 0.8, 'knn_top1_20': 0.85, 'rankme': 20.0,
        'embedding_std': 0.6, 'embedding_std_unit': 0.8, 'rankme_embeddings': 40.0}
  results = {'vicreg': [ok, dict(ok, linear_top1=0.8)],
             'inv_only': [dict(ok, embedding_std_unit=0.01), {'failed': 'loss became nan at step 3'},
                          dict(ok, embedding_std=0.007), dict(ok, rankme_embeddings=1.2), dict(ok, rankme=1.2)]}
  table = ablate.markdown(rows, results, 'header')
  lines = table.splitlines()
  assert lines[0] == 'header' and len(lines) == 6
  assert '| 0.850 ± 0.071 |' in lines[4] and lines[4].endswith('| no | 68.6 (Table 7) |')
  assert '| yes (4/5) | collapse |' in lines[5]  # not the run whose representations alone have a low rank


@pytest.mark.slow
def test_command_runs_rows_over_seeds_and_resumes(tmp_path):
  """One row × two seeds of a tiny model, then the same command again: nothing is rerun, the tables are
  rewritten from the recorded summaries."""
  args = [f'--workdir={tmp_path}', '--rows=inv_only', '--seeds=0,1', '--epochs=1', '--set=model.width_multiplier=0.25',
          "--set=model.projector='32-32-32'", '--set=batch_size=64', '--set=final_probe.draws=1']
  first = run_module(args, job_env(2), timeout=600, module='vicreg_jax.ablate')
  assert first.returncode == 0, first.stderr[-3000:]
  progress = [line for line in first.stdout.splitlines() if line.startswith('[')]
  assert len(progress) == 2 and progress[-1].startswith('[2/2] inv_only seed 1: linear ')
  assert 'ETA' in progress[0] and 'done before' not in first.stdout
  summaries = [json.loads(p.read_text()) for p in tmp_path.glob('inv_only/seed*/summary.json')]
  assert len(summaries) == 2 and all(s['steps'] == 1257 // 64 for s in summaries)  # 1 epoch
  assert summaries[0]['linear_top1'] != summaries[1]['linear_top1']  # two seeds, two runs
  table = (tmp_path / 'ablation.md').read_text()
  assert 'invariance only' in table and 'VICReg, λ/μ/ν' not in table  # only the rows asked for
  assert (tmp_path / 'ablation.png').stat().st_size > 10_000

  again = run_module(args, job_env(2), timeout=300, module='vicreg_jax.ablate')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('(done before)') == 2
  assert (tmp_path / 'ablation.md').read_text() == table
