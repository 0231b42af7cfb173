"""SwAV on ImageNet-1k: the official 800-epoch multi-crop recipe (Caron et al., NeurIPS 2020; facebookresearch/swav).

  python -m vicreg_jax.main --config=configs/imagenet_swav.py --workdir=gs://BUCKET/swav_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: facebookresearch/swav@06b1b7c (a source FILE:Lnn below is a file of it; "800ep" is its
scripts/swav_800ep_pretrain.sh, the 75.3% run).

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crops               | 2 × 224 at scale 0.14–1 + 6 × 96 at 0.05–0.14 (800ep:L28-31)   | same (augment.small_crops 6)
crop resize         | bilinear, torchvision's default (src/multicropdataset.py:L42-45) | same
flip                | p 0.5 (src/multicropdataset.py:L48)                            | same
colour jitter       | (0.8, 0.8, 0.8, 0.2) with p 0.8 (src/multicropdataset.py:L88-91) | same
grayscale           | p 0.2 (src/multicropdataset.py:L92)                            | same
blur                | p 0.5 on every crop, σ ~ U[0.1, 2] px at every size, PIL       | same; kernel ±3σ ¹
                    | (src/multicropdataset.py:L37, L71-85)                          |
solarize            | none (src/multicropdataset.py:L37)                             | same
colour before crop  | no: crop first (src/multicropdataset.py:L46-51)                | same
codes               | on crops 0 and 1; every crop predicts the codes of the large   | same
                    | crops other than itself (800ep:L32; main_swav.py:L289-315)     |
optimiser           | SGD momentum 0.9 in apex LARC (trust 0.001, no clipping) on    | same (optim.name 'larc')
                    | every parameter, BatchNorm, biases and prototypes included     |
                    | (main_swav.py:L171-177; NVIDIA/apex@e13873de:apex/parallel/LARC.py:L92-102) |
learning rate       | 4.8 at batch 4096, not scaled with the batch (800ep:L41)       | 0.3 × batch/256 ²
weight decay        | 1e-6 on every parameter, inside LARC's adaptive rate           | same
                    | (800ep:L44; NVIDIA/apex@e13873de:apex/parallel/LARC.py:L94, L101) |
schedule            | 10 warmup epochs from 0.3 to 4.8, cosine to 0.0048, per step   | same (warmup_start_factor
                    | (800ep:L41-42, L45-46; main_swav.py:L178-182)                  | 0.0625, warmup_linspace)
epochs, batch       | 800, 64 per GPU × 64 GPUs = 4096 (800ep:L10, L39-40)           | same
prototypes          | 3000, temperature 0.1, ε 0.05, 3 Sinkhorn iterations, frozen   | same
                    | for 313 steps, no queue (800ep:L33-38, L43; main_swav.py:L325-328) |
backbone            | ResNet-50, residual BN not zero-initialised (src/resnet50.py:L139) | same (zero_init_residual False)
projector           | 2048-128: Linear-BN-ReLU, Linear, both with bias; l2-normalised | same (output bias on)
                    | into bias-free prototypes (main_swav.py:L107; src/resnet50.py:L205-217, L301-305) |
BatchNorm           | apex SyncBN in groups of 8 GPUs (512 images); the backbone once | the global batch ³
                    | per resolution over its crops, the head once over every crop    | (model.views_together)
                    | (800ep:L50; main_swav.py:L116, L159-163; src/resnet50.py:L308-323) |
precision           | float16, apex O1 (800ep:L49; main_swav.py:L186-187)            | bfloat16 ⁴
linear top-1        | 75.3% (README.md:L29); SGD lr 0.3, wd 1e-6, 100 epochs, batch  | configs/imagenet_linear.py
                    | 32 × 8 GPUs, cosine, best epoch (eval_linear.py:L62-69, L375-376) |

¹ SwAV's σ is in pixels at every crop size, so a 96-px crop needs a kernel covering ±3σ (``blur_kernel_fraction``
  0), not 10% of its side; at 224 px the two agree within the Gaussian's tails.
² The same 4.8 at the official batch; at another batch ours scales linearly (the official keeps 4.8).
³ Smaller BatchNorm groups in pretraining are not offered; ours normalises each resolution group over the whole
  global batch. The official normalisation std is (0.228, 0.224, 0.225) (src/multicropdataset.py:L39), ours
  ImageNet's 0.229: a typo there, immaterial.
⁴ The accelerator's native half precision (TPU); parameters, optimiser state and the loss stay in float32.

The 2×224 variant (scripts/swav_400ep_2x224_pretrain.sh:L28-31, L39: both crops at 0.08–1, 400 epochs) reaches
70.1% (README.md:L35): ``--config.augment.small_crops=0 --config.epochs=400`` and crop_scale (0.08, 1) on both
views. Expected: 75.3% linear top-1 with multi-crop at 800 epochs, 70.1% without it at 400.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'swav'
  c.batch_size = 4096
  c.epochs = 800
  c.model.projector = '2048-128'
  c.optim.base_lr = 0.3
  # The two large crops, alike: scale 0.14-1, bilinear, jitter of strength 1, blur 0.5 with a kernel of ±3σ
  # pixels (as at every crop size), never solarized.
  view = dict(c.augment.view1, crop_scale=(0.14, 1.0), crop_method='bilinear', jitter=(0.8, 0.8, 0.8, 0.2),
              blur_p=0.5, blur_kernel_fraction=0.0)
  c.augment.update(view1=view, view2=dict(view))
  # Multi-crop (facebookresearch/swav@06b1b7c:scripts/swav_800ep_pretrain.sh:L28-L31): the 2×224 above plus
  # 6×96 at scale 0.05-0.14 (augment.small_view's default size and scale), the backbone once per resolution and
  # the heads over all crops (main_swav.py's model(inputs), src/resnet50.py:L308-L323).
  c.augment.small_crops = 6
  c.model.views_together = True
  # Every crop takes the same colour recipe (src/multicropdataset.py:L37-L52): the small view copies the large
  # views' colour keys where they differ from its default. Keep this line after the views' colour lines.
  c.augment.small_view.update({k: v for k, v in c.augment.view1.items()
                               if k not in ('crop_size', 'crop_scale') and v != c.augment.small_view[k]})
  # Memory at batch 4096, 256 images per chip, 2·224² + 6·96² pixels per image, with remat (each residual
  # block's output kept, the rest recomputed: about a third more compute; the batch's BatchNorm statistics
  # kept), compiled for the slice by benchmarks/tpu_compile.py: v4-32 peaks at 12.71 GiB of 32; on v5litepod-16
  # XLA needs 16.18 GiB of temporaries of the chip's 15.75, so it does not fit there (the pre-flight refuses
  # it); --config.grad_accum_steps=2 brings it to 7.18 GiB (BatchNorm statistics then over half the batch).
  c.model.remat = True
  # apex LARC on every parameter; warmup from 0.3 to 4.8 by np.linspace, then cosine (main_swav.py:L171-182);
  # residual BatchNorm not zero-initialised; the projector's last Linear has a bias (src/resnet50.py:L139, L209).
  c.optim.update(name='larc', warmup_start_factor=0.3 / 4.8, warmup_linspace=True)
  c.model.update(zero_init_residual=False, projector_output_bias=True)
  return c
