"""Which configs resolve differently in two checkouts: every key of each ``configs/NAME.py``'s ``get_config()``,
compared value by value, to decide which benchmark rows a change has to re-run.

    python benchmarks/config_diff.py --before=COMMIT [--after=COMMIT|DIR] [--configs='digits*'] [--json=FILE]

``--before`` / ``--after`` are git revisions of this repository (exported with ``git archive`` into a temporary
folder) or checkout folders; ``--after`` defaults to this checkout's working tree. Each side resolves its configs
in a fresh interpreter with that side's package on ``PYTHONPATH``, so each sees its own schema and defaults; an
evaluation config with ``protocol='none'`` is resolved as its job resolves it (``evaluate.protocols.resolve``).

Keys the after side renamed (its ``config.RENAMED``) are compared under their new names. Prints per config: the
keys whose value changed (before → after), the keys only one side has (a key the change added keeps the old
behaviour only if its default says so: such keys are listed, not judged), and a last line naming the configs whose
values changed: the rows to re-run. ``--json`` writes the same as data.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the checkout being resolved: prints {config name: {dotted key: value}} as JSON.
_RESOLVE = r'''
import importlib.util, json, os, sys
from vicreg_jax import config as schema
out = {}
for path in sys.argv[1:]:
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if config.get('protocol') == 'none':  # an evaluation config with its own protocol: what the job runs
    from vicreg_jax.evaluate import protocols
    config = protocols.resolve(config, None)[0]
  out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in schema.leaves(config).items()}
print(json.dumps({'configs': out, 'renamed': getattr(schema, 'RENAMED', {})}, default=repr))
'''


def checkout(rev: str, tmp: str) -> str:
  """A folder holding ``rev``'s tree: ``rev`` itself when it is a folder, else ``git archive rev`` unpacked."""
  if os.path.isdir(rev):
    return os.path.abspath(rev)
  dest = os.path.join(tmp, rev.replace('/', '_'))
  archive = os.path.join(tmp, 'tree.tar')
  subprocess.run(['git', '-C', REPO, 'archive', '-o', archive, rev], check=True)
  with tarfile.open(archive) as tar:
    tar.extractall(dest, filter='data')
  return dest


def resolve(root: str, pattern: str) -> tuple[dict, dict]:
  """``{config name: {key: value}}`` for the configs of ``root`` matching ``pattern``, resolved in ``root``, and
  that checkout's table of renamed keys (``config.RENAMED``: old name -> new)."""
  files = sorted(f for f in os.listdir(os.path.join(root, 'configs')) if fnmatch.fnmatch(f, pattern + '.py'))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  r = subprocess.run([sys.executable, '-c', _RESOLVE, *(os.path.join(root, 'configs', f) for f in files)],
                     cwd=root, env=env, capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(f'resolving the configs of {root} failed:\n{r.stderr[-2000:]}')
  out = json.loads(r.stdout.strip().splitlines()[-1])
  return out['configs'], out['renamed']


def diff(before: dict, after: dict, renamed: dict) -> dict:
  """Per config: ``changed`` {key: [before, after]}, ``added`` {key: after}, ``removed`` {key: before}; a key of
  ``before`` that ``renamed`` maps to a new name is compared under that name."""
  out = {}
  for name in sorted(set(before) | set(after)):
    b = {renamed.get(k, k): v for k, v in before.get(name, {}).items()}
    a = after.get(name, {})
    out[name] = dict(
        only='before' if name not in after else 'after' if name not in before else None,
        changed={k: [b[k], a[k]] for k in sorted(set(a) & set(b)) if a[k] != b[k]},
        added={k: a[k] for k in sorted(set(a) - set(b))},
        removed={k: b[k] for k in sorted(set(b) - set(a))})
  return out


def report(result: dict) -> list[str]:
  """The configs whose resolved values changed (printing every difference)."""
  rerun = []
  for name, d in result.items():
    if d['only']:
      print(f'{name}: only {d["only"]}')
      rerun.append(name)
      continue
    print(f'{name}: {len(d["changed"])} changed, {len(d["added"])} added, {len(d["removed"])} removed')
    for k, (b, a) in d['changed'].items():
      print(f'    {k}: {b!r} -> {a!r}')
    for k, v in d['added'].items():
      print(f'    + {k} = {v!r}')
    for k, v in d['removed'].items():
      print(f'    - {k} (was {v!r})')
    if d['changed'] or d['removed']:
      rerun.append(name)
  print('re-run:', ', '.join(rerun) if rerun else 'none (values unchanged; added keys listed above)')
  return rerun


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--before', required=True, help='git revision or checkout folder')
  parser.add_argument('--after', default=REPO, help='git revision or checkout folder (default: this checkout)')
  parser.add_argument('--configs', default='digits*', help="glob of config names in configs/ (default 'digits*')")
  parser.add_argument('--json', default='', help='also write the differences to this file')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    before, _ = resolve(checkout(args.before, tmp), args.configs)
    after, renamed = resolve(checkout(args.after, tmp), args.configs)
  result = diff(before, after, renamed)
  rerun = report(result)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(configs=result, rerun=rerun), f, indent=1)


if __name__ == '__main__':
  main()
