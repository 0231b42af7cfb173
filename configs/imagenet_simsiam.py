"""SimSiam on ImageNet-1k: the official 100-epoch recipe (Chen & He, CVPR 2021; facebookresearch/simsiam).

  python -m vicreg_jax.main --config=configs/imagenet_simsiam.py --workdir=gs://BUCKET/simsiam_r50 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Official code: facebookresearch/simsiam@a7bc177 (a source FILE:Lnn below is a file of it).

hyperparameter      | official (source)                                              | ours
------------------- | -------------------------------------------------------------- | -------------------------------
crop                | 224, scale 0.2–1, bilinear (torchvision's default) (main_simsiam.py:L230) | same
flip                | p 0.5 (main_simsiam.py:L236)                                   | same
colour jitter       | (0.4, 0.4, 0.4, 0.1) with p 0.8, MoCo v2's (main_simsiam.py:L231-233) | same
grayscale           | p 0.2 (main_simsiam.py:L234)                                   | same
blur                | p 0.5 on both views, σ ~ U[0.1, 2] px, PIL                     | same; kernel 10% of the side ¹
                    | (main_simsiam.py:L235; simsiam/loader.py:L26-31)               |
solarize            | none (main_simsiam.py:L229-239)                                | same
colour before crop  | no: crop first (main_simsiam.py:L230-235)                      | same
multi-crop          | none: 2 × 224 (main_simsiam.py:L243)                           | same
optimiser           | SGD, momentum 0.9 (main_simsiam.py:L58, L199-201)              | same
learning rate       | 0.05 × batch/256 = 0.1 (main_simsiam.py:L56, L157)             | same
weight decay        | 1e-4 on every parameter (main_simsiam.py:L60, L199-201)        | same
schedule            | cosine to 0 per epoch, no warmup; predictor at the peak lr     | same ²
                    | (--fix-pred-lr: README.md:L32; main_simsiam.py:L193-195, L359-366) |
epochs, batch       | 100, 512 (main_simsiam.py:L47, L51)                            | same
backbone            | ResNet-50, zero-initialised residual BN (simsiam/builder.py:L24) | same
projector           | 2048-2048-2048: (Linear without bias-BN-ReLU) twice, Linear,   | same
                    | BN without affine (simsiam/builder.py:L27-36)                  |
predictor           | 512-2048: Linear without bias-BN-ReLU, Linear with bias        | same ³
                    | (simsiam/builder.py:L39-42)                                    |
BatchNorm           | synchronised over the global batch, each view on its own       | same
                    | (main_simsiam.py:L161; simsiam/builder.py:L55-56)              |
precision           | float32 (none: no autocast in main_simsiam.py)                 | bfloat16 ⁴
linear top-1        | 68.1% (README.md:L68-74); LARS (trust 0.001) lr 0.1 × batch/256 at | configs/imagenet_linear.py
                    | 4096, 90 epochs, wd 0, best epoch (main_lincls.py:L44-57, L229-232, L309) |

¹ PIL's blur has no kernel size; 10% of 224 px (a radius of 11 px) covers ±3σ for every σ ≤ 2 px.
² The official learning rate changes once an epoch (``adjust_learning_rate`` per epoch): ``optim.schedule``
  'cosine_epochs' does the same.
³ The projector's last Linear has a bias the official code freezes (``requires_grad = False``,
  simsiam/builder.py:L36): the affine-free BatchNorm after it removes it, so ours has none; the predictor's output
  bias is trained, as the official one (``simsiam.predictor_output_bias``).
⁴ The accelerator's native half precision (TPU); parameters, optimiser state and the loss stay in float32.

Expected: 68.1% linear top-1 at these 100 epochs (README.md:L74; paper, Table 4; 71.3% is its 800-epoch run).
"""

from vicreg_jax.config import imagenet_config


def get_config():
  c = imagenet_config()
  c.method = 'simsiam'
  c.batch_size = 512
  c.epochs = 100
  # MoCo v2's views, both alike: crop 0.2-1 bilinear, weaker jitter, blur 0.5, never solarized.
  view = dict(c.augment.view1, crop_scale=(0.2, 1.0), crop_method='bilinear', jitter=(0.4, 0.4, 0.4, 0.1),
              blur_p=0.5)
  c.augment.update(view1=view, view2=dict(view))
  # Projector: Linear(no bias)-BN-ReLU twice, Linear, BatchNorm without affine; predictor 512 then 2048.
  c.model.update(projector='2048-2048-2048', projector_hidden_bias=False, projector_output_bn=True)
  c.simsiam.predictor_output_bias = True
  # The official cosine moves once an epoch (adjust_learning_rate per epoch).
  c.optim.update(name='sgd', base_lr=0.05, weight_decay=1e-4, warmup_epochs=0, end_lr_factor=0.0,
                 schedule='cosine_epochs')
  return c
