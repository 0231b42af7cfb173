"""Projector (expander) head, and the backbone + projector model the trainer uses."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

# PyTorch nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def parse_mlp_spec(spec: str) -> list[int]:
  """``'8192-8192-8192'`` → [8192, 8192, 8192]; raises a one-line ValueError on anything else."""
  try:
    sizes = [int(s) for s in str(spec).split('-')]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise ValueError(f'Projector spec {spec!r} must be positive sizes joined by "-", e.g. "8192-8192-8192".')
  return sizes


class Projector(nn.Module):
  """Official VICReg projector: (Linear-BN-ReLU) for every size but the last, then Linear without bias.

  ``hidden_bias=False`` drops the biases of the hidden Linear layers (as the official Barlow Twins projector):
  BatchNorm in training mode subtracts them again, so the function is the same, but an adaptive optimiser
  (AdamW) would otherwise move them on rounding noise alone.
  """
  spec: str
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  hidden_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True):
    sizes = parse_mlp_spec(self.spec)
    for i, size in enumerate(sizes[:-1]):
      x = nn.Dense(size, use_bias=self.hidden_bias, kernel_init=linear_init, dtype=self.dtype, name=f'dense{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                       axis_name=self.axis_name if train else None, name=f'bn{i}')(x)
      x = nn.relu(x)
    x = nn.Dense(sizes[-1], use_bias=False, kernel_init=linear_init, dtype=self.dtype,
                 name=f'dense{len(sizes) - 1}')(x)
    return x.astype(jnp.float32)


class SSLModel(nn.Module):
  """Backbone followed by projector; returns ``(representation, embedding)``."""
  backbone: nn.Module
  projector: nn.Module

  def __call__(self, x, train: bool = True):
    h = self.backbone(x, train=train)
    return h, self.projector(h, train=train)
