"""VICReg with a ViT-S/16 on ImageNet-1k: our recipe, untested at scale.

  python -m vicreg_jax.main --config=configs/imagenet_vit.py --workdir=gs://BUCKET/vicreg_vit_s16 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Neither the VICReg paper nor its official code (facebookresearch/vicreg, ResNets only) trains a ViT, so there is no
official recipe to follow. This one keeps VICReg's loss, projector, views and batch, and takes the optimiser of
the published recipe that trains a ViT-S/16 without labels stably, MoCo v3's (Chen, Xie & He, ICCV 2021;
facebookresearch/moco-v3@c349e6e: CONFIG.md:L100-135, the 4-node ViT-Small command, on main_moco.py's defaults;
the source of the "MoCo v3" column):

hyperparameter      | VICReg (ResNet-50, configs/imagenet.py) | MoCo v3 ViT-S/16 (CONFIG.md)     | ours
------------------- | --------------------------------------- | -------------------------------- | -----------------------
backbone            | ResNet-50                               | ViT-S/16, 12 heads, sin-cos      | ViT-S/16, 12 heads,
                    |                                         | position embedding, frozen patch | sin-cos embedding; the
                    |                                         | projection (vits.py)             | patch projection trained ¹
loss                | VICReg 25 / 25 / 1                      | InfoNCE, τ 0.2                   | VICReg 25 / 25 / 1
projector           | 8192-8192-8192                          | 3 layers of 4096, 256 out        | 8192-8192-8192
views               | VICReg's (crop 0.08–1, solarize 0.1)    | BYOL's                           | VICReg's
batch               | 2048                                    | 4096                             | 2048
optimiser           | LARS, lr 0.2 × B/256, wd 1e-6           | AdamW, lr 1.5e-4 × B/256, wd 0.1 | AdamW, lr 1.5e-4 × B/256
                    |                                         | (main_moco.py:L60, L190, L229)   | (1.2e-3), wd 0.1 ²
weight decay on     | weights (ndim > 1)                      | every trainable parameter        | weights, not biases, norms
                    |                                         |                                  | or the class token ²
schedule            | 10 warmup, cosine                       | 40 warmup, cosine to 0, per      | 40 warmup, cosine to 0,
                    |                                         | fractional epoch (L342, L421-425)| per step
epochs              | 1000                                    | 300                              | 300
precision           | bfloat16                                | float16 autocast                 | bfloat16
linear top-1        | 73.2%                                   | 73.2% (300 epochs)               | not measured

¹ MoCo v3 freezes its random patch projection for stability (``--stop-grad-conv1``); here it trains, as in timm
  and DINO; the MoCo v3 method adds the frozen variant.
² AdamW (vicreg_jax/optim.py ``adamw``) leaves biases, norm parameters, the class token and a learned position
  embedding undecayed, timm's and DINO's convention (MoCo v3 decays them all).

Memory and step time on TPU: ``python benchmarks/tpu_compile.py --config=configs/imagenet_vit.py
--topology=v5e:4x4`` (docs/performance.md).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.epochs = 300
  c.model.update(arch='vit_s16', num_heads=12)  # MoCo v3's heads; the sin-cos embedding is the default
  c.optim.update(name='adamw', base_lr=1.5e-4, weight_decay=0.1, warmup_epochs=40, end_lr_factor=0.0)
  return c
