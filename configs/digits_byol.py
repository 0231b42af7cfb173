"""BYOL on the digits demo: configs/digits.py (backbone, optimiser, views, budget, probe) with BYOL.

  python -m vicreg_jax.main --config=configs/digits_byol.py --workdir=runs/digits_byol

Projector and predictor 512-128 (official 4096-256), EMA target with τ from 0.99 to 1 by cosine.
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.method = 'byol'
  c.model.projector = '512-128'
  c.byol.update(predictor='512', tau_base=0.99)  # the official 100-epoch preset's τ (0.996 is for 1000 epochs)
  return c
