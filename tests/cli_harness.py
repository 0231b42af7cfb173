"""Runs several command lines of ``python -m vicreg_jax.main`` cheaply: this process imports TensorFlow, TFDS and
the package once (no JAX backend yet), then forks one child per case, which parses its own argv and runs the
command as a fresh process would (its own flags, devices, exit status). Used by tests/test_errors.py.

  python tests/cli_harness.py CASES.json RESULTS.json

CASES.json: a list of ``{"name", "argv", "bug": false}``; ``bug`` makes the pretraining job raise a plain
ValueError, as a programming error would. RESULTS.json: ``{name: {"code", "stdout", "stderr"}}``.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _child(case: dict, out: str, err: str) -> None:
  """Becomes the case's command line (tests/job_server.py's child), its pretraining job a buggy one if asked."""
  import job_server
  from vicreg_jax import train
  if case.get('bug'):
    def buggy(config, workdir):
      raise ValueError('a programming error')
    train.train_and_evaluate = buggy
  job_server._child({'argv': case['argv'], 'env': dict(os.environ), 'cwd': os.getcwd(), 'stdout': out,
                     'stderr': err})


def main(cases_path: str, results_path: str) -> None:
  import tensorflow  # noqa: F401  (the expensive imports, once)
  import tensorflow_datasets  # noqa: F401
  import ml_collections  # noqa: F401
  import vicreg_jax.main  # noqa: F401
  import vicreg_jax.methods  # noqa: F401  (jax, flax, optax: what the config's schema loads; no backend yet)
  import vicreg_jax.train  # noqa: F401  (orbax, clu: what every child imports first)
  cases = json.loads(open(cases_path).read())
  results = {}
  logs = tempfile.mkdtemp(prefix='cli_harness_')
  for case in cases:
    out, err = (os.path.join(logs, f'{case["name"]}.{k}') for k in ('out', 'err'))
    pid = os.fork()
    if pid == 0:
      _child(case, out, err)
    _, status = os.waitpid(pid, 0)
    results[case['name']] = {'code': os.waitstatus_to_exitcode(status), 'stdout': open(out).read(),
                             'stderr': open(err).read()}
  with open(results_path, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
