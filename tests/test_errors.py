"""A user's mistake ends in one line on stderr and exit status 2, before any work; a bug keeps its traceback and
exits 1. Every case is the real command line (forked from one process that paid for the imports once:
tests/cli_harness.py), with 2 simulated devices."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, job_env, write_folder

pytestmark = pytest.mark.slow

TINY = ['--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', '--config.batch_size=64',
        '--config.final_probe.enabled=False', '--config.num_steps=1']


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp('errors')
  (root / 'a_file').write_text('not a folder')
  (root / 'empty').mkdir()
  write_folder(root / 'train_only' / 'train', {'cat': 4, 'dog': 4})
  (root / 'no_config' / 'checkpoints' / '5').mkdir(parents=True)
  linear = ['--config=configs/digits_linear.py', f'--workdir={root}/linear']
  cases = {
      'unknown_key': ['--config.no_such_key=1'],
      'wrong_type': ['--config.batch_size=abc'],
      'batch_vs_devices': [*TINY, '--config.batch_size=63', f'--workdir={root}/w1'],
      'dataset_missing': ['--config=configs/imagenet.py', f'--config.data.data_dir={root}/empty',
                          f'--workdir={root}/w2'],
      'workdir_not_writable': [*TINY, f'--workdir={root}/a_file/run'],
      'trained': [*TINY, f'--workdir={root}/model'],  # writes a checkpoint for the next case
      'other_model': [*TINY, '--config.model.projector=16-16-16', f'--workdir={root}/model'],
      'nan_loss': [*TINY, '--config.debug_nan_at_step=1', f'--workdir={root}/nan'],
      'linear_without_config': [*linear, f'--config.pretrain_workdir={root}/empty',
                                '--config.start_timeout_seconds=0'],
      'linear_checkpoints_without_config': [*linear, f'--config.pretrain_workdir={root}/no_config'],
      'folder_without_images': [*TINY, '--config.data.source=folder', f'--config.data.data_dir={root}/empty',
                                f'--workdir={root}/w3'],
      'linear_missing_split': [*linear, f'--config.pretrain_workdir={root}/model', '--config.data.source=folder',
                               f'--config.data.data_dir={root}/train_only', '--config.data.test_split=validation'],
      'bug': [*TINY, f'--workdir={root}/w4'],
  }
  spec = [{'name': k, 'argv': v, 'bug': k == 'bug'} for k, v in cases.items()]
  (root / 'cases.json').write_text(json.dumps(spec))
  subprocess.run([sys.executable, str(REPO / 'tests' / 'cli_harness.py'), str(root / 'cases.json'),
                  str(root / 'results.json')], cwd=REPO, env=job_env(2), check=True, timeout=600)
  return json.loads((root / 'results.json').read_text())


def one_line(result) -> str:
  """The error line of a run that failed the way a user's mistake must: status 2, no traceback, one 'error:'
  line, last."""
  assert result['code'] == 2, result
  assert 'Traceback' not in result['stderr'], result['stderr'][-3000:]
  lines = result['stderr'].strip().splitlines()
  assert lines[-1].startswith('error: '), lines[-5:]
  assert sum(line.startswith('error') for line in lines) == 1, lines
  return lines[-1]


@pytest.mark.parametrize('case, words', [
    ('unknown_key', ['unknown config key', 'no_such_key']),
    ('wrong_type', ['batch_size', 'abc']),
    ('batch_vs_devices', ['63', 'divisible', 'device count (2)']),
    ('dataset_missing', ['imagenet2012', 'manual_dir']),
    ('workdir_not_writable', ['cannot write to workdir', 'a_file']),
    ('other_model', ['another model', "['params']['projector']", '(32', '(16']),
    ('nan_loss', ['step 1', 'loss became nan', 'nonfinite=skip']),
    ('linear_without_config', ['config.json', 'pretrain_workdir']),
    ('linear_checkpoints_without_config', ['checkpoints but no config.json']),
    ('folder_without_images', ['no class subfolders', 'data_dir']),
    ('linear_missing_split', ["split 'validation'", 'val_fraction']),
])
def test_a_mistake_is_one_line(results, case, words):
  line = one_line(results[case])
  for word in words:
    assert word in line, (word, line)


def test_the_checkpoint_case_had_a_checkpoint_to_refuse(results):
  assert results['trained']['code'] == 0, results['trained']['stderr'][-3000:]


def test_a_bug_keeps_its_traceback(results):
  r = results['bug']
  assert r['code'] == 1 and 'Traceback' in r['stderr'] and 'ValueError: a programming error' in r['stderr']
