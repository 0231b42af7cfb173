"""Barlow Twins on ImageNet-1k: the official recipe (Zbontar et al., ICML 2021; facebookresearch/barlowtwins).

  python -m vicreg_jax.main --config=configs/imagenet_barlow_twins.py --workdir=gs://BUCKET/bt_r50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50, projector 8192-8192-8192 (hidden layers without bias), λ 0.0051, global batch 2048, LARS (weights: lr 0.2 × batch/256, biases
and BatchNorm: 0.0048 × batch/256, i.e. bias_lr_factor 0.024; weight decay 1e-6 on weights only; eta 0.001),
10 warmup epochs then cosine to 0.001·peak, 1000 epochs. The official code's augmentations are those of
VICReg's (view 1 always blurred, view 2 blurred 0.1 and solarized 0.2), which are this project's defaults.
Expected: 73.2% linear top-1 with configs/imagenet_linear.py (paper, Table 1); 55.0% / 69.7% with 1% / 10%
labels (Table 2).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'barlow_twins'  # c.barlow_twins holds the official λ and bias_lr_factor
  c.model.projector_hidden_bias = False  # official: Linear(bias=False)-BN-ReLU
  return c
