"""Linear evaluation of the digits pretraining run: the same job as configs/imagenet_linear.py, in seconds.

  python -m vicreg_jax.main --config=configs/digits.py --workdir=runs/digits &
  python -m vicreg_jax.main --config=configs/digits_linear.py --workdir=runs/digits_linear \
      --config.pretrain_workdir=runs/digits

It may start before or alongside the pretraining run: it waits, then evaluates every checkpoint as it lands.
Features of the un-augmented 8×8 images are extracted once per checkpoint and standardised (no augmentation on
a linear probe of 1,257 images); the head is trained with SGD on them.

Measured on the default digits run (1,200 steps): checkpoints 500 / 1000 / 1200 → top-1 0.972 / 0.970 / 0.976,
about 5 s each on 2 CPU cores; the run's own sklearn probe says 0.980 at step 1200.
"""

from vicreg_jax.defaults import eval_job_config


def get_config():
  c = eval_job_config()
  c.poll_seconds = 2.0
  c.timeout_seconds = 1800.0
  c.epochs = 500  # ~2,500 steps on cached features, ~5 s: converged, so it matches the in-run probe
  c.checkpoint_every_steps = 500
  c.features.update(cache=True, standardize=True)
  c.classifier.update(head_lr=0.1, weight_decay=1e-3, report='last')  # no validation split to pick an epoch on
  c.data.update(source='digits', name='digits', test_split='test', channels=1)
  c.transforms.train = {}  # cached features of the un-augmented images
  c.transforms.eval = dict(resize=0, crop=0, mean=None, std=None)  # in-memory images: used as they are
  return c
