"""Projector (expander) and predictor MLPs, SwAV's prototypes, and the backbone + heads model the trainer uses."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicreg_jax import errors
from vicreg_jax.models.norm import BatchNorm

# PyTorch nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def parse_mlp_spec(spec: str) -> list[int]:
  """``'8192-8192-8192'`` → [8192, 8192, 8192]; raises a one-line ValueError on anything else."""
  try:
    sizes = [int(s) for s in str(spec).split('-')]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise errors.ConfigError(f'Projector spec {spec!r} must be positive sizes joined by "-", e.g. "8192-8192-8192".')
  return sizes


def torch_bias_init(fan_in: int):
  """PyTorch nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Projector(nn.Module):
  """Official VICReg projector: (Linear-BN-ReLU) for every size but the last, then Linear without bias.

  ``hidden_bias=False`` drops the biases of the hidden Linear layers (as the official Barlow Twins projector):
  BatchNorm in training mode subtracts them again, so the function is the same, but an adaptive optimiser
  (AdamW) would otherwise move them on rounding noise alone. ``batchnorm=False`` removes the hidden BatchNorms
  (the "no BN" ablations of VICReg's Table 8 and SimSiam's; the hidden Linear layers then keep their biases);
  ``output_bn`` adds a BatchNorm without offset after the last Linear, without scale (SimSiam's projector) or, with
  ``output_scale``, with a learnt scale (SimCLR v1's head: ``batch_norm_relu(center=False)``, scale initialised to
  1). ``output_bias`` gives the last Linear a bias, initialised as PyTorch's (SwAV's projector, W-MSE's head,
  SimSiam's predictor). The predictors of BYOL and SimSiam are the same MLP.
  """
  spec: str
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  hidden_bias: bool = True
  batchnorm: bool = True
  output_bn: bool = False
  output_scale: bool = False
  output_bias: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    sizes = parse_mlp_spec(self.spec)

    def bn(x, name, scale=True, offset=True):
      return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                          use_scale=scale, use_bias=offset, axis_name=self.axis_name if train else None,
                          name=name)(x)

    for i, size in enumerate(sizes[:-1]):
      x = nn.Dense(size, use_bias=self.hidden_bias or not self.batchnorm, kernel_init=linear_init,
                   dtype=self.dtype, name=f'dense{i}')(x)
      x = nn.relu(bn(x, f'bn{i}') if self.batchnorm else x)
    x = nn.Dense(sizes[-1], use_bias=self.output_bias, kernel_init=linear_init,
                 bias_init=torch_bias_init(x.shape[-1]), dtype=self.dtype, name=f'dense{len(sizes) - 1}')(x)
    if self.output_bn and self.batchnorm:
      x = bn(x, 'bn_out', scale=self.output_scale, offset=False)
    return x.astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(‖x‖, eps)`` along the last axis (PyTorch's ``F.normalize``), written so that a zero row has the
  finite gradient of the clamped branch (differentiating the norm at 0 gives NaN)."""
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class Prototypes(nn.Module):
  """SwAV's prototypes: scores ``normalize(z) · c_k`` against ``num`` prototype vectors (a bias-free Linear,
  kernel [D, num]). The trainer renormalises each prototype to unit norm before every step
  (:func:`normalize_prototypes`), as the official code does in place."""
  num: int

  @nn.compact
  def __call__(self, z):
    return nn.Dense(self.num, use_bias=False, kernel_init=linear_init, name='dense')(l2_normalize(z))


def normalize_prototypes(params: dict) -> dict:
  """``params`` with each prototype (a column of ``params['prototypes']['dense']['kernel']``) of unit norm."""
  if 'prototypes' not in params:
    return params
  k = params['prototypes']['dense']['kernel']
  k = k / jnp.maximum(jnp.linalg.norm(k, axis=0, keepdims=True), 1e-12)
  return {**params, 'prototypes': {'dense': {'kernel': k}}}


class SSLModel(nn.Module):
  """Backbone followed by projector, and the method's optional heads on the embedding: a ``predictor`` (BYOL,
  SimSiam) and ``prototypes`` (SwAV).

  ``model(x)`` returns ``(representation h, embedding z)``; ``model(x, heads=True)`` returns ``(h, z, extra)``
  with ``extra['p']`` the prediction and ``extra['scores']`` the prototype scores, where the model has them.

  ``x`` may also be a tuple of image batches of different sizes (multi-crop's resolution groups): the backbone
  runs once per group (its BatchNorm statistics over that group's rows), the representations are concatenated
  in order, and projector and heads run once over all of them (their BatchNorm over every row), as the official
  SwAV's ``forward`` (facebookresearch/swav@06b1b7c:src/resnet50.py:L308-L323).
  """
  backbone: nn.Module
  projector: nn.Module
  predictor: Optional[nn.Module] = None
  prototypes: Optional[nn.Module] = None

  def __call__(self, x, train: bool = True, heads: bool = False):
    if isinstance(x, (tuple, list)):
      h = jnp.concatenate([self.backbone(group, train=train) for group in x], axis=0)
    else:
      h = self.backbone(x, train=train)
    z = self.projector(h, train=train)
    if not heads:
      return h, z
    extra = {}
    if self.predictor is not None:
      extra['p'] = self.predictor(z, train=train)
    if self.prototypes is not None:
      extra['scores'] = self.prototypes(z)
    return h, z, extra


class Head(nn.Module):
  """A linear classifier on representations (the evaluation jobs' head, the online probe): weights
  N(0, ``init_std``), bias 0 (official VICReg evaluate.py), computed in float32."""
  num_classes: int
  init_std: float = 0.01

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.init_std),
                    bias_init=nn.initializers.zeros, name='fc')(h.astype(jnp.float32))
