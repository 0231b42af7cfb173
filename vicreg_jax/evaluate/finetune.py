"""The semi-supervised job: fine-tunes the whole pretrained network on a labelled subset (1% / 10% of ImageNet
through ``imagenet2012_subset``, or k labels per class of an in-memory dataset).

  python -m vicreg_jax.main --config=configs/imagenet_semi.py:1 --workdir=SEMI --config.pretrain_workdir=PRE

The hyperparameters are the pretraining method's semi-supervised protocol (:mod:`vicreg_jax.evaluate.protocols`,
``classifier.labels_percent`` picking its 1% or 10% row), the backbone in float32. BatchNorm runs in train mode
as each method's official code ran it (``classifier.batchnorm``):

- VICReg and Barlow Twins: ``'ghost'``, each group of 32 consecutive rows of the global batch normalised by its
  own statistics, whatever the device count. Their evaluate.py fine-tunes under DistributedDataParallel without
  SyncBatchNorm on one node of 8 GPUs, batch 256: 32 images per GPU (facebookresearch/vicreg@4e12602:
  evaluate.py:L141-168, L222-229; facebookresearch/barlowtwins@8e8d284:evaluate.py:L81-104, L146-148). The running
  statistics are the first group's (DDP broadcasts rank 0's buffers). ``classifier.ghost_batch_size`` changes
  the group; groups may span devices (each device then runs its group's rows and keeps its own).
- SwAV: ``'sync'``, statistics of the whole batch (``nn.SyncBatchNorm.convert_sync_batchnorm``,
  facebookresearch/swav@06b1b7c:eval_semisup.py:L140); SimCLR too (``global_bn``, google-research/simclr@be133b3:
  run.py:L205-207), and BYOL as we chose it.
- ``'per_device'``: each device's rows (the old default; the result then depends on the device count).

Waits for the pretraining run's final checkpoint (``checkpoints='final'``; 'latest' or 'all' also work), and
writes ``SEMI/results.json`` like the linear job, resumable the same way.
"""

from __future__ import annotations

import ml_collections

from vicreg_jax.evaluate import linear


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return linear.run(config, workdir, finetune=True)
