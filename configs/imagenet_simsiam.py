"""SimSiam on ImageNet-1k (Chen & He, CVPR 2021; facebookresearch/simsiam).

  python -m vicreg_jax.main --config=configs/imagenet_simsiam.py --workdir=gs://BUCKET/simsiam_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50 (bfloat16). Projector 2048³ ending in BatchNorm without affine, predictor 512-2048 at its fixed peak
learning rate (--fix-pred-lr), SGD (momentum 0.9, weight decay 1e-4 on every parameter) at 0.05 × batch/256,
global batch 512, cosine without warmup, 100 epochs (paper: 68.1% linear top-1). Evaluate with
configs/imagenet_linear.py.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'simsiam'
  c.batch_size = 512
  c.epochs = 100
  # Projector: Linear(no bias)-BN-ReLU twice, Linear, BatchNorm without affine; predictor 512 then 2048.
  c.model.update(projector='2048-2048-2048', projector_hidden_bias=False, projector_output_bn=True)
  c.optim.update(name='sgd', base_lr=0.05, weight_decay=1e-4, warmup_epochs=0, end_lr_factor=0.0)
  return c
