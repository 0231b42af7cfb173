"""BYOL on ImageNet-1k: the official 1000-epoch recipe (Grill et al., NeurIPS 2020; deepmind-research/byol).

  python -m vicreg_jax.main --config=configs/imagenet_byol.py --workdir=gs://BUCKET/byol_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: google-deepmind/deepmind-research@f5de0ed (a source FILE:Lnn below is a file of its byol/).

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, area 0.08–1, log-uniform ratio 3/4–4/3, bicubic           | same ¹
                    | (utils/dataset.py:L201, L206-232)                              |
flip                | p 0.5 (utils/augmentations.py:L29, L352)                       | same
colour jitter       | (0.4, 0.4, 0.2, 0.1) with p 0.8, random order                  | same
                    | (utils/augmentations.py:L30-42)                                |
grayscale           | p 0.2 (utils/augmentations.py:L40, L61)                        | same
blur                | p 1.0 / 0.1 (view 1 / 2), σ ~ U[0.1, 2] px, kernel side/10     | same
                    | (utils/augmentations.py:L43-49, L63-64)                        |
solarize            | p 0.0 / 0.2 (utils/augmentations.py:L50, L65)                  | same
colour before crop  | no: crop at decode, colour after (utils/augmentations.py:L88-98) | same
multi-crop          | none: 2 × 224 (utils/augmentations.py:L101-103)                | same
optimiser           | LARS, momentum 0.9, trust 1e-3 (configs/byol.py:L57-61)        | same
learning rate       | 0.2 × batch/256 = 3.2 (configs/byol.py:L21, L63; utils/schedules.py:L34) | same
weight decay        | 1.5e-6; biases and BatchNorm get neither decay nor trust ratio | same
                    | (configs/byol.py:L22; byol_experiment.py:L191-195; utils/optimizers.py:L30-35) |
schedule            | 10 warmup epochs from 0, cosine to 0 (configs/byol.py:L64;     | same
                    | utils/schedules.py:L27-43)                                     |
epochs, batch       | 1000, 4096 (main_loop.py:L36-37)                               | same
target EMA          | τ 0.996 → 1 by cosine (configs/byol.py:L23, L38; utils/schedules.py:L20-24) | same
backbone            | ResNet-50 v1, last BN of each block zero-initialised           | same
                    | (configs/byol.py:L43-46; google-deepmind/dm-haiku@f4d858a:     |
                    | haiku/_src/nets/resnet.py:L104)                                |
projector           | 4096-256: Linear (bias)-BN-ReLU, Linear without bias           | same
                    | (configs/byol.py:L40-41; utils/networks.py:L41-44)             |
predictor           | 4096-256, the same MLP (configs/byol.py:L42; byol_experiment.py:L158-162) | same
BatchNorm           | cross-replica (global batch), each view on its own             | same
                    | (configs/byol.py:L47-53; byol_experiment.py:L183-184)          |
precision           | float32 (none: no mixed precision in byol/)                    | bfloat16 ²
linear top-1        | 74.3% (paper, Table 1; the code: 74.0–74.5%, README.md:L6-7);  | configs/imagenet_linear.py
                    | SGD Nesterov 0.9, lr 0.2 × batch/256, 80 epochs, no warmup     |
                    | (configs/eval.py:L29, L38-45)                                  |

¹ The official crop clips an oversized window to the image; ours samples as torchvision (up to 10 tries, then a
  centre crop): the same distribution for windows that fit, which at scale ≤ 1 and ratio 3/4–4/3 is nearly all.
² The accelerator's native half precision (TPU); parameters, optimiser state and the loss stay in float32.

Expected: 74.3% linear top-1 (paper, Table 1), with the protocol above (the paper chose its head's learning rate
among 5 on a 10,000-image validation split).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'byol'
  c.batch_size = 4096
  c.model.projector = '4096-256'
  c.optim.update(weight_decay=1.5e-6, end_lr_factor=0.0)
  return c
