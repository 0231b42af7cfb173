"""SwAV on ImageNet-1k (Caron et al., NeurIPS 2020; facebookresearch/swav).

  python -m vicreg_jax.main --config=configs/imagenet_swav.py --workdir=gs://BUCKET/swav_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ResNet-50 (bfloat16). Projector 2048-128, 3000 prototypes, temperature 0.1, Sinkhorn ε 0.05 with 3 iterations,
prototypes frozen for the first 313 steps, global batch 4096 without a queue, LARS at 0.3 × batch/256 (4.8 at
4096, the official base lr) to 0.001 of it, weight decay 1e-6, 800 epochs. Two 224-px views only: the official
multi-crop (2×224 + 6×96, 75.3%) is not implemented. Evaluate with configs/imagenet_linear.py.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'swav'
  c.batch_size = 4096
  c.epochs = 800
  c.model.projector = '2048-128'
  c.optim.base_lr = 0.3
  # Multi-crop (facebookresearch/swav@06b1b7c:scripts/swav_800ep_pretrain.sh:L28-L31): 2×224 at scale 0.14-1
  # plus 6×96 at 0.05-0.14 (augment.small_view's default size and scale), the backbone once per resolution and
  # the heads over all crops (main_swav.py's model(inputs), src/resnet50.py:L308-L323).
  c.augment.small_crops = 6
  c.model.views_together = True
  for view in (c.augment.view1, c.augment.view2):
    view.crop_scale = (0.14, 1.0)
  # Every crop takes the same colour recipe (src/multicropdataset.py:L37-L52): the small view copies the large
  # views' colour keys where they differ from its default. Keep this line after the views' colour lines.
  c.augment.small_view.update({k: v for k, v in c.augment.view1.items()
                               if k not in ('crop_size', 'crop_scale') and v != c.augment.small_view[k]})
  # Memory on a v5e-16 (16 GiB per chip) at batch 4096, 256 images per chip: 2·224² + 6·96² = 155,648 pixels
  # per image against VICReg's 100,352 at 128 per chip (batch 2048), 3.1× VICReg's activations; VICReg's step
  # peaks at 10.6 GiB, about 7.3 of them activations (3.3: parameters, gradients and LARS state with its 8192³
  # projector). XLA's memory analysis of the step (ResNet-50, bf16, on CPU, at 4 and 8 images per device) gives
  # per image 0.28 GiB for 2×224, 0.43 for 2×224 + 6×96 and 0.17 for that with remat: 2 × 1.57 × 0.40 × 7.3
  # ≈ 9 GiB of activations with remat (SwAV's state: 0.2 GiB), about 23 without. Remat (each
  # residual block's output kept, the rest recomputed: about a third more compute) keeps the batch's BatchNorm
  # statistics; grad_accum_steps=2 on top would halve the activations again if a chip still runs out.
  c.model.remat = True
  return c
