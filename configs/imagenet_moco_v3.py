"""MoCo v3 with a ViT-S/16 on ImageNet-1k: the official 300-epoch recipe (Chen, Xie & He, ICCV 2021;
facebookresearch/moco-v3).

  python -m vicreg_jax.main --config=configs/imagenet_moco_v3.py --workdir=gs://BUCKET/moco_v3_vit_s16 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: facebookresearch/moco-v3@c349e6e (a source FILE:Lnn below is a file of it; CONFIG.md:L122-135 is
the ViT-Small pre-training command, on main_moco.py's defaults). The ResNet-50 recipe is
configs/imagenet_moco_v3_r50.py.

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, scale 0.08–1, bilinear (torchvision's default)            | same
                    | (main_moco.py:L117-118, L263, L275)                            |
flip                | p 0.5 (main_moco.py:L269, L282)                                | same
colour jitter       | (0.4, 0.4, 0.2, 0.1) with p 0.8, BYOL's (main_moco.py:L264-266) | same
grayscale           | p 0.2 (main_moco.py:L267, L279)                                | same
blur                | p 1.0 / 0.1 (view 1 / 2), σ ~ U[0.1, 2] px, PIL                | same; kernel ±3σ ¹
                    | (main_moco.py:L268, L280; moco/loader.py:L26-35)               |
solarize            | p 0.0 / 0.2, PIL's threshold 128 (main_moco.py:L281; moco/loader.py:L38-42) | same
colour before crop  | no: crop first (main_moco.py:L262-271)                         | same
optimiser           | AdamW (β 0.9, 0.999; ε 1e-8), weight decay on every trainable  | same (optim.name 'adamw_all')
                    | parameter (main_moco.py:L228-230; CONFIG.md:L128)              |
learning rate       | 1.5e-4 × batch/256 = 2.4e-3 (main_moco.py:L190; CONFIG.md:L128) | same
weight decay        | 0.1 (CONFIG.md:L128)                                           | same
schedule            | 40 warmup epochs from 0, then cosine to 0, per fractional epoch | same, per step
                    | (main_moco.py:L342, L420-428; CONFIG.md:L129)                  |
epochs, batch       | 300, 4096 (main_moco.py:L56, L60; CONFIG.md:L129)                | same
backbone            | ViT-S/16, 12 heads, fixed 2-D sin-cos position embedding, MoCo | same (model.num_heads 12,
                    | v3's init (vits.py:L24-69, L115-120; main_moco.py:L180-183)    | pos_embed 'sincos')
patch projection    | frozen at its random init: no gradient, no weight decay        | same (moco_v3.freeze_patch_embed)
                    | (--stop-grad-conv1: CONFIG.md:L130; vits.py:L49-51)            |
projector           | 3 layers 384-4096-4096-256: Linear (no bias)-BN-ReLU twice,    | same
                    | Linear (no bias), BN without affine (moco/builder.py:L36-52, L117-119) |
predictor           | 256-4096-256: Linear-BN-ReLU, Linear, BN without affine, no    | same
                    | biases (moco/builder.py:L121-122)                              |
momentum encoder    | backbone + projector, copied at init, m 0.99 → 1 by cosine per  | same ²
                    | iteration, updated before the keys (moco/builder.py:L32-34,     |
                    | L57-61, L89-94; main_moco.py:L99-103, L344-345, L431-434; CONFIG.md:L130) |
loss                | symmetric InfoNCE over the global batch, τ 0.2, × 2τ           | same
                    | (moco/builder.py:L63-73, L96; CONFIG.md:L130)                 |
BatchNorm           | SyncBN over every GPU, each view on its own (main_moco.py:L196; | the global batch, per view
                    | moco/builder.py:L86-94)                                        |
precision           | float16 autocast (main_moco.py:L351-353)                       | bfloat16 ³
linear top-1        | 73.2% (CONFIG.md:L197); SGD momentum 0.9, lr 3 × batch/256,    | configs/imagenet_linear.py
                    | batch 1024, 90 epochs, wd 0, cosine (CONFIG.md:L144;           | (protocol moco_v3, the ViT row)
                    | main_lincls.py:L49-63, L196, L236-238)                         |

¹ PIL's ``GaussianBlur(radius=σ)`` covers about ±3σ pixels (``blur_kernel_fraction`` 0), SwAV's too.
² The decay's cosine runs over the steps of the run; the official one over fractional epochs, the same values.
³ The accelerator's native half precision (TPU); parameters, optimiser state, the momentum encoder and the loss
  stay in float32.

Expected: 73.2% linear top-1 (CONFIG.md:L197; the paper's Table 4 gives 73.2% for ViT-S/16 at 300 epochs), with
the protocol above. Memory and step time on TPU: ``python benchmarks/tpu_compile.py
--config=configs/imagenet_moco_v3.py --topology=v5e:4x4`` (docs/performance.md).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'moco_v3'
  c.batch_size = 4096
  c.epochs = 300
  # The section's defaults are the official ones here: predictor 4096, m 0.99, the patch projection frozen; the
  # position embedding's default is the sin-cos table.
  c.model.update(arch='vit_s16', num_heads=12, projector='4096-4096-256', projector_hidden_bias=False,
                 projector_output_bn=True)
  c.moco_v3.update(predictor_output_bn=True, temperature=0.2)
  c.optim.update(name='adamw_all', base_lr=1.5e-4, weight_decay=0.1, warmup_epochs=40, end_lr_factor=0.0)
  # BYOL's views (the default ones, crop 0.08-1) as MoCo v3 takes them: bilinear, PIL's blur (±3σ).
  for view in (c.augment.view1, c.augment.view2):
    view.update(crop_method='bilinear', blur_kernel_fraction=0.0)
  return c
