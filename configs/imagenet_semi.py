"""Semi-supervised fine-tuning on 1% or 10% of ImageNet labels with the method's official protocol.

  python -m vicreg_jax.main --config=configs/imagenet_semi.py:1 --workdir=gs://bucket/vicreg_r50_semi1 \
      --config.pretrain_workdir=gs://bucket/vicreg_r50 --config.data.data_dir=gs://bucket/tensorflow_datasets
  python -m vicreg_jax.main --config=configs/imagenet_semi.py:swav,10 ...   # a named method's protocol

``:1`` or ``:10`` picks TFDS ``imagenet2012_subset/1pct`` or ``/10pct`` (the SimCLR subsets, which every
official code uses) and the protocol's 1% or 10% row; ``METHOD,`` in front names the protocol (default: the
pretraining run's method). Whole network trained from the pretraining run's final checkpoint, backbone in
float32. The rows (vicreg_jax/evaluate/protocols.py, with their sources): VICReg backbone/head lr 0.03/0.08 (1%),
0.01/0.1 (10%), wd 0, 20 epochs, batch 256, cosine, ghost BatchNorm of 32 (expected, paper Table 2: 54.8% / 69.5%);
Barlow Twins 0.005/0.5 (1%, README, cosine), 0.002/0.5 × 0.2 at epochs 12 and 16 (10%, paper appendix B.2); SwAV
0.02/5 (1%), 0.01/0.2 (10%), × 0.2 at epochs 12 and 16, SyncBatchNorm; SimCLR v1 Nesterov 0.05×B/256, B 4096, 60/30
epochs; BYOL Nesterov, B 1024, lr and epochs from its paper's sweep (0.05×B/256, 50/30 epochs chosen); SimSiam and
W-MSE (none published): VICReg's. protocols.py says what was chosen and why.
"""

from vicreg_jax.config import eval_job_config


def get_config(arg='1'):
  method, _, percent = arg.rpartition(',')
  if percent not in ('1', '10'):
    raise ValueError(f'configs/imagenet_semi.py:[METHOD,]1|10, not {arg!r}')
  c = eval_job_config()
  c.job = 'finetune'
  c.checkpoints = 'final'
  c.data.name = f'imagenet2012_subset/{percent}pct'
  c.classifier.labels_percent = int(percent)
  if method and method != 'auto':
    c.protocol = method
  return c
