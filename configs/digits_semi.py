"""Semi-supervised fine-tuning on digits with 5 labels per class: the digits stand-in for
configs/imagenet_semi.py (same job, same code path).

  python -m vicreg_jax.main --config=configs/digits_semi.py --workdir=runs/digits_semi \
      --config.pretrain_workdir=runs/digits

The whole network (backbone + linear head) trains on 50 labelled images (the first of the final probe's
seeded 5-per-class draws) with the pretraining augmentations, SyncBN in train mode, no weight decay.
"""

from vicreg_jax.defaults import eval_job_config


def get_config():
  c = eval_job_config()
  c.job = 'finetune'
  c.checkpoints = 'final'
  c.poll_seconds = 2.0
  c.timeout_seconds = 1800.0
  c.batch_size = 48
  c.epochs = 100
  c.log_every_steps = 50
  c.checkpoint_every_steps = 100
  c.optim.update(backbone_lr=0.03, head_lr=0.08, weight_decay=0.0)
  c.data.update(source='digits', name='digits', train_split='train', test_split='test', channels=1,
                labels_per_class=5)
  c.augment.train = dict(crop_size=8, crop_scale=(0.4, 1.0), crop_method='bilinear', translate=1, jitter_p=0.8,
                         jitter=(0.4, 0.4, 0.0, 0.0))
  c.augment.eval = dict(resize=8, crop=8, mean=None, std=None)
  return c
