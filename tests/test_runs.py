"""Run helpers shared by the jobs (workdir, schedule, config and JSON files), and the layout rules they serve:
the evaluation jobs never import the pretraining loop, and no job function grows past ~60 lines."""

import ast
import json
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from vicreg_jax import runs


def test_schedule_steps_from_epochs_or_num_steps():
  c = load_config('digits')  # 1,257 training images, batch 256: 4 full batches per epoch
  assert runs.schedule_steps(c) == (150 * 4, 10 * 4, 4)
  c.num_steps = 7
  assert runs.schedule_steps(c) == (7, 7, 4)  # warmup clipped to the run


def test_config_round_trip_and_atomic_json(tmp_path):
  c = load_config('digits_barlow_twins')
  assert runs.read_config(str(tmp_path)) is None
  runs.save_config(str(tmp_path), c)
  back = runs.read_config(str(tmp_path))
  assert back.method == 'barlow_twins' and back.model.arch == 'convnet'
  assert list(back.augment.view1.jitter) == list(c.augment.view1.jitter)
  runs.write_json(str(tmp_path / 'r.json'), {'a': 1})
  assert json.loads((tmp_path / 'r.json').read_text()) == {'a': 1} and not (tmp_path / 'r.json.tmp').exists()


def test_absolute_workdir_keeps_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert runs.absolute_workdir('gs://b/run') == 'gs://b/run'
  assert runs.absolute_workdir('run') == str(tmp_path / 'run')


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_evaluation_jobs_never_import_the_pretraining_loop():
  code = ('import sys; import vicreg_jax.evaluate.linear, vicreg_jax.evaluate.finetune, vicreg_jax.evaluate.knn, '
          'vicreg_jax.evaluate.diagnostics; print("vicreg_jax.train" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == 'False'


@pytest.mark.parametrize('module', ['train.py', 'evaluate/linear.py', 'evaluate/classifier.py',
                                    'evaluate/finetune.py', 'methods.py', 'runs.py', 'loop.py', 'checkpoints.py'])
def test_no_job_function_over_60_lines(module):
  tree = ast.parse((REPO / 'vicreg_jax' / module).read_text())
  long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60}
  assert not long, long
