"""The package's layout rules, checked in fresh interpreters so that no other test's imports hide a violation:
the step needs neither the evaluation package nor TensorFlow (accelerator hosts may have none), evaluation never
imports the pretraining job, and no function is longer than 60 lines of code or nests more than 3 functions."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, job_env

MAX_LINES, MAX_NESTED = 60, 3


def _modules_after(code: str) -> set:
  """The names in sys.modules after running ``code`` in a fresh interpreter."""
  out = subprocess.run([sys.executable, '-c', f'import json, sys; {code}; print(json.dumps(sorted(sys.modules)))'],
                       capture_output=True, text=True, check=True, cwd=REPO, env=job_env(1)).stdout
  return set(json.loads(out.strip().splitlines()[-1]))


def test_the_step_imports_neither_evaluation_nor_tensorflow():
  """The step, the config schema and the methods import without TensorFlow and without vicreg_jax.evaluate."""
  loaded = _modules_after('import vicreg_jax.step, vicreg_jax.config, vicreg_jax.methods, vicreg_jax.collapse')
  assert 'vicreg_jax.step' in loaded
  assert 'tensorflow' not in loaded
  assert not {m for m in loaded if m.startswith('vicreg_jax.evaluate')}, sorted(loaded)


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_evaluation_never_imports_the_pretraining_job():
  modules = sorted(p.stem for p in (REPO / 'vicreg_jax' / 'evaluate').glob('*.py') if p.stem != '__init__')
  assert {'classifier', 'linear', 'summary', 'probe', 'knn', 'diagnostics'} <= set(modules)
  loaded = _modules_after('; '.join(f'import vicreg_jax.evaluate.{m}' for m in modules))
  assert {f'vicreg_jax.evaluate.{m}' for m in modules} <= loaded
  assert 'vicreg_jax.train' not in loaded


_MEASURE = r'''
import ast, json, pathlib, sys
out = []
for root in sys.argv[1:]:
  for path in sorted(pathlib.Path(root).rglob('*.py')):
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse('\n'.join(lines))):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      body = node.body
      doc = (body[0].lineno, body[0].end_lineno) if (body and isinstance(body[0], ast.Expr) and isinstance(
          body[0].value, ast.Constant) and isinstance(body[0].value.value, str)) else (0, -1)
      code = sum(1 for i in range(node.lineno, node.end_lineno + 1) if not doc[0] <= i <= doc[1]
                 and lines[i - 1].strip() and not lines[i - 1].strip().startswith('#'))
      nested = sum(1 for n in ast.walk(node) if n is not node and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
      out.append([str(path), node.lineno, node.name, code, nested])
print(json.dumps(out))
'''


def _functions(*roots) -> list:
  """``[path, line, name, lines of code (docstring, blank and comment lines excluded), nested functions]`` of
  every function under ``roots`` (measured in a fresh interpreter)."""
  out = subprocess.run([sys.executable, '-c', _MEASURE, *[str(REPO / r) for r in roots]], capture_output=True,
                       text=True, check=True, cwd=REPO).stdout
  return json.loads(out)


def test_no_function_is_over_60_lines_or_nests_more_than_3_functions():
  functions = _functions('vicreg_jax', 'benchmarks', 'configs')
  assert len(functions) > 300
  too_long = [f'{p}:{n} {name}: {code} lines' for p, n, name, code, _ in functions if code > MAX_LINES]
  too_nested = [f'{p}:{n} {name}: {k} nested functions' for p, n, name, _, k in functions if k > MAX_NESTED]
  assert not too_long and not too_nested, '\n'.join(too_long + too_nested)


@pytest.mark.parametrize('body, code, nested', [
    ('  """doc\n  string"""\n  a = 1\n\n  # note\n  return a', 3, 0),
    ('  def f():\n    def g():\n      pass\n    return g\n  def h():\n    pass\n  return f', 8, 3)])
def test_the_measure_counts_code_lines_and_nested_functions(tmp_path, body, code, nested):
  (tmp_path / 'm.py').write_text(f'def top():\n{body}\n')
  out = subprocess.run([sys.executable, '-c', _MEASURE, str(tmp_path)], capture_output=True, text=True,
                       check=True).stdout
  top = [f for f in json.loads(out) if f[2] == 'top'][0]
  assert top[3:] == [code, nested]
