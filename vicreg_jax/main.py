"""Command line: ``python -m vicreg_jax.main --config=configs/digits.py --workdir=runs/digits``.

``--config`` defaults to configs/digits.py; ``--config.key=value`` overrides any key. Exit statuses, which a
supervisor (launch/supervise.sh) acts on:

- 0: the job finished, or SIGTERM (preemption, maintenance) stopped pretraining or the evaluation job's head
  training with a checkpoint (``summary.json`` in the workdir tells a finished pretraining run apart).
- 2: a user's mistake (unknown config key, missing config file or dataset, a batch size that does not split
  over devices, a bad command line: :class:`vicreg_jax.errors.UserError`), as one line on stderr; running the
  same command again gives the same error.
- 1: anything else: a bug (with its traceback), a multi-process run that could not start or lost a process,
  a checkpoint that storage would not give back within ``restore_retry_seconds`` (one line); running the same
  command again may succeed.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported anywhere

import importlib  # noqa: E402
import logging as pylogging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'digits.py')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Where checkpoints, logs and summary.json go '
                               '(local path or gs://).')
# Multi-process runs. Cloud TPU VM slices, GKE and SLURM (under srun) are detected; elsewhere give all three.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for clusters JAX '
                                   'cannot detect (with --num_processes and --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1 (with '
                                   '--coordinator_address).')
_INIT_TIMEOUT = flags.DEFINE_integer('distributed_init_timeout', 300, 'Seconds to wait at start for the '
                                     'coordinator and every process before giving up with one line.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer('distributed_heartbeat_timeout', 100, 'Seconds after which a '
                                          'process that stopped responding ends the run on every process.')


# The jobs ``config.job`` names: module and function ``(config, workdir) -> result``, imported when chosen.
JOBS = {
    'pretrain': ('vicreg_jax.train', 'train_and_evaluate'),
    'linear': ('vicreg_jax.evaluate.linear', 'run'),
    'finetune': ('vicreg_jax.evaluate.finetune', 'run'),
}


def fail(msg: str, status: int = 2):
  """Ends the program with one line on stderr and ``status`` (2: a user's mistake; 1: a failure that may not
  recur); one process of several ends at once, so the others stop too."""
  logging.flush()
  print(f'error: {msg}', file=sys.stderr, flush=True)
  if 'jax' in sys.modules and sys.modules['jax'].distributed.is_initialized():
    from vicreg_jax import distributed
    distributed.exit_at_once(status)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
  try:
    config = flags.FLAGS['config'].value
    config.job  # pylint: disable=pointless-statement  (a config file that failed to load raises here)
  except OSError as e:
    fail(str(e).splitlines()[0] + ': ' + ' '.join(str(e).split()[-6:]), 2)

  import tensorflow as tf  # the input pipeline only: keep it off accelerators
  tf.config.set_visible_devices([], 'GPU')
  import jax
  from vicreg_jax import config as config_checks
  from vicreg_jax import distributed, errors

  try:  # every value checked before waiting for peers or doing any work
    config_checks.validate(config)
  except errors.UserError as e:
    fail(str(e))
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _INIT_TIMEOUT.value,
                           _HEARTBEAT_TIMEOUT.value)
  except distributed.DistributedStartError as e:
    fail(str(e), 1)
  module, function = JOBS[config.job]  # validate() checked the name
  try:
    getattr(importlib.import_module(module), function)(config, _WORKDIR.value)
  except errors.UserError as e:  # a user's mistake: one line; anything else is a bug and keeps its traceback
    fail(str(e), e.status)
  except Exception as e:
    if (reason := distributed.lost_peer(e)) is not None:  # a collective lost its peer (CPU collectives raise)
      fail(reason, 1)
    if jax.process_count() > 1:  # a bug or I/O error on this process: the others wait in a collective for it
      traceback.print_exc()
      fail(f'{type(e).__name__} on process {jax.process_index()}: {e}', 1)
    raise


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of orbax and of JAX's backend probing; warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(s in record.pathname for s in ('orbax', 'xla_bridge'))


def import_tensorflow_quietly():
  """Imports TensorFlow with stderr closed: its C++ start-up banner ignores TF_CPP_MIN_LOG_LEVEL and would
  bury the one line a user needs. Python errors from the import still surface. (Also the weight converter's.)"""
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as null:
      os.dup2(null.fileno(), 2)
      import tensorflow  # noqa: F401
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _config_error(e: Exception):
  if isinstance(e, (AttributeError, KeyError)):
    key = str(e).strip(chr(34) + chr(39))
    fail(f'unknown config key {key}: see the config file or vicreg_jax/config.py for the keys', 2)
  fail(f'bad config override: {e}')


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _config_error(e)
  except flags.Error as e:
    if str(e).startswith('flag --config.'):  # a config value of the wrong type: a config mistake, as in config.py
      fail(f'bad config value: {e}')
    fail(f'bad command line: {e}', 2)


def _renamed_keys(argv) -> None:
  """An old key name on the command line (``--config.eval.final_probe=...``) ends in one line naming the new one."""
  from vicreg_jax import config as schema
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if (message := schema.renamed_message(key)) is not None:
        fail(message, 2)


def run():
  _renamed_keys(sys.argv)
  import_tensorflow_quietly()
  # ml_collections reads --config.key=value overrides both while defining the flag (default config) and
  # while parsing (explicit --config); an unknown key must end in one line either way, not a traceback.
  try:
    config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Training configuration file.', lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _config_error(e)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
