"""SimSiam on the digits demo: configs/digits.py (backbone, optimiser, views, budget, probe) with SimSiam.

  python -m vicreg_jax.main --config=configs/digits_simsiam.py --workdir=runs/digits_simsiam

Projector 512-512-512 with the official BatchNorm on its output, predictor 128-512, the predictor at its peak
learning rate (official --fix-pred-lr).
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.method = 'simsiam'
  c.model.projector_output_bn = True  # official: BN (no affine) on the output
  c.simsiam.predictor = '128'  # bottleneck 1/4, as 512 of 2048
  return c
