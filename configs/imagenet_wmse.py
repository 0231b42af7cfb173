"""W-MSE on ImageNet-1k: the authors' ImageNet-100 recipe, the closest published (Ermolov et al., ICML 2021;
htdt/self-supervised).

  python -m vicreg_jax.main --config=configs/imagenet_wmse.py --workdir=gs://BUCKET/wmse_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: htdt/self-supervised@d9662c8 (a source FILE:Lnn below is a file of it; README.md:L72 is the
ImageNet-100 command, 2 views, whose flags override cfg.py's defaults).

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, scale 0.08–1, ratio 3/4–4/3, bicubic                      | same
                    | (README.md:L72; cfg.py:L39-41; datasets/transforms.py:L12-17)  |
flip                | p 0.5 (cfg.py:L42; datasets/transforms.py:L18)                 | same
colour jitter       | (0.8, 0.8, 0.8, 0.2) with p 0.8 (README.md:L72; cfg.py:L36;    | same
                    | datasets/transforms.py:L8-10)                                  |
grayscale           | p 0.2 (README.md:L72; datasets/transforms.py:L11)              | same
colour before crop  | yes: jitter and grayscale on the whole image, then the crop    | same (colour_first)
                    | (datasets/transforms.py:L6-17)                                 |
blur                | p 0.5 on both views, after the crop, σ ~ U[0.1, 2] px, PIL     | same; kernel 10% of the side ¹
                    | (datasets/imagenet.py:L9-15, L26-31)                           |
solarize            | none (datasets/imagenet.py:L26-31)                             | same
multi-crop          | none: 2 views (cfg.py:L24-29; README.md:L72)                   | same ²
optimiser           | Adam (train.py:L39)                                            | same (optim.name 'adam')
weight decay        | 1e-6 as L2 added to the gradient of every parameter            | same
                    | (cfg.py:L67; train.py:L39)                                     |
learning rate       | 2e-3 at batch 512 (README.md:L72)                              | 1e-3 × batch/256 = 2e-3 ⁷
schedule            | 500 warmup steps (lr × (i+1)/500), then constant, × 0.2 at     | same ³
                    | epochs 190 and 215 (cfg.py:L115-126; train.py:L22-24, L43-54)  |
epochs, batch       | 240, 512 (README.md:L72; cfg.py:L112)                          | same
backbone            | ResNet-18 (cfg.py:L127-132), torchvision's: residual BN not    | ResNet-50 ⁴, not zero-initialised
                    | zero-initialised (model.py:L19-27)                             |
head                | 1024-128: Linear-BN-ReLU, Linear, both with bias               | same (output bias on)
                    | (README.md:L72; cfg.py:L77-81; model.py:L5-16)                 |
whitening           | Cholesky, sub-batches of 256, 1 iteration, ε 0; MSE of         | same
                    | l2-normalised embeddings (README.md:L72; cfg.py:L74-91;        |
                    | methods/w_mse.py:L14-36; methods/norm_mse.py:L4-7)             |
BatchNorm           | nn.DataParallel: each GPU's share; the backbone per view, the  | the global batch, per view ⁵
                    | head over both views (model.py:L29; methods/w_mse.py:L21-22)   |
precision           | float32 (none: no mixed precision in the code)                 | bfloat16 ⁶
linear top-1        | none on ImageNet-1k (ImageNet-100 only); the authors' probe: a | configs/imagenet_linear.py
                    | linear layer on cached features of un-augmented images, Adam lr |
                    | 1e-2 decayed exponentially to 1e-6 over 500 epochs, wd 5e-6,    |
                    | batch 1000 (eval/sgd.py:L6-25; datasets/base.py:L16)           |

¹ PIL's blur has no kernel size; 10% of 224 px (a radius of 11 px) covers ±3σ for every σ ≤ 2 px.
² The paper's better W-MSE 4 (4 views, batch 256: README.md:L73) is not implemented: the step takes two views.
³ ``optim.schedule='step'`` with ``decay_epochs`` (190, 215) and ``decay_factor`` 0.2; ``warmup_steps`` 500 from
  ``warmup_start_factor`` 1/500 on ``np.linspace`` steps (``warmup_linspace``): step i at (i+1)/500 of the peak.
⁴ ResNet-50, the backbone every other ImageNet-1k config uses, so the methods compare; the authors published
  ImageNet-100 with ResNet-18 only (``--config.model.arch=resnet18`` gives theirs).
⁵ DataParallel's per-GPU statistics depend on the GPU count, which the recipe does not fix; our head, too, runs
  per view (each view's global batch).
⁶ The accelerator's native half precision (TPU); parameters, optimiser state and the loss stay in float32.
⁷ The same at the recipe's batch; the official 2e-3 is not scaled with the batch, ours is.

Input pipeline: with ``colour_first`` the host decodes each image whole and jitters and grays it before the crop
(the device does the blur and the normalisation), more host work per image than the other configs.
Expected: no published ImageNet-1k figure; evaluate with configs/imagenet_linear.py.
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'wmse'
  c.batch_size = 512
  c.epochs = 240
  # The authors' ImageNet-100 recipe (no ImageNet-1k one was published): head 1024-128, sub-batches of 256,
  # Adam lr 2e-3 at batch 512 (base_lr × batch/256), weight decay 1e-6.
  c.wmse.update(projector='1024-128', w_size=256)
  # Both views alike: jitter and grayscale on the whole image, then the crop; blur 0.5, never solarized.
  view = dict(c.augment.view1, colour_first=True, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)
  c.augment.update(view1=view, view2=dict(view))
  # PyTorch Adam with L2 added to the gradient; 500 warmup steps at (i+1)/500, then constant, ×0.2 at epochs 190
  # and 215 (train.py:L22-54); torchvision's ResNet (not zero-initialised) and a head whose last Linear has a bias.
  c.optim.update(name='adam', base_lr=1e-3, schedule='step', decay_epochs=(190, 215), decay_factor=0.2,
                 warmup_steps=500, warmup_start_factor=1 / 500, warmup_linspace=True)
  c.model.update(zero_init_residual=False, projector_output_bias=True)
  return c
