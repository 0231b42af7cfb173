"""The backbone a config's ``model`` section names: a ResNet (``resnet18`` … ``resnet200``), a ViT (``vit_ti16``,
``vit_s16``, ``vit_b16``, ``vit_micro4``) or ``convnet``."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vicreg_jax.models import convnet, resnet, vit

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def from_config(model, axis_name: Optional[str] = None) -> nn.Module:
  """``model.arch`` 'convnet': :class:`convnet.ConvNet` with widths 32-64-128 × ``width_multiplier``; a ResNet name:
  :func:`resnet.resnet` with ``width_multiplier``, ``stem`` and ``zero_init_residual``. BatchNorm statistics are
  synchronised over ``axis_name`` in training. A ViT name: :func:`vit.vit` with ``num_heads`` (0: timm's),
  ``pos_embed`` ('sincos' or 'learned') and ``pos_embed_size`` (the image side a learned embedding's grid covers)."""
  dtype = DTYPES[model.dtype]
  if model.arch in vit.ARCHS:
    return vit.vit(model.arch, num_heads=model.num_heads, pos_embed=model.pos_embed,
                   image_size=model.pos_embed_size, dtype=dtype)
  if model.arch == 'convnet':
    widths = tuple(max(1, int(round(w * model.width_multiplier))) for w in (32, 64, 128))
    return convnet.ConvNet(widths=widths, strides=(1, 2, 2), axis_name=axis_name, dtype=dtype)
  return resnet.resnet(model.arch, width_multiplier=model.width_multiplier, stem=model.stem, axis_name=axis_name,
                       dtype=dtype, zero_init_residual=model.zero_init_residual)
