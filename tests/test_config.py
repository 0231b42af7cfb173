"""Every numeric and enumerated key's value is checked before a job starts: a wrong one (negative, zero where it
divides or counts, beyond its range, of the wrong type, an unknown name) ends in one line naming the key, exit
1, no traceback; every config in configs/ passes, and every numeric or enumerated key in them has a rule."""

import glob
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, job_env, load_config
from vicreg_jax import config as config_checks
from vicreg_jax import errors

CONFIGS = sorted(p.split('/')[-1][:-3] for p in glob.glob(str(REPO / 'configs' / '*.py')))


def wrong_values(rule: config_checks.Rule) -> list:
  """Values that break ``rule``: below its lower bound (its bound itself where excluded: zero where a count
  divides), above its upper bound, not finite, of the wrong type; for choices an unknown name."""
  if rule.kind == 'str':
    return ['no_such_name', 3] if rule.choices is not None else [3]
  if rule.kind == 'bool':
    return ['yes']
  out = ['abc', True]
  if rule.lo is not None:
    out.append(rule.lo if rule.lo_open else rule.lo - (1 if rule.kind == 'int' else 0.5))
  if rule.hi is not None:
    out.append(rule.hi + 1)
  if rule.kind == 'float':
    out.append(math.inf)
  else:
    out.append(1.5)
  return out


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_passes_and_every_numeric_or_enumerated_key_has_a_rule(name):
  config = load_config(name)
  config_checks.validate(config)
  rules = config_checks.rules(config.job)
  missing = [k for k, v in config_checks.leaves(config).items()
             if k not in rules and isinstance(v, (int, float, str, bool))]
  assert not missing, missing


@pytest.mark.parametrize('name', ['digits', 'digits_linear'])
def test_every_wrong_value_of_every_key_is_one_line_naming_it(name):
  base = load_config(name).to_dict()
  checked = 0
  for key, rule in config_checks.rules(base['job']).items():
    if key not in config_checks.leaves(base):
      continue
    for value in wrong_values(rule):
      config = json.loads(json.dumps(base))
      node, *path = [config] + key.split('.')
      for p in path[:-1]:
        node = node[p]
      node[path[-1]] = value
      with pytest.raises(errors.ConfigError) as e:
        config_checks.validate(config)
      assert str(e.value).startswith(f'config.{key} ') and '\n' not in str(e.value), (key, value, str(e.value))
      checked += 1
  print(f'{name}: {checked} wrong values, each refused naming its key')
  assert checked > 100


def test_a_config_without_steps_is_refused():
  config = load_config('digits').to_dict()
  config.update(epochs=0, num_steps=0)
  with pytest.raises(errors.ConfigError, match='both 0'):
    config_checks.validate(config)


@pytest.mark.slow
def test_wrong_values_on_the_command_line_end_in_one_line_with_exit_1(tmp_path):
  """Every numeric and enumerated key of both jobs, through the real command line (forked from one process,
  tests/cli_harness.py): one wrong number (below its range: negative, or zero where it divides) or an unknown
  name each; a wrong type for a few (the flag parser's path, the same for every key)."""
  cases = [{'name': f'type.{key}', 'key': key, 'argv': [f'--config.{key}=abc', f'--workdir={tmp_path / "never"}']}
           for key in ('batch_size', 'optim.base_lr', 'checkpoint_every_steps', 'swav.temperature')]
  for name, config_file in (('digits', 'configs/digits.py'), ('digits_linear', 'configs/digits_linear.py')):
    base = config_checks.leaves(load_config(name))
    for key, rule in config_checks.rules(base['job']).items():
      if key not in base or rule.kind == 'bool' or (rule.kind == 'str' and rule.choices is None):
        continue
      values = ['no_such_name'] if rule.kind == 'str' else [wrong_values(rule)[2]]
      for i, value in enumerate(values):
        cases.append({'name': f'{name}.{key}.{i}', 'key': key, 'argv': [
            f'--config={config_file}', f'--config.{key}={value}', f'--workdir={tmp_path / "never"}']})
  (tmp_path / 'cases.json').write_text(json.dumps(cases))
  subprocess.run([sys.executable, str(REPO / 'tests' / 'cli_harness.py'), str(tmp_path / 'cases.json'),
                  str(tmp_path / 'results.json')], cwd=REPO, env=job_env(2), check=True, timeout=1200)
  results = json.loads((tmp_path / 'results.json').read_text())
  for case in cases:
    r = results[case['name']]
    lines = r['stderr'].strip().splitlines()
    assert r['code'] == 1 and 'Traceback' not in r['stderr'], (case, r['stderr'][-2000:])
    assert lines[-1].startswith('error: ') and sum(ln.startswith('error') for ln in lines) == 1, (case, lines[-5:])
    assert case['key'].split('.')[-1] in lines[-1], (case, lines[-1])
  assert not (tmp_path / 'never').exists()  # refused before any work
  print(f'{len(cases)} command lines, each refused in one line naming its key, exit 1')
