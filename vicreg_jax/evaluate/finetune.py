"""The semi-supervised job: fine-tunes the whole pretrained network on a labelled subset (1% / 10% of ImageNet
through ``imagenet2012_subset``, or k labels per class of an in-memory dataset).

  python -m vicreg_jax.main --config=configs/imagenet_semi.py:1 --workdir=SEMI --config.pretrain_workdir=PRE

Official protocol (VICReg evaluate.py ``--weights finetune``): backbone and head trained with their own
learning rates (1%: 0.03 / 0.08; 10%: 0.01 / 0.1), no weight decay, 20 epochs, batch 256, BatchNorm in train
mode (synchronised over devices here). Waits for the pretraining run's final checkpoint (``checkpoints='final'``;
'latest' or 'all' also work), and writes ``SEMI/results.json`` like the linear job, resumable the same way.
"""

from __future__ import annotations

import ml_collections

from vicreg_jax.evaluate import linear


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return linear.run(config, workdir, finetune=True)
