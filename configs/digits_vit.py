"""VICReg on the digits demo with a tiny Vision Transformer: configs/digits.py (projector, optimiser, views,
budget, probe) with ``vit_micro4`` instead of the ConvNet.

  python -m vicreg_jax.main --config=configs/digits_vit.py --workdir=runs/digits_vit

The backbone: 4×4 patches of the 16×16 image (a 4×4 grid and the class token: 17 tokens), width 64, 4 pre-norm
blocks of 4 heads, MLP 256, MoCo v3's fixed 2-D sin-cos position embedding (vicreg_jax/models/vit.py); the
representation is the class token after the final LayerNorm (64-d). AdamW as the ConvNet's (lr 2e-3 × batch/256,
weight decay 1e-4 on the weights but not on the biases, norms or class token). Measured: docs/results.md.
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.model.update(arch='vit_micro4', pos_embed_size=16)  # the sin-cos embedding (the default) needs no size
  return c
