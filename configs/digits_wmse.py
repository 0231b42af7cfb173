"""W-MSE on the digits demo: configs/digits.py (backbone, optimiser, views, budget, probe) with W-MSE.

  python -m vicreg_jax.main --config=configs/digits_wmse.py --workdir=runs/digits_wmse

Official head (Linear-BN-ReLU-Linear) to a 64-d embedding; whitening sub-batches of 128 (2 per batch of 256),
one draw.
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.method = 'wmse'
  # The official head, Linear-BN-ReLU-Linear, to a 64-d embedding (the whitening needs D < w_size).
  c.wmse.projector = '512-64'  # w_size 128: two whitening sub-batches of the global batch of 256
  return c
