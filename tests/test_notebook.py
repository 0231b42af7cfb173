"""The Colab quickstart executes top to bottom (with a small number of steps), as papermill would run it."""

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import FAST_COMPILE, REPO

pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nb = nbformat.read(REPO / 'notebooks' / 'quickstart.ipynb', as_version=4)
  (params,) = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  workdir = tmp_path / 'run'
  injected = nbformat.v4.new_code_cell('\n'.join([  # papermill's way: a cell after the parameters cell
      f'source = {str(REPO)!r}  # the local checkout instead of the repository URL',
      'num_steps = 20',
      f'workdir = {str(workdir)!r}',
      "pretrain_flags = ['--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', "
      "'--config.eval.draws=1']",
      "linear_flags = ['--config.epochs=20']"]))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(params + 1, injected)
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)  # the jobs it starts see one CPU device, as in Colab
  NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'step 20/20' in text and 'linear job, top-1 by checkpoint' in text, text[-3000:]
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2  # the loss terms, the spectrum
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 20 and 0.1 < summary['linear_top1'] <= 1.0
  results = json.loads((tmp_path / 'run_linear' / 'results.json').read_text())
  assert list(results) == ['20'] and 0.1 < results['20']['top1'] <= 1.0
