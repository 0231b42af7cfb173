"""SwAV on the digits demo: configs/digits.py (backbone, optimiser, views, budget, probe) with SwAV.

  python -m vicreg_jax.main --config=configs/digits_swav.py --workdir=runs/digits_swav

Projector 512-128, 30 prototypes, temperature 0.1, Sinkhorn ε 0.05 with 3 iterations, prototypes frozen for
the first 50 steps, no queue.
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.method = 'swav'
  c.model.projector = '512-128'
  # 30 prototypes (3 per class; the official 3000 are for ImageNet), prototypes frozen for the first 50 steps.
  c.swav.update(num_prototypes=30, freeze_prototypes_steps=50)
  return c
