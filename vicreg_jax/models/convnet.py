"""A plain convolutional backbone for small images (the digits demo): conv-BN-ReLU layers, global mean pool."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vicreg_jax import errors
from vicreg_jax.models.norm import BatchNorm
from vicreg_jax.models.resnet import REMAT_NAME, conv_init


class ConvNet(nn.Module):
  """``len(widths)`` 3×3 convolutions (no bias) with the given ``strides``, each followed by BatchNorm (statistics
  synchronised over ``axis_name`` in training) and ReLU; the output is the global mean over positions
  (``widths[-1]``-d)."""
  widths: Sequence[int] = (32, 64, 128)
  strides: Sequence[int] = (1, 2, 2)
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    if len(self.widths) != len(self.strides):
      raise errors.ConfigError(f'ConvNet needs one stride per width, got {self.widths} and {self.strides}.')
    x = x.astype(self.dtype)
    for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
      x = nn.Conv(width, (3, 3), (stride, stride), padding=[(1, 1), (1, 1)], use_bias=False,
                  kernel_init=conv_init, dtype=self.dtype, name=f'conv{i}')(x)
      x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                       axis_name=self.axis_name if train else None, name=f'bn{i}')(x)
      x = checkpoint_name(nn.relu(x), REMAT_NAME)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
