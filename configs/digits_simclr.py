"""SimCLR on the digits demo: configs/digits.py (backbone, optimiser, views, budget, probe) with SimCLR.

  python -m vicreg_jax.main --config=configs/digits_simclr.py --workdir=runs/digits_simclr

Projector 512-512-128, temperature 0.5 (the official CIFAR-10 value), negatives from every device.
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.method = 'simclr'
  c.model.projector = '512-512-128'
  c.simclr.temperature = 0.5  # the official CIFAR-10 temperature (0.1 is for ImageNet's large batches)
  return c
