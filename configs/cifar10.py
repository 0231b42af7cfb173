"""VICReg on CIFAR-10 (TFDS), ResNet-18 with the small-image stem.

  python -m vicreg_jax.main --config=configs/cifar10.py --workdir=runs/cifar10

Recipe of solo-learn's CIFAR VICReg (crop scale 0.2–1 at 32×32, jitter p 0.8, grayscale 0.2, solarize 0.1
on both views, no blur at 32×32, LARS base_lr 0.3, wd 1e-4, projector 2048-2048-2048, batch 256, 1000 epochs).
Reported there: about 92% linear top-1 after 1000 epochs. Not yet run in this project; the end-of-run probe
(sklearn on frozen features of train/test) reports our figure. Needs an accelerator: TFDS downloads
cifar10 with `tfds build cifar10` beforehand.
"""

from vicreg_jax.config import base_config, view_recipe

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def get_config():
  c = base_config()
  c.batch_size = 256
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.model.update(arch='resnet18', stem='small', projector='2048-2048-2048')
  c.optim.update(base_lr=0.3, weight_decay=1e-4)
  c.data.update(name='cifar10', image_size=32, shuffle_buffer=50_000)
  view = view_recipe(crop_size=32, crop_scale=(0.2, 1.0), flip_p=0.5, jitter_p=0.8, gray_p=0.2, solarize_p=0.1,
                     mean=CIFAR_MEAN, std=CIFAR_STD)
  c.augment.update(view1=view, view2=dict(view))
  c.data.test_split = 'test'
  c.final_probe.update(enabled=True, batch_size=1024)
  return c
