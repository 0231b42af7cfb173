"""Linear evaluation of the digits pretraining run: the same job as configs/imagenet_linear.py, in seconds.

  python -m vicreg_jax.main --config=configs/digits.py --workdir=runs/digits &
  python -m vicreg_jax.main --config=configs/digits_linear.py --workdir=runs/digits_linear \
      --config.pretrain_workdir=runs/digits

It may start before or alongside the pretraining run: it waits, then evaluates every checkpoint as it lands.
Features of the un-augmented images (at the run's 16×16) are extracted once per checkpoint and standardised (no
augmentation on a linear probe of 1,257 images); the head is trained with SGD on them; the last epoch is reported
(digits has no validation split to choose an epoch on).

Measured on the default digits run, seed 0 (600 steps): checkpoints 200 / 400 / 600 → top-1 0.981 / 0.987 /
0.987, 12 s for all three on 2 CPU cores; the run's own scikit-learn probe says 0.987 at step 600.
"""

from vicreg_jax.config import eval_job_config


def get_config():
  c = eval_job_config()
  c.protocol = 'none'  # the digits protocol below, whatever the pretraining method
  c.poll_seconds = 2.0
  c.timeout_seconds = 1800.0
  c.epochs = 500  # ~2,500 steps on cached features, ~5 s: converged, so it matches the in-run probe
  c.checkpoint_every_steps = 500
  c.features.update(cache=True, standardize=True)
  c.classifier.update(head_lr=0.1, weight_decay=1e-3, report='last')  # no validation split to pick an epoch on
  c.data.update(source='digits', name='digits', test_split='test', channels=1)
  c.transforms.train = {}  # cached features of the un-augmented images
  c.transforms.eval.update(resize=0, crop=0, mean=None, std=None)  # in-memory images: used as they are
  return c
