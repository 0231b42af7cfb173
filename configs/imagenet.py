"""VICReg on ImageNet-1k: the paper's recipe (Bardes, Ponce & LeCun, ICLR 2022; official code's defaults).

  python -m vicreg_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/vicreg_r50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50, projector 8192-8192-8192, global batch 2048, LARS (base_lr 0.2 → peak 1.6, wd 1e-6, eta 0.001,
momentum 0.9; biases and BatchNorm excluded), 10 warmup epochs then cosine to 0.001·peak, 1000 epochs,
loss coefficients 25/25/1, the official two-view augmentations (vicreg_jax.config.imagenet_views).
Expected: 73.2% top-1 with the linear-evaluation job (paper, Table 1); 54.8% / 69.5% with 1% / 10% labels.
ImageNet must be prepared for TFDS beforehand (manual download): see docs/methods.md. Or train on a folder of images,
one subfolder per class (``ROOT/CLASS/*.jpg``, or ``ROOT/train/CLASS/...`` and ``ROOT/val/CLASS/...``):

  python -m vicreg_jax.main --config=configs/imagenet.py --workdir=runs/mine \
      --config.data.source=folder --config.data.data_dir=ROOT [--config.data.val_fraction=0.05]

Input pipeline: each view decodes only its random crop window of the JPEG (fused decode-and-crop); tf.data maps
run in parallel with autotune; ``data.threadpool_size`` sets a private thread pool (0: TF's shared one) and
``data.shuffle_buffer`` the TFDS shuffle buffer (encoded images, about 110 kB each).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  return imagenet_config()  # the defaults are the paper's recipe, here in bfloat16
