"""benchmarks/config_diff.py: which configs resolve differently in two checkouts (the rows a change re-runs)."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('config_diff', REPO / 'benchmarks' / 'config_diff.py')
config_diff = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_diff)


def test_changed_values_name_a_row_to_rerun_and_renamed_or_added_keys_do_not():
  before = {'a': {'x': 1, 'old.y': 2}, 'b': {'x': 1}, 'c': {'x': 1}}
  after = {'a': {'x': 1, 'new.y': 2, 'z': 0}, 'b': {'x': 3}, 'd': {'x': 1}}
  result = config_diff.diff(before, after, {'old.y': 'new.y'})
  assert result['a'] == dict(only=None, changed={}, added={'z': 0}, removed={})
  assert result['b']['changed'] == {'x': [1, 3]}
  assert result['c']['only'] == 'before' and result['d']['only'] == 'after'
  assert config_diff.report(result) == ['b', 'c', 'd']


def test_the_working_tree_against_itself_changes_nothing():
  """Both sides resolved in fresh interpreters from this checkout: every digits config, nothing differs."""
  configs, renamed = config_diff.resolve(str(REPO), 'digits*')
  assert {'digits', 'digits_linear', 'digits_swav'} <= set(configs)
  assert configs['digits']['method'] == 'vicreg' and configs['digits_swav']['method'] == 'swav'
  result = config_diff.diff(configs, configs, renamed)
  assert config_diff.report(result) == []
