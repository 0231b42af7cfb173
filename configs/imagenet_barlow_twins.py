"""Barlow Twins on ImageNet-1k: the official recipe (Zbontar et al., ICML 2021; facebookresearch/barlowtwins).

  python -m vicreg_jax.main --config=configs/imagenet_barlow_twins.py --workdir=gs://BUCKET/bt_r50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: facebookresearch/barlowtwins@8e8d284 (a source FILE:Lnn below is a file of it).

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, scale 0.08–1, bicubic (main.py:L293, L308)                | same
flip                | p 0.5 (main.py:L294, L309)                                     | same
colour jitter       | (0.4, 0.4, 0.2, 0.1) with p 0.8 (main.py:L295-299)             | same
grayscale           | p 0.2 (main.py:L300, L315)                                     | same
blur                | p 1.0 / 0.1 (view 1 / 2), σ ~ U[0.1, 2] px, PIL                | same; kernel 10% of the side ¹
                    | (main.py:L273, L301, L316)                                     |
solarize            | p 0.0 / 0.2 (main.py:L302, L317)                               | same
colour before crop  | no: crop first (main.py:L292-302)                              | same
multi-crop          | none: 2 × 224 (main.py:L290-320)                               | same
optimiser           | LARS, momentum 0.9, trust 0.001 (main.py:L99-101, L225)        | same
learning rate       | weights 0.2 × batch/256, biases and BatchNorm 0.0048 × batch/256 | same (bias_lr_factor 0.024)
                    | (main.py:L33-36, L158, L167-168)                               |
weight decay        | 1e-6 on weights; biases and BN (ndim 1) get neither decay nor  | same ²
                    | trust ratio (main.py:L37, L100-101, L233-255)                  |
schedule            | 10 warmup epochs from 0, cosine to 0.001 × peak (main.py:L155-166) | same
epochs, batch       | 1000, 2048 (main.py:L29-32)                                    | same
backbone            | ResNet-50, zero-initialised residual BN (main.py:L191)         | same
projector           | 8192-8192-8192, every Linear without bias, BN-ReLU between     | same
                    | (main.py:L195-202)                                             |
loss                | λ 0.0051, embeddings through BN without affine (main.py:L39, L205) | same
gradient            | cross-correlation summed by a non-differentiable all_reduce, so | same, W = 32 ²
                    | each of W GPUs back-propagates its own share (main.py:L214-216) |
BatchNorm           | synchronised over the global batch, each view on its own       | same
                    | (main.py:L89, L208-209)                                        |
precision           | float16 autocast (main.py:L122, L130)                          | bfloat16 ³
linear top-1        | 73.2% (paper, Table 1; 32 V100s), 73.5% (released model, 16    | configs/imagenet_linear.py
                    | GPUs: README.md:L32, L60); head lr 0.3, 100 epochs, batch 256, |
                    | wd 1e-6 (evaluate.py:L35-44)                                   |

¹ PIL's blur has no kernel size; 10% of 224 px (a radius of 11 px) covers ±3σ for every σ ≤ 2 px.
² The official gradient is 1/W of the true one: under LARS exactly a W× larger weight decay and a W× smaller
  bias/BatchNorm learning rate. ``barlow_twins.official_gradient_world_size = 32`` (the paper's 32 V100s, 73.2%)
  applies that equivalence; 16 reproduces the released 73.5% run with the same hyperparameters.
³ The accelerator's native half precision (TPU); parameters, optimiser state and the loss stay in float32.

Expected: 73.2% linear top-1 (paper, Table 1; 73.5% for the released run, W = 16); 55.0% / 69.7% with 1% /
10% labels (Table 2).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'barlow_twins'  # c.barlow_twins holds the official λ and bias_lr_factor
  c.model.projector_hidden_bias = False  # official: Linear(bias=False)-BN-ReLU
  # The official gradient of the paper's 32 GPUs (each back-propagates its share of the all-reduced
  # cross-correlation): 1/32 of the exact one. 16 reproduces the repository's released 73.5% run.
  c.barlow_twins.official_gradient_world_size = 32
  return c
