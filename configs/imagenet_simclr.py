"""SimCLR on ImageNet-1k (Chen et al., ICML 2020; google-research/simclr).

  python -m vicreg_jax.main --config=configs/imagenet_simclr.py --workdir=gs://BUCKET/simclr_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50 (bfloat16). Projector 2048-2048-128, temperature 0.1, global batch 4096, LARS at 0.3 × batch/256
with weight decay 1e-6 (biases and BatchNorm excluded), 10 warmup epochs then cosine to 0, 1000 epochs. The
views are VICReg's (SimCLR's own blur both views at 0.5 and never solarize). Evaluate with
configs/imagenet_linear.py.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'simclr'
  c.batch_size = 4096
  c.model.projector = '2048-2048-128'
  c.optim.update(base_lr=0.3, end_lr_factor=0.0)
  return c
