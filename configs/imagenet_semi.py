"""Semi-supervised fine-tuning on 1% or 10% of ImageNet labels (official VICReg protocol).

  python -m vicreg_jax.main --config=configs/imagenet_semi.py:1 --workdir=gs://bucket/vicreg_r50_semi1 \
      --config.pretrain_workdir=gs://bucket/vicreg_r50 --config.data.data_dir=gs://bucket/tensorflow_datasets

``:1`` or ``:10`` picks TFDS ``imagenet2012_subset/1pct`` or ``/10pct`` (the SimCLR subsets). Whole network
trained, backbone/head lr 0.03/0.08 (1%) or 0.01/0.1 (10%), weight decay 0, 20 epochs, batch 256, cosine,
from the pretraining run's final checkpoint. Expected (paper, Table 2): top-1 54.8% (1%), 69.5% (10%).
"""

from vicreg_jax.config import eval_job_config

LRS = {1: (0.03, 0.08), 10: (0.01, 0.1)}


def get_config(train_percent='1'):
  percent = int(train_percent)
  if percent not in LRS:
    raise ValueError(f'train_percent must be 1 or 10, not {train_percent!r}')
  c = eval_job_config()
  c.job = 'finetune'
  c.checkpoints = 'final'
  c.epochs = 20
  c.data.name = f'imagenet2012_subset/{percent}pct'
  backbone_lr, head_lr = LRS[percent]
  c.classifier.update(backbone_lr=backbone_lr, head_lr=head_lr, weight_decay=0.0)
  return c
