"""W-MSE on ImageNet-1k (Ermolov et al., ICML 2021; htdt/self-supervised).

  python -m vicreg_jax.main --config=configs/imagenet_wmse.py --workdir=gs://BUCKET/wmse_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50 (bfloat16). Head 1024-128 and whitening sub-batches of 256 at global batch 512, AdamW (official:
Adam with L2 1e-6) at 2e-3, 240 epochs: the authors' ImageNet-100 recipe, the closest published to
ImageNet-1k. Evaluate with configs/imagenet_linear.py.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'wmse'
  c.batch_size = 512
  c.epochs = 240
  # The authors' ImageNet-100 recipe (no ImageNet-1k one was published): head 1024-128, sub-batches of 256,
  # Adam lr 2e-3 at batch 512 (base_lr × batch/256), weight decay 1e-6.
  c.wmse.update(projector='1024-128', w_size=256)
  c.optim.update(name='adamw', base_lr=1e-3, end_lr_factor=0.0)
  return c
