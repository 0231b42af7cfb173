"""SimCLR v1 on ImageNet-1k: the paper's ResNet-50 recipe (Chen et al., ICML 2020; google-research/simclr).

  python -m vicreg_jax.main --config=configs/imagenet_simclr.py --workdir=gs://BUCKET/simclr_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: google-research/simclr@be133b3, its first commit, which is v1 (a source FILE:Lnn below is a file
of it); "paper" is the ICML 2020 paper.

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, area 0.08–1, ratio 3/4–4/3, bicubic (data_util.py:L285-295) | same ¹
flip                | p 0.5 (data_util.py:L434)                                      | same
colour jitter       | strength 1.0 = (0.8, 0.8, 0.8, 0.2) with p 0.8, random order   | same ²
                    | (run.py:L222; data_util.py:L61-66, L147-150, L361)             |
grayscale           | p 0.2 (data_util.py:L362)                                      | same
blur                | p 0.5 on both views, σ ~ U[0.1, 2] px, kernel side//10         | same ³
                    | (model.py:L55-57; data_util.py:L380-382, L386)                 |
solarize            | none (data_util.py:L416-439)                                   | same
colour before crop  | no: crop first (data_util.py:L431-436)                         | same
multi-crop          | none: 2 × 224 (model.py:L43)                                   | same
optimiser           | LARS, momentum 0.9, trust 0.001, the lr inside the momentum     | same (optim.name 'lars_classic')
                    | buffer (run.py:L166, L170; lars_optimizer.py:L26, L105-122)    |
learning rate       | 0.3 × batch/256 = 4.8 (run.py:L42; model_util.py:L55)          | same
weight decay        | 1e-6; BatchNorm and biases get neither decay nor trust ratio   | same
                    | (run.py:L50; model.py:L175-179; lars_optimizer.py:L76-81)      |
schedule            | 10 warmup epochs from 0, cosine to 0 (run.py:L46; model_util.py:L50-68) | same
epochs, batch       | 1000 (paper §6, the models of Table 6), 4096 (paper, default setting) | same
temperature         | 0.1 (run.py:L186)                                              | same
backbone            | ResNet-50, last BN of each block zero-initialised (resnet.py:L324, L389) | same
projector           | 2048-128: Linear-BN-ReLU, Linear, BN with scale and no offset; | same ⁴
                    | no Linear biases (run.py:L194-202; model_util.py:L92-98, L112-120) |
BatchNorm           | over all cores, both views in one batch (run.py:L206; model.py:L58) | same (model.views_together)
precision           | float32 (none: no mixed precision in the code)                 | bfloat16 ⁵
linear top-1        | 69.3% (paper, Table 6; the released checkpoint 69.1%, README.md:L9); | configs/imagenet_linear.py
                    | SGD Nesterov 0.9, lr 0.1 × batch/256 at 4096, 90 epochs, wd 1e-6 |
                    | (google-research/simclr@383d414:README.md:L136-143)            |

¹ The official window comes from ``tf.image.sample_distorted_bounding_box`` (min_object_covered 0.1, 100 tries),
  resized without antialiasing; ours is torchvision's sampler (10 tries, centre-crop fallback), antialiased.
² v1's brightness is TF's additive δ ~ U[−0.8, 0.8]; ours multiplies by U[0.2, 1.8] (torchvision; both clip).
³ The official batched blur draws one σ per view for the whole batch (data_util.py:L380, L407); ours one per
  image. The kernel: 10% of the side (23 px at 224), as the official ``height // 10``.
⁴ v1's head (``--config.model.projector=2048-2048-128`` without the output BN is v2's deeper head). The output
  BatchNorm with a scale and no offset is ``model.projector_output_bn`` and ``model.projector_output_scale``.
⁵ The accelerator's native half precision (TPU); parameters, optimiser state and the loss stay in float32.

Expected: 69.3% linear top-1 (paper, Table 6) with the protocol above.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'simclr'
  c.batch_size = 4096
  view = dict(c.augment.view1, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)  # both views alike, never solarized
  c.augment.update(view1=view, view2=dict(view))
  # v1's head: Linear(no bias)-BN-ReLU, Linear(no bias), BatchNorm with a scale and no offset; both views in one
  # BatchNorm batch.
  c.model.update(projector='2048-128', projector_hidden_bias=False, projector_output_bn=True,
                 projector_output_scale=True, views_together=True)
  # SimCLR's LARSOptimizer (classic momentum): the learning rate inside the momentum buffer.
  c.optim.update(name='lars_classic', base_lr=0.3, end_lr_factor=0.0)
  return c
