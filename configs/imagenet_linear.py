"""Linear evaluation of an ImageNet pretraining run (official VICReg protocol), as a separate job.

  python -m vicreg_jax.main --config=configs/imagenet_linear.py --workdir=gs://bucket/vicreg_r50_linear \
      --config.pretrain_workdir=gs://bucket/vicreg_r50 --config.data.data_dir=gs://bucket/tensorflow_datasets

Frozen ResNet-50 (BatchNorm in inference mode), linear head N(0, 0.01), SGD momentum 0.9, lr 0.02, weight decay
1e-6, batch 256, 100 epochs, cosine; train random-resized-crop 224 + flip, validation resize 256 + centre crop.
Evaluates every checkpoint as it lands (``--config.checkpoints=latest`` skips to the newest).
Expected on the paper's 1000-epoch checkpoint: 73.2% top-1, 91.1% top-5 (paper, Table 1).
"""

from vicreg_jax.config import eval_job_config


def get_config():
  c = eval_job_config()
  return c
