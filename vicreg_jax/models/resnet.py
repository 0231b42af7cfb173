"""ResNet backbones (He et al., 2016) in Flax, with ImageNet and small-image stems.

As in the official VICReg code (torchvision with ``zero_init_residual=True``): convolutions He-normal
(fan-out), the last BatchNorm scale of every residual block initialised to zero (``zero_init_residual=False``:
to one, as torchvision's default, which SwAV and W-MSE use), BatchNorm momentum 0.1 in PyTorch terms (0.9 here)
and eps 1e-5. The output is the global-average-pooled representation
(2048-d for ResNet-50).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vicreg_jax import errors
from vicreg_jax.models.norm import BatchNorm

# Block outputs are named so: with ``model.remat`` the step keeps only them for the backward pass
# (``jax.checkpoint`` with ``save_only_these_names``) and recomputes the activations inside each block.
REMAT_NAME = 'block_output'

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_conv(features: int, kernel_size, strides=(1, 1), **kwargs) -> nn.Conv:
  """``nn.Conv`` padded as torchvision's ResNets pad: ``(k - 1) / 2`` on both sides of every spatial axis
  (Flax's 'SAME' pads a strided convolution on an even input by (0, 1) instead, shifting the sampling grid)."""
  kwargs.setdefault('padding', [((k - 1) // 2, (k - 1) // 2) for k in kernel_size])
  return nn.Conv(features, kernel_size, strides, **kwargs)


def _last_scale_init(zero: bool):
  """The initialiser of a residual block's last BatchNorm scale: zeros (``zero_init_residual``) or ones."""
  return nn.initializers.zeros if zero else nn.initializers.ones


class BasicBlock(nn.Module):
  """Two 3×3 convolutions with an identity (or 1×1 projection) shortcut: ResNet-18/34."""
  filters: int
  strides: int
  conv: Callable[..., Any]
  norm: Callable[..., Any]
  zero_init: bool = True
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init))(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = self.conv(self.filters, (1, 1), (self.strides, self.strides), name='proj_conv')(x)
      x = self.norm(name='proj_bn')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1×1, 3×3 (strided, as torchvision v1.5), 1×1 ×4 convolutions: ResNet-50/101/152/200."""
  filters: int
  strides: int
  conv: Callable[..., Any]
  norm: Callable[..., Any]
  zero_init: bool = True
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out = self.filters * self.expansion
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)))
    y = self.norm(scale_init=_last_scale_init(self.zero_init))(self.conv(out, (1, 1))(y))
    if x.shape[-1] != out or self.strides != 1:
      x = self.conv(out, (1, 1), (self.strides, self.strides), name='proj_conv')(x)
      x = self.norm(name='proj_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet body. ``stem='imagenet'``: 7×7/2 conv + 3×3/2 max-pool; ``stem='small'``: one 3×3/1 conv.
  ``zero_init_residual``: every block's last BatchNorm scale starts at 0 (else 1)."""
  stage_sizes: Sequence[int]
  block: Any
  width: int = 64
  stem: str = 'imagenet'
  zero_init_residual: bool = True
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(torch_conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.axis_name if train else None)
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
    elif self.stem == 'small':
      x = conv(self.width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    else:
      raise errors.ConfigError(f"Unknown stem {self.stem!r}: use 'imagenet' or 'small'.")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block(self.width * 2**i, strides, conv, norm, self.zero_init_residual,
                       name=f'stage{i + 1}_block{j + 1}')(x)
        x = checkpoint_name(x, REMAT_NAME)  # what ``model.remat`` keeps; the rest is recomputed
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


ARCHS = {
    'resnet18': ([2, 2, 2, 2], BasicBlock),
    'resnet34': ([3, 4, 6, 3], BasicBlock),
    'resnet50': ([3, 4, 6, 3], Bottleneck),
    'resnet101': ([3, 4, 23, 3], Bottleneck),
    'resnet152': ([3, 8, 36, 3], Bottleneck),
    'resnet200': ([3, 24, 36, 3], Bottleneck),
}


def resnet(arch: str, *, width_multiplier: float = 1.0, base_width: int = 64, **kwargs) -> ResNet:
  """``resnet('resnet50', width_multiplier=2)`` → a ResNet-50 ×2. Other kwargs go to :class:`ResNet`."""
  if arch not in ARCHS:
    raise errors.ConfigError(f'Unknown architecture {arch!r}; choose one of {sorted(ARCHS)}.')
  stages, block = ARCHS[arch]
  return ResNet(stage_sizes=stages, block=block, width=max(1, int(round(base_width * width_multiplier))), **kwargs)
