"""BYOL on ImageNet-1k (Grill et al., NeurIPS 2020; deepmind-research/byol).

  python -m vicreg_jax.main --config=configs/imagenet_byol.py --workdir=gs://BUCKET/byol_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50 (bfloat16). Projector and predictor 4096-256, EMA target with τ from 0.996 to 1 by cosine, global
batch 4096, LARS at 0.2 × batch/256 with weight decay 1.5e-6 (biases and BatchNorm excluded from both), 10
warmup epochs then cosine to 0, 1000 epochs; the views are the same as VICReg's (which took them from BYOL).
Evaluate with configs/imagenet_linear.py.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'byol'
  c.batch_size = 4096
  c.model.projector = '4096-256'
  c.optim.update(weight_decay=1.5e-6, end_lr_factor=0.0)
  return c
