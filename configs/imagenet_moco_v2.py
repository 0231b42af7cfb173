"""MoCo v2 on ImageNet-1k: the official 200-epoch recipe (Chen, Fan, Girshick & He, 2020, arXiv:2003.04297;
facebookresearch/moco).

  python -m vicreg_jax.main --config=configs/imagenet_moco_v2.py --workdir=gs://BUCKET/moco_v2_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: facebookresearch/moco@132aea9 (a source FILE:Lnn below is a file of it; README.md:L44-51 is the
command: main_moco.py's defaults with ``--lr 0.03 --batch-size 256 --mlp --moco-t 0.2 --aug-plus --cos``).
800 epochs (71.1%): ``--config.epochs=800``.

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, scale 0.2–1, bilinear (torchvision's default)             | same
                    | (main_moco.py:L331)                                            |
flip                | p 0.5 (main_moco.py:L341)                                      | same
colour jitter       | (0.4, 0.4, 0.4, 0.1) with p 0.8 (main_moco.py:L332-335)        | same
grayscale           | p 0.2 (main_moco.py:L336)                                      | same
blur                | p 0.5 on both views, σ ~ U[0.1, 2] px, PIL                     | same; kernel ±3σ ¹
                    | (main_moco.py:L337-340; moco/loader.py:L25-35)                 |
solarize            | none (main_moco.py:L330-344)                                   | same
views               | the same recipe for the query and the key (moco/loader.py:L13-22) | same
colour before crop  | no: crop first (main_moco.py:L330-341)                         | same
optimiser           | SGD, momentum 0.9 (main_moco.py:L96-98, L293-298)              | same (optim.name 'sgd')
weight decay        | 1e-4 on every parameter (main_moco.py:L99-107, L293-298)       | same
learning rate       | 0.03 at batch 256 (main_moco.py:L80-88; README.md:L46)         | 0.03 × batch/256
schedule            | cosine to 0 per epoch, no warmup (--cos: main_moco.py:L179,    | same ('cosine_epochs')
                    | L381, L497-506)                                                |
epochs, batch       | 200, 256 = 32 × 8 GPUs (main_moco.py:L61, L73)                 | same
backbone            | ResNet-50, torchvision's init (no zero-init residual)          | same
                    | (main_moco.py:L250-257; moco/builder.py:L41-42)                |
head                | 2048-2048-128: Linear, ReLU, Linear, with biases, no BatchNorm | same
                    | (--mlp: moco/builder.py:L44-51; --moco-dim 128: main_moco.py:L156) |
momentum encoder    | backbone + head, copied at init, m 0.999 (constant), updated   | same
                    | before the keys (moco/builder.py:L53-57, L65-73, L152-153; main_moco.py:L164-169) |
queue               | 65,536 unit keys, random at start, the global batch's keys     | same ²
                    | written after the loss; K % batch = 0 (moco/builder.py:L59-63, L75-89, L180-181; |
                    | main_moco.py:L158-163)                                         |
loss                | InfoNCE of view 1's query: its key of view 2 against the       | same
                    | queue, τ 0.2, one direction (moco/builder.py:L138-183; README.md:L51; |
                    | main_moco.py:L291, L426-427)                                   |
BatchNorm           | per GPU (32 images), no SyncBN; the key view shuffled across   | ghost BatchNorm over groups of 32
                    | the GPUs before the key encoder (moco/builder.py:L91-136,      | rows by global position, the key
                    | L155-162)                                                      | view permuted over the devices ³
precision           | float32 (none: no autocast in main_moco.py)                    | bfloat16 ⁴
linear top-1        | 67.5 ± 0.1% over 5 runs (README.md:L83, L87); SGD momentum 0.9,  | configs/imagenet_linear.py
                    | lr 30, batch 256, 100 epochs, × 0.1 at epochs 60 and 80, wd 0, | (protocol moco_v2)
                    | head N(0, 0.01), bilinear, best (main_lincls.py:L57, L69, L79, |
                    | L87, L92, L96, L240-241, L354, L381-382, L412, L604-610; README.md:L60-63) |

¹ PIL's ``GaussianBlur(radius=σ)`` covers about ±3σ pixels (``blur_kernel_fraction`` 0), as MoCo v3's recipe.
² The queue is stored [K, 128] (the official buffer is its transpose); its random start comes from the run's seed.
³ ``model.ghost_batch_size`` 32 and ``moco_v2.shuffle_keys``: each group of 32 rows of the global batch is one
  official GPU's batch, whatever the device count here, and the key view's permutation depends on the seed and the
  step only (not on the devices), so the run is the same on 8 devices or 256. The running statistics kept are the
  first group's (DDP broadcasts rank 0's buffers before every forward pass).
⁴ The accelerator's native half precision (TPU); parameters, optimiser state, the key encoder, the queue and the
  loss stay in float32.

Expected: 67.5% linear top-1 at 200 epochs, 71.1% at 800 (README.md:L83, L124-128), with the protocol above.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'moco_v2'
  c.batch_size = 256
  c.epochs = 200
  c.model.update(projector='2048-128', projector_bn=False, projector_output_bias=True, zero_init_residual=False,
                 ghost_batch_size=32)  # the hidden Linear's bias: the default
  c.optim.update(name='sgd', base_lr=0.03, weight_decay=1e-4, warmup_epochs=0, end_lr_factor=0.0,
                 schedule='cosine_epochs')  # momentum 0.9: the default
  view = dict(c.augment.view1, crop_scale=(0.2, 1.0), crop_method='bilinear', jitter=(0.4, 0.4, 0.4, 0.1),
              blur_p=0.5, solarize_p=0.0, blur_kernel_fraction=0.0)
  c.augment.update(view1=view, view2=dict(view))
  return c  # moco_v2's section: m 0.999, τ 0.2, queue 65,536, shuffled keys (the method's defaults)
