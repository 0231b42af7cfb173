"""Every numeric and enumerated key's value is checked before a job starts: a wrong one (negative, zero where it
divides or counts, beyond its range, of the wrong type, an unknown name) ends in one line naming the key, exit
1, no traceback; every config in configs/ passes, and every numeric or enumerated key in them has a rule."""

import glob
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from conftest import REPO, job_env, load_config, run_module
from vicreg_jax import config as config_checks
from vicreg_jax import methods
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
def test_wrong_values_on_the_command_line_end_in_one_line_with_exit_2(tmp_path):
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
    assert r['code'] == 2 and 'Traceback' not in r['stderr'], (case, r['stderr'][-2000:])
    assert lines[-1].startswith('error: ') and sum(ln.startswith('error') for ln in lines) == 1, (case, lines[-5:])
    assert case['key'].split('.')[-1] in lines[-1], (case, lines[-1])
  assert not (tmp_path / 'never').exists()  # refused before any work
  print(f'{len(cases)} command lines, each refused in one line naming its key, exit 2')


def test_one_schema_shared_keys_mean_the_same_in_every_job():
  """The keys both jobs have are one definition (the same default, the same rule); no other key name is used by
  both jobs; each method's section is its registry record's defaults, and its rules cover every key."""
  pre, ev = (config_checks.leaves(c) for c in (config_checks.base_config(), config_checks.eval_job_config()))
  shared = set(pre) & set(ev)
  # epochs: shared, but 0 is allowed only in pretraining (where num_steps can set the length instead)
  assert shared == set(config_checks._SHARED) | {'epochs'}, sorted(shared ^ set(config_checks._SHARED))
  differing = {k for k in shared if pre[k] != ev[k]}
  # the job presets change some shared defaults: each such difference is listed here
  assert differing == {'job', 'batch_size', 'epochs', 'log_every_steps', 'data.image_size'}, differing
  recipe = ('augment.view1.', 'augment.view2.', 'transforms.')  # a view recipe's keys: one definition (recipes.py)
  last = lambda keys: {k.rsplit('.', 1)[-1] for k in keys if not k.startswith(recipe)}  # noqa: E731
  reused = last(set(pre) - shared) & last(set(ev) - shared)
  # final_probe's and classifier's labels_per_class: both train a linear classifier on k labels per class;
  # online_probe's and classifier's momentum / weight_decay: an SGD's; model's and classifier's
  # ghost_batch_size: BatchNorm per group of that many rows by global position
  assert reused == {'labels_per_class', 'momentum', 'weight_decay', 'ghost_batch_size'}, reused
  for name, method in methods.METHODS.items():
    assert config_checks.base_config()[name].to_dict() == method.defaults
    assert set(method.rules) == set(method.defaults), name


def test_a_saved_config_is_read_through_the_schema(tmp_path):
  """An older run's config.json: keys it lacks take the defaults, renamed keys land under their new names, an
  unknown key is one line naming it and the file."""
  saved = config_checks.digits_config().to_dict()
  del saved['final_probe'], saved['reductions'], saved['model']['remat']
  saved['eval'] = {'final_probe': True, 'test_split': 'test', 'labels_per_class': 3, 'draws': 2, 'batch_size': 64,
                   'max_train_examples': 0, 'max_test_examples': 100}
  saved['data']['test_split'] = 'validation'  # the old pretraining data section had none: eval.test_split wins
  del saved['data']['test_split']
  config = config_checks.from_saved(json.loads(json.dumps(saved)))
  assert config.final_probe.to_dict() == {'enabled': True, 'labels_per_class': 3, 'draws': 2, 'batch_size': 64,
                                          'max_train_examples': 0, 'max_test_examples': 100}
  assert config.data.test_split == 'test' and config.reductions == 'native' and config.model.remat is False
  assert config.model.arch == 'convnet' and config.data.image_size == 16
  assert list(config.augment.view1.crop_scale) == list(config_checks.digits_config().augment.view1.crop_scale)
  config_checks.validate(config)
  linear = config_checks.eval_job_config().to_dict()
  del linear['classifier']['labels_per_class']
  linear['data']['labels_per_class'] = 5
  linear['job'] = 'finetune'
  config = config_checks.from_saved(json.loads(json.dumps(linear)))
  assert config.classifier.labels_per_class == 5 and config.job == 'finetune'
  saved['model']['no_such_key'] = 1
  with pytest.raises(errors.ConfigError, match=r'^my/config.json: unknown config key model.no_such_key$'):
    config_checks.from_saved(saved, origin='my/config.json')


@pytest.mark.slow  # command lines as jobs (the job server's start): the fast tier stays under 5 minutes
def test_an_old_key_on_the_command_line_names_its_new_name(tmp_path):
  for arg, new in (('--config.eval.final_probe=False', 'config.final_probe.enabled'),
                   ('--config.eval.test_split=test', 'config.data.test_split'),
                   ('--config.data.labels_per_class=5', 'config.classifier.labels_per_class')):
    r = run_module([arg, f'--workdir={tmp_path / "never"}'], job_env(1), timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f'error: config.{arg[9:].split("=")[0]} is now {new}'], (
        arg, r.stderr[-2000:])
  assert not (tmp_path / 'never').exists()


def test_no_config_key_is_read_with_a_fallback():
  """The schema defines every key, and a saved config is filled with its defaults: a ``.get(key, default)`` on
  a config section could only hide a missing key (or contradict its default)."""
  pattern = re.compile(r'\b(config|pre_config|data|model|augment|cl|o)(\.\w+)*\.get\(\s*[\'"](\w+)')
  keys = {k.rsplit('.', 1)[-1] for job in ('pretrain', 'linear') for k in config_checks.rules(job)}
  found = []
  for path in sorted((REPO / 'vicreg_jax').rglob('*.py')):
    for n, line in enumerate(path.read_text().splitlines(), 1):
      for m in pattern.finditer(line):
        if m.group(3) in keys:
          found.append(f'{path.relative_to(REPO)}:{n}: {line.strip()}')
  assert not found, '\n'.join(found)


def _restatements(paths, monkeypatch) -> list:
  """The assignments made in the config files ``paths`` (in a folder named configs), recorded while each one's
  get_config() runs, that set a key to the value it already holds."""
  restated = []

  def same(old, new):
    old, new = (x.to_dict() if hasattr(x, 'to_dict') else x for x in (old, new))
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
      old, new = list(old), list(new)
    return old == new and type(old) is type(new)

  def record(node, items):
    frame = sys._getframe(2)
    if '/configs/' in frame.f_code.co_filename.replace('\\', '/'):
      restated.extend(f'{frame.f_code.co_filename.rsplit("/", 1)[-1]}:{frame.f_lineno} {k}={v!r}'
                      for k, v in items if not k.startswith('_') and k in node and same(node[k], v))

  setattr_, update = ml_collections.ConfigDict.__setattr__, ml_collections.ConfigDict.update
  with monkeypatch.context() as m:
    m.setattr(ml_collections.ConfigDict, '__setattr__', lambda self, k, v: (record(self, [(k, v)]),
                                                                         setattr_(self, k, v))[1])
    m.setattr(ml_collections.ConfigDict, 'update', lambda self, *a, **kw: (record(self, dict(*a, **kw).items()),
                                                                         update(self, *a, **kw))[1])
    for path in paths:
      spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      module.get_config()
  return restated


def test_no_config_file_restates_a_default(tmp_path, monkeypatch):
  """A config file sets only what differs from its preset (a restated default hides which values are the
  recipe's own, and goes stale when the default moves)."""
  assert _restatements(sorted(glob.glob(str(REPO / 'configs' / '*.py'))), monkeypatch) == []
  planted = tmp_path / 'configs' / 'restating.py'
  planted.parent.mkdir()
  planted.write_text('from vicreg_jax.config import digits_config\n\n\ndef get_config():\n  c = digits_config()\n'
                     '  c.batch_size = 256\n  c.optim.update(base_lr=1e-3, weight_decay=1e-4)\n  return c\n')
  assert _restatements([planted], monkeypatch) == ['restating.py:6 batch_size=256', 'restating.py:7 weight_decay=0.0001']


def test_the_config_json_of_a_run_before_the_one_schema_is_read_as_it_was_run():
  """tests/data/config_json_8788030_digits.json: the config.json that ``configs/digits.py`` wrote at commit
  8788030 (two schemas, ``eval.*``; started with ``--config.compilation_cache=``). Read through the schema it is today's digits config, value for value: the
  renamed keys under their new names, the keys it lacks (data.path) at their defaults."""
  saved = json.loads((REPO / 'tests' / 'data' / 'config_json_8788030_digits.json').read_text())
  assert 'eval' in saved and 'final_probe' not in saved and 'path' not in saved['data']
  config = config_checks.from_saved(saved)
  config_checks.validate(config)
  now = config_checks.digits_config()
  now.compilation_cache = ''  # that run was started with --config.compilation_cache=
  now, read = config_checks.leaves(now), config_checks.leaves(config)
  as_lists = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731  (JSON)
  assert as_lists(read) == as_lists(now)


def test_the_jobs_the_schema_knows_are_the_jobs_main_runs():
  """main.JOBS (checked in a fresh interpreter: main defines absl flags, which other modules define too)."""
  code = ('import importlib, json; from vicreg_jax import config, main; '
          'print(json.dumps([sorted(main.JOBS), sorted(config.JOBS), '
          '[callable(getattr(importlib.import_module(m), f)) for m, f in main.JOBS.values()]]))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=job_env(1), capture_output=True, text=True,
                       check=True, timeout=300).stdout
  jobs, schema_jobs, callables = json.loads(out.strip().splitlines()[-1])
  assert jobs == schema_jobs == ['finetune', 'linear', 'pretrain'] and all(callables)
