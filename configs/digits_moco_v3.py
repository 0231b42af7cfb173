"""MoCo v3 on the digits demo: configs/digits.py (backbone, optimiser, views, budget, probe) with MoCo v3.

  python -m vicreg_jax.main --config=configs/digits_moco_v3.py --workdir=runs/digits_moco_v3

Projector 512-128 with MoCo's heads (no biases before BatchNorm, an affine-free BatchNorm on the output),
predictor 512-128 (official 4096-256), momentum encoder with m from 0.99 to 1 by cosine (the official ViT and
100-epoch ResNet-50 presets' m), temperature 0.2 (the ViT recipe's; the ResNet-50 recipe's 1.0 suits its batch of
4096 and 256-d embeddings, less so a 256 batch of digits).
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.method = 'moco_v3'
  c.model.update(projector='512-128', projector_output_bn=True)  # digits: no hidden biases already
  c.moco_v3.update(predictor='512', temperature=0.2)  # m: the section's default, 0.99
  return c
