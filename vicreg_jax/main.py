"""Command line: ``python -m vicreg_jax.main --config=configs/digits.py --workdir=runs/digits``.

``--config`` defaults to configs/digits.py; ``--config.key=value`` overrides any key. Errors a user can cause
(missing dataset, bad config value, batch size that does not split over devices) end in one line on stderr
and exit status 1.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'digits.py')

_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Training configuration file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Where checkpoints, logs and summary.json go '
                               '(local path or gs://).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # TF is only the input pipeline: keep it off accelerators so it does not take their memory.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')

  from vicreg_jax import parallel, train
  from vicreg_jax.data.sources import DataNotFoundError

  parallel.maybe_initialize_distributed()
  config = _CONFIG.value
  jobs = {'pretrain': train.train_and_evaluate}
  try:
    if config.job not in jobs:
      raise ValueError(f'Unknown job {config.job!r}; choose one of {sorted(jobs)}.')
    jobs[config.job](config, _WORKDIR.value)
  except (DataNotFoundError, ValueError, FloatingPointError) as e:
    logging.flush()
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def run():
  logging.set_verbosity(logging.INFO)
  app.run(main)


if __name__ == '__main__':
  run()
