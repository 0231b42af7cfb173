"""The self-supervised methods the trainer runs: one small record per method, chosen by ``config.method``.

Adding a method means its loss in :mod:`vicreg_jax.losses`, its section of keys in
:func:`vicreg_jax.defaults.base_config` (named like the method), its configs, and one line in :data:`METHODS`.
The train step (:mod:`vicreg_jax.train`) is written once: it embeds both views with the backbone and projector,
calls the method's loss on the two embeddings with the method's config section as keyword arguments, and
updates with the method's optimiser treatment.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import optax

from vicreg_jax import losses, optim


@dataclasses.dataclass(frozen=True)
class Method:
  """What the train step needs from a method.

  loss: ``loss(z_a, z_b, *, axis_name, **kwargs) -> (loss, metrics)``, global over ``axis_name``; ``metrics``
    holds ``loss`` and the method's terms.
  terms: the metrics shown in the progress line beside the loss.
  optimizer_keys: keys of the method's config section that set its optimiser treatment rather than the loss:
    ``bias_lr_factor`` multiplies the learning rate of biases and norm parameters (ndim == 1).
  """
  loss: Callable
  terms: tuple[str, ...]
  optimizer_keys: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    'vicreg': Method(losses.vicreg_loss, ('invariance', 'variance', 'covariance')),
    'barlow_twins': Method(losses.barlow_twins_loss, ('on_diagonal', 'off_diagonal'),
                           optimizer_keys=('bias_lr_factor',)),
}


def get(config: ml_collections.ConfigDict) -> Method:
  """The :class:`Method` named by ``config.method``."""
  if config.method not in METHODS:
    raise ValueError(f'Unknown method {config.method!r}: use one of {sorted(METHODS)}.')
  return METHODS[config.method]


def loss_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The keyword arguments of the method's loss: its config section without its optimiser keys."""
  method = get(config)
  return {k: v for k, v in config[config.method].items() if k not in method.optimizer_keys}


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int):
  """``(optimizer, schedule)``: ``config.optim.name`` ('lars', the official VICReg / Barlow Twins optimiser, or
  'adamw') on the warmup-cosine schedule, with the method's treatment of biases and norm parameters."""
  method = get(config)
  o = config.optim
  schedule = optim.lr_schedule(o.base_lr, config.batch_size, total_steps, warmup_steps, o.end_lr_factor)
  if o.name == 'lars':
    tx = optim.lars(schedule, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.eta)
  elif o.name == 'adamw':
    tx = optim.adamw(schedule, weight_decay=o.weight_decay)
  else:
    raise ValueError(f"Unknown optim.name {o.name!r}: use 'lars' or 'adamw'.")
  factor = config[config.method].get('bias_lr_factor', 1.0) if 'bias_lr_factor' in method.optimizer_keys else 1.0
  if factor != 1.0:
    tx = optax.chain(tx, optim.scale_bias_and_norm(factor))
  return tx, schedule
