"""The Colab quickstart executes top to bottom (with a small number of steps), as papermill would run it: with
``source`` pointed at the checkout, and opened from ``notebooks/`` with every default but the number of steps
and the workdir, as a user opens it in Jupyter (the kernel's working directory is the notebook's folder)."""

import json
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import FAST_COMPILE, REPO

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'


def with_parameters(nb, lines, keep=None):
  """``nb`` with a cell of ``lines`` after its parameters cell (papermill's way), cut to its first ``keep``
  cells."""
  (params,) = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  injected = nbformat.v4.new_code_cell('\n'.join(lines))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(params + 1, injected)
  nb.cells = nb.cells[:keep]
  return nb


def outputs_text(nb) -> tuple[str, list]:
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  return ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream'), outputs


@pytest.mark.parametrize('opened', ['with_source', 'from_notebooks_folder'])
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch, opened):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / 'run'
  if opened == 'with_source':  # the checkout named, a tiny model
    lines = [f'source = {str(REPO)!r}', "pretrain_flags = ['--config.model.width_multiplier=0.25', "
             "'--config.model.projector=32-32-32', '--config.final_probe.draws=1']", "linear_flags = ['--config.epochs=20']"]
    cwd = tmp_path
  else:  # as a user opens it: the kernel in notebooks/, every default but these two
    lines, cwd = [], NOTEBOOK.parent
  nb = with_parameters(nb, ['num_steps = 20', f'workdir = {str(workdir)!r}', *lines])
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)  # the jobs it starts see one CPU device, as in Colab
  started = time.time()
  NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(cwd)}}).execute()
  print(f'{opened}: {time.time() - started:.0f} s')

  text, outputs = outputs_text(nb)
  assert f'using {REPO.resolve()} (already installed)' in text, text[:2000]  # the suite's own install
  assert 'step 20/20' in text and 'linear job, top-1 by checkpoint' in text, text[-3000:]
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2  # the loss terms, the spectrum
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 20 and 0.1 < summary['linear_top1'] <= 1.0
  results = json.loads((tmp_path / 'run_linear' / 'results.json').read_text())
  assert list(results) == ['20'] and 0.1 < results['20']['top1'] <= 1.0


def test_quickstart_notebook_outside_a_checkout_asks_for_its_source(tmp_path):
  """Opened where no checkout is (Colab) with the placeholder ``source``: the install cell stops with one line
  that says what to set, and clones nothing."""
  nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), [], keep=5)  # intro, parameters, ours, install
  with pytest.raises(CellExecutionError) as failed:
    NotebookClient(nb, timeout=120, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
  error = failed.value
  print(f'{error.ename}: {error.evalue}')
  assert error.ename == 'SystemExit'
  assert error.evalue.startswith(f'No vicreg_jax checkout at or above {tmp_path.resolve()}')
  assert 'set `source` in the parameters cell' in error.evalue and '\n' not in error.evalue
  assert list(tmp_path.iterdir()) == []  # nothing cloned
