"""MoCo v3 with a ResNet-50 on ImageNet-1k: the official 1000-epoch recipe (Chen, Xie & He, ICCV 2021;
facebookresearch/moco-v3).

  python -m vicreg_jax.main --config=configs/imagenet_moco_v3_r50.py --workdir=gs://BUCKET/moco_v3_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: facebookresearch/moco-v3@c349e6e (a source FILE:Lnn below is a file of it; CONFIG.md:L38-51 is
the 1000-epoch ResNet-50 command, on main_moco.py's defaults). The ViT recipe is configs/imagenet_moco_v3.py.

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, scale 0.2–1, bilinear (torchvision's default)             | same
                    | (CONFIG.md:L45; main_moco.py:L263, L275)                       |
flip                | p 0.5 (main_moco.py:L269, L282)                                | same
colour jitter       | (0.4, 0.4, 0.2, 0.1) with p 0.8, BYOL's (main_moco.py:L264-266) | same
grayscale           | p 0.2 (main_moco.py:L267, L279)                                | same
blur                | p 1.0 / 0.1 (view 1 / 2), σ ~ U[0.1, 2] px, PIL                | same; kernel ±3σ ¹
                    | (main_moco.py:L268, L280; moco/loader.py:L26-35)               |
solarize            | p 0.0 / 0.2, PIL's threshold 128 (main_moco.py:L281; moco/loader.py:L38-42) | same
colour before crop  | no: crop first (main_moco.py:L262-271)                         | same
optimiser           | LARS, momentum 0.9, trust 0.001; biases and BatchNorm (ndim ≤ 1) | same (optim.name 'lars')
                    | get neither decay nor trust ratio (main_moco.py:L67, L224-227; |
                    | moco/optimizer.py:L10-42)                                      |
learning rate       | 0.3 × batch/256 = 4.8 (main_moco.py:L190; CONFIG.md:L44)       | same
weight decay        | 1.5e-6 (CONFIG.md:L44)                                         | same
schedule            | 10 warmup epochs from 0, then cosine to 0, per fractional epoch | same, per step
                    | (main_moco.py:L115-116, L342, L420-428)                            |
epochs, batch       | 1000, 4096 (main_moco.py:L56, L60; CONFIG.md:L44)                | same
backbone            | ResNet-50, residual BN zero-initialised (main_moco.py:L185-186)    | same
projector           | 2048-4096-256: Linear (no bias)-BN-ReLU, Linear (no bias), BN   | same
                    | without affine (moco/builder.py:L36-52, L104-106)              |
predictor           | 256-4096-256: Linear-BN-ReLU, Linear, no final BN, no biases   | same
                    | (moco/builder.py:L108-109)                                     |
momentum encoder    | backbone + projector, copied at init, m 0.996 → 1 by cosine per | same ²
                    | iteration, updated before the keys (moco/builder.py:L32-34,     |
                    | L57-61, L89-94; main_moco.py:L344-345, L431-434; CONFIG.md:L45) |
loss                | symmetric InfoNCE over the global batch, τ 1.0, × 2τ           | same
                    | (moco/builder.py:L63-73, L96; main_moco.py:L104-105)              |
BatchNorm           | SyncBN over every GPU, each view on its own (main_moco.py:L196; | the global batch, per view
                    | moco/builder.py:L86-94)                                        |
precision           | float16 autocast (main_moco.py:L351-353)                       | bfloat16 ³
linear top-1        | 74.6% (CONFIG.md:L92); SGD momentum 0.9, lr 0.1 × batch/256,   | configs/imagenet_linear.py
                    | batch 1024, 90 epochs, wd 0, cosine (main_lincls.py:L49-63,    | (protocol moco_v3)
                    | L196, L236-238, L499-502)                                      |

¹ PIL's ``GaussianBlur(radius=σ)`` covers about ±3σ pixels (``blur_kernel_fraction`` 0), SwAV's too.
² The decay's cosine runs over the steps of the run; the official one over fractional epochs, the same values.
³ The accelerator's native half precision (TPU); parameters, optimiser state, the momentum encoder and the loss
  stay in float32.

Expected: 74.6% linear top-1 (CONFIG.md:L92; the paper's Table 9 gives 74.6% at 1000 epochs), with the protocol
above.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'moco_v3'
  c.batch_size = 4096
  c.model.update(projector='4096-256', projector_hidden_bias=False, projector_output_bn=True)
  c.moco_v3.momentum = 0.996  # the section's defaults are the rest: predictor 4096 without a final BN, τ 1.0
  c.optim.update(base_lr=0.3, weight_decay=1.5e-6, end_lr_factor=0.0)
  for view in (c.augment.view1, c.augment.view2):
    view.update(crop_scale=(0.2, 1.0), crop_method='bilinear', blur_kernel_fraction=0.0)
  return c
