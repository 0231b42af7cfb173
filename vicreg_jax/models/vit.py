"""Vision Transformers (Dosovitskiy et al., 2021) in Flax, laid out as timm's ``VisionTransformer`` and MoCo v3's
``vits.py``, so that their state dicts map one to one (vicreg_jax/models/torch_weights.py).

Patch embedding (a p×p convolution of stride p, with bias), a class token prepended, a position embedding added
(fixed 2-D sin-cos, zero for the class token, as MoCo v3's ``build_2d_sincos_position_embedding``: a constant,
not a parameter; or ``learned``, timm's, one vector per position of the ``image_size`` grid, the class token's
included), ``depth`` pre-norm blocks (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; LayerNorm eps 1e-6,
statistics in float32;
multi-head attention with a bias on the fused qkv projection, ``jax.nn.dot_product_attention`` with the
softmax in float32; MLP Linear-GELU-Linear, 4× wide, with the exact erf GELU as PyTorch's ``nn.GELU``), a final
LayerNorm; the representation is the class token's output (``global_pool='token'``).

Any input grid works: the sin-cos table is computed for the input's grid, a learned embedding is resampled to it
bicubically (timm's ``resample_abs_pos_embed``), so multi-crop's small crops go through the same model.

Initialisation is MoCo v3's (the self-supervised reference): every Linear Xavier-uniform with zero bias (the
fused qkv as three D×D matrices), the patch projection Xavier-uniform over its flattened [D, 3·p·p] weight, the
class token N(0, 1e-6²), LayerNorm 1 and 0; a learned position embedding truncated N(0, 0.02²) as timm.
Parameters keep PyTorch's ranks (class token [1, 1, D], learned position embedding [1, 1 + N, D]), so each
method's weight-decay rule by rank treats them as its official code would.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vicreg_jax import compilation, errors
from vicreg_jax.models import timm_weights
from vicreg_jax.models.resnet import REMAT_NAME

ARCHS = timm_weights.ARCHS  # name: (patch size, width D, depth, timm's number of heads)
MLP_RATIO = timm_weights.MLP_RATIO
LN_EPS = 1e-6
sincos_2d = timm_weights.sincos_2d


def resample_pos_embed(pos: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """A learned embedding [1, 1 + g·g, D] for a g×g grid resampled to grid_h×grid_w (bicubic, antialiased when
  shrinking; the class token's row kept), as timm's ``resample_abs_pos_embed``."""
  n = pos.shape[1] - 1
  g = math.isqrt(n)
  if (grid_h, grid_w) == (g, g):
    return pos
  grid = pos[0, 1:].reshape(g, g, -1).astype(jnp.float32)
  grid = jax.image.resize(grid, (grid_h, grid_w, grid.shape[-1]), 'bicubic')
  return jnp.concatenate([pos[:, :1], grid.reshape(1, grid_h * grid_w, -1).astype(pos.dtype)], axis=1)


def _qkv_init(key, shape, dtype=jnp.float32):
  """MoCo v3's fused-qkv init: U(±sqrt(6/(D + D))), Xavier-uniform of each of the three D×D matrices."""
  bound = math.sqrt(6.0 / (shape[0] + shape[1] // 3))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _patch_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform over the patch projection flattened to [D, 3·p·p] (MoCo v3's): U(±sqrt(6/(3·p·p + D)))."""
  fan_in = shape[0] * shape[1] * shape[2]
  bound = math.sqrt(6.0 / (fan_in + shape[3]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (PyTorch's and Flax's: ``(x - mean) / sqrt(var + eps) · scale + bias``, the
  biased variance), statistics in float32 whatever ``dtype``, output in ``dtype``. On CPU the two row means are
  products with a 1/D vector (float32, highest precision): XLA:CPU's reductions along the minor axis made the
  ViT-S/16 step 2.8× slower than this (docs/performance.md); elsewhere ``jnp.mean``."""
  epsilon: float = LN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (d,))
    bias = self.param('bias', nn.initializers.zeros, (d,))
    x = x.astype(jnp.float32)
    if compilation.targets_cpu():
      w = jnp.full((d,), 1.0 / d, jnp.float32)
      mean = lambda v: jnp.dot(v, w, precision=jax.lax.Precision.HIGHEST)[..., None]  # noqa: E731
    else:
      mean = lambda v: jnp.mean(v, axis=-1, keepdims=True)  # noqa: E731
    centred = x - mean(x)
    y = centred * jax.lax.rsqrt(mean(centred * centred) + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


class Block(nn.Module):
  """A pre-norm Transformer block: ``x + proj(attention(qkv(norm1(x))))``, then ``x + fc2(gelu(fc1(norm2(x))))``."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    dense = lambda features, name, init=nn.initializers.xavier_uniform(): nn.Dense(  # noqa: E731
        features, kernel_init=init, dtype=self.dtype, name=name)
    norm = lambda name: LayerNorm(dtype=self.dtype, name=name)  # noqa: E731
    qkv = dense(3 * d, 'qkv', _qkv_init)(norm('norm1')(x))
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)  # timm's order
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, n, d)
    x = x + dense(d, 'proj')(y)
    y = dense(MLP_RATIO * d, 'fc1')(norm('norm2')(x))
    return x + dense(d, 'fc2')(jax.nn.gelu(y, approximate=False))


class ViT(nn.Module):
  """A Vision Transformer; the output is the class token after the final LayerNorm, float32 [B, width]."""
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  pos_embed: str = 'sincos'  # or 'learned'
  image_size: int = 224      # the grid of a learned position embedding: image_size // patch_size per side
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no BatchNorm or dropout
    p = self.patch_size
    if self.width % self.num_heads:
      raise errors.ConfigError(f'a ViT of width {self.width} cannot have {self.num_heads} heads (not a divisor).')
    if x.shape[1] % p or x.shape[2] % p:
      raise errors.ConfigError(f'a ViT with {p}×{p} patches needs image sides divisible by {p}, got '
                               f'{x.shape[1]}×{x.shape[2]}.')
    x = nn.Conv(self.width, (p, p), (p, p), padding='VALID', kernel_init=_patch_init, dtype=self.dtype,
                name='patch_embed')(x.astype(self.dtype))
    b, gh, gw, d = x.shape
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x.reshape(b, gh * gw, d)], axis=1)
    if self.pos_embed == 'sincos':
      pos = jnp.asarray(sincos_2d(gh, gw, d))[None]
    elif self.pos_embed == 'learned':
      g = self.image_size // p
      pos = resample_pos_embed(self.param('pos_embed', nn.initializers.truncated_normal(0.02), (1, 1 + g * g, d)),
                               gh, gw)
    else:
      raise errors.ConfigError(f"Unknown position embedding {self.pos_embed!r}: use 'sincos' or 'learned'.")
    x = x + pos.astype(self.dtype)
    for i in range(self.depth):
      x = checkpoint_name(Block(self.num_heads, self.dtype, name=f'block{i}')(x), REMAT_NAME)
    x = LayerNorm(dtype=self.dtype, name='norm')(x)
    return x[:, 0].astype(jnp.float32)


def vit(arch: str, *, num_heads: int = 0, pos_embed: str = 'sincos', image_size: int = 224, **kwargs) -> ViT:
  """``vit('vit_s16', num_heads=12)`` → MoCo v3's ViT-S/16 (``num_heads`` 0: timm's for that arch). Other kwargs
  go to :class:`ViT`."""
  if arch not in ARCHS:
    raise errors.ConfigError(f'Unknown architecture {arch!r}; choose one of {sorted(ARCHS)}.')
  patch, width, depth, heads = ARCHS[arch]
  return ViT(patch_size=patch, width=width, depth=depth, num_heads=num_heads or heads, pos_embed=pos_embed,
             image_size=image_size, **kwargs)
