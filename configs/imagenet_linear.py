"""Linear evaluation of an ImageNet pretraining run with its method's official protocol, as a separate job.

  python -m vicreg_jax.main --config=configs/imagenet_linear.py --workdir=gs://bucket/vicreg_r50_linear \
      --config.pretrain_workdir=gs://bucket/vicreg_r50 --config.data.data_dir=gs://bucket/tensorflow_datasets
  python -m vicreg_jax.main --config=configs/imagenet_linear.py:simclr ...   # a named method's protocol

The protocol is the pretraining run's method's (``protocol='auto'``, read from its config.json), or the one
named after the colon; any ``--config.classifier.*``, ``--config.batch_size``, ``--config.epochs`` given wins. The
job prints the protocol it resolved and writes it to its config.json. The tables, with their sources, are in
vicreg_jax/evaluate/protocols.py; in short (frozen backbone in float32, BatchNorm in inference mode):

  vicreg        SGD lr 0.02, wd 1e-6, batch 256, 100 epochs, cosine, bilinear, best epoch    paper 73.2%
  barlow_twins  as VICReg's, head lr 0.3                                                     paper 73.2%
  byol          Nesterov lr 0.2×B/256, B 4096, 80 epochs, no wd, bicubic 224/256, last      paper 74.3% (lr sweep)
  simclr        Nesterov lr 0.1×B/256, B 4096, 90 epochs, wd 1e-6, zero head, bicubic 87.5%, last   v1 69.3%
  simsiam       LARC lr 0.1×B/256, B 4096, 90 epochs, wd 0, best                             68.1% (100 epochs)
  swav          SGD lr 0.3, wd 1e-6, batch 256, 100 epochs, cosine, best                     75.3% (multi-crop)
  wmse          Adam 1e-2 → 1e-6 exponential, wd 5e-6, batch 1000, 500 epochs, cached features   (ImageNet-100 only)

Cadence (``checkpoints='latest'``): one evaluation (a head trained for tens of epochs on frozen ResNet-50 features)
takes far longer than the pretraining run takes between checkpoints (2500 steps), so each time the job is free it
evaluates the newest checkpoint, polling every ``poll_seconds`` (60) for one newer than every step it has
evaluated: never an older one, and always the final one. ``--config.checkpoints=all`` instead evaluates every
checkpoint still on disk, oldest first: after the run, the ones configs/imagenet.py keeps
(``keep_checkpoints_every``: every 20 epochs).
"""

from vicreg_jax.config import eval_job_config


def get_config(method='auto'):
  c = eval_job_config()
  c.checkpoints = 'latest'  # see the docstring's cadence
  if method != 'auto':  # 'auto' is the default: the pretraining run's method
    c.protocol = method
  return c
