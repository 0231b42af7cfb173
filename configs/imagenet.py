"""VICReg on ImageNet-1k: the paper's recipe (Bardes, Ponce & LeCun, ICLR 2022; official code's defaults).

  python -m vicreg_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/vicreg_r50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: facebookresearch/vicreg@4e12602 (a source FILE:Lnn below is a file of it).

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, scale 0.08–1, bicubic (augmentations.py:L41-42)          | same
flip                | p 0.5 (augmentations.py:L44)                                   | same
colour jitter       | (0.4, 0.4, 0.2, 0.1) with p 0.8 (augmentations.py:L45-52)      | same
grayscale           | p 0.2 (augmentations.py:L53)                                   | same
blur                | p 1.0 / 0.1 (view 1 / 2), σ ~ U[0.1, 2] px, PIL                | same; kernel 10% of the side ¹
                    | (augmentations.py:L20, L54, L77)                               |
solarize            | p 0.0 / 0.2 (augmentations.py:L55, L78)                        | same
colour before crop  | no: crop first (augmentations.py:L41-55)                       | same
multi-crop          | none: 2 × 224 (augmentations.py:L37-82)                        | same
optimiser           | LARS, momentum 0.9, trust 0.001 (main_vicreg.py:L109-115, L251-252) | same
learning rate       | 0.2 × batch/256 = 1.6 (main_vicreg.py:L170; README.md:L80)     | same
weight decay        | 1e-6; biases and BatchNorm (ndim 1) get neither decay nor      | same
                    | trust ratio (main_vicreg.py:L54, L113-114, L235-236)           |
schedule            | 10 warmup epochs from 0, cosine to 0.001 × peak, per step      | same
                    | (main_vicreg.py:L167-178)                                      |
epochs, batch       | 1000, 2048 (README.md:L80)                                     | same
backbone            | ResNet-50, last BN of each block zero-initialised              | same
                    | (main_vicreg.py:L189-190)                                      |
projector           | 8192-8192-8192: Linear (bias)-BN-ReLU twice, Linear without    | same
                    | bias (main_vicreg.py:L223-232)                                 |
loss                | λ 25, μ 25, ν 1, ε 1e-4 (main_vicreg.py:L58-62, L205)          | same
BatchNorm           | synchronised over the global batch, each view on its own       | same
                    | (main_vicreg.py:L107, L195-196)                                |
precision           | float16 autocast (main_vicreg.py:L128, L138)                   | bfloat16 ²
linear top-1        | 73.2% (README.md:L33), SGD head lr 0.02, 100 epochs, batch 256, | configs/imagenet_linear.py
                    | wd 1e-6 (README.md:L91; evaluate.py:L58-84)                    | (the same protocol)

¹ PIL's blur has no kernel size; 10% of 224 px (a radius of 11 px) covers ±3σ for every σ ≤ 2 px.
² The accelerator's native half precision (TPU); parameters, optimiser state and the loss stay in float32.

Expected: 73.2% top-1 with the linear-evaluation job (paper, Table 1); 54.8% / 69.5% with 1% / 10% labels.
ImageNet must be prepared for TFDS beforehand (manual download): see docs/methods.md. Or train on a folder of images,
one subfolder per class (``ROOT/CLASS/*.jpg``, or ``ROOT/train/CLASS/...`` and ``ROOT/val/CLASS/...``):

  python -m vicreg_jax.main --config=configs/imagenet.py --workdir=runs/mine \
      --config.data.source=folder --config.data.data_dir=ROOT [--config.data.val_fraction=0.05]

Input pipeline: each view decodes only its random crop window of the JPEG (fused decode-and-crop); tf.data maps
run in parallel with autotune; ``data.threadpool_size`` sets a private thread pool (0: TF's shared one) and
``data.shuffle_buffer`` the TFDS window: that many encoded images (about 110 kB each) permuted at once, two
windows held in RAM (docs/performance.md).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()  # the defaults are the paper's recipe, here in bfloat16
  # Kept for evaluation besides the newest 3: every 12,500 steps (20 epochs of 625 steps at batch 2048; a multiple
  # of checkpoint_every_steps, 2500), which hits epochs 100, 200, 300, 400, 800 and 1000, the lengths the methods'
  # papers report. 50 checkpoints of 1.41 GB (float32: 174.6M parameters, ResNet-50 23.5M + projector 151.0M, their
  # LARS momentum, the online probe's 2.0M and its momentum): 71 GB over the run.
  c.keep_checkpoints_every = 12_500
  return c
