"""MoCo v2 on the digits demo: configs/digits.py (backbone, optimiser, views, budget, probe) with MoCo v2.

  python -m vicreg_jax.main --config=configs/digits_moco_v2.py --workdir=runs/digits_moco_v2

MoCo v2's head (Linear with bias, ReLU, Linear with bias; no BatchNorm) at 512-128 (official 2048-128); the
backbone's BatchNorm per group of 32 rows with the key view shuffled across the devices, as the official per-GPU
BatchNorm at 32 images a GPU; a queue of 1,024 keys (official 65,536: the queue must be a multiple of the global
batch of 256 and should hold fewer keys than the training set, less one batch, or it repeats examples);
temperature 0.2; momentum m 0.99 (official 0.999, which over the demo's short runs would leave the key encoder
near its initialisation).
"""

from vicreg_jax.config import digits_config


def get_config():
  c = digits_config()
  c.method = 'moco_v2'
  c.model.update(projector='512-128', projector_bn=False, projector_hidden_bias=True, projector_output_bias=True,
                 ghost_batch_size=32)
  c.moco_v2.update(momentum=0.99, queue_length=1024)  # temperature 0.2 and the shuffle: the section's defaults
  return c
