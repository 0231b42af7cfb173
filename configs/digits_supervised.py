"""Supervised reference for the digits runs: the pretraining run's backbone trained from scratch with every
training label (cross-entropy, SGD), then tested — the ceiling a self-supervised probe on this backbone is
measured against.

  python -m vicreg_jax.main --config=configs/digits_supervised.py --workdir=runs/digits_supervised \
      --config.pretrain_workdir=runs/digits

Only the run's config.json is read (its architecture); no checkpoint. ±2-pixel shifts (at 16×16) as the only
augmentation, SGD lr 0.1, weight decay 5e-4, 200 epochs, SyncBN. With --config.job=linear instead, the same
fresh backbone stays frozen under a linear head: the random-encoder baseline.

Measured on the digits run's ConvNet (docs/results.md, seeds 0–2): top-1 0.988 ± 0.002, 174–220 s each on 2 CPU cores.
"""

from vicreg_jax.config import eval_job_config


def get_config():
  c = eval_job_config()
  c.protocol = 'none'  # the digits protocol below, whatever the pretraining method
  c.job = 'finetune'
  c.from_scratch = True
  c.poll_seconds = 2.0
  c.timeout_seconds = 1800.0
  c.epochs = 200
  c.checkpoint_every_steps = 500
  c.classifier.update(backbone_lr=0.1, head_lr=0.1, weight_decay=5e-4, batchnorm='sync', report='last')
  c.data.update(source='digits', name='digits', test_split='test', channels=1)
  c.transforms.train = dict(translate=2)
  c.transforms.eval.update(resize=0, crop=0, mean=None, std=None)  # in-memory images: used as they are
  return c
