"""SwAV on ImageNet-1k (Caron et al., NeurIPS 2020; facebookresearch/swav).

  python -m vicreg_jax.main --config=configs/imagenet_swav.py --workdir=gs://BUCKET/swav_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50 (bfloat16). Projector 2048-128, 3000 prototypes, temperature 0.1, Sinkhorn ε 0.05 with 3 iterations,
prototypes frozen for the first 313 steps, global batch 4096 without a queue, LARS at 0.3 × batch/256 (4.8 at
4096, the official base lr) to 0.001 of it, weight decay 1e-6, 800 epochs. Two 224-px views only: the official
multi-crop (2×224 + 6×96, 75.3%) is not implemented. Evaluate with configs/imagenet_linear.py.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'swav'
  c.batch_size = 4096
  c.epochs = 800
  c.model.projector = '2048-128'
  c.optim.base_lr = 0.3
  return c
