"""The pretraining optimisers and learning-rate schedules.

LARS in the official VICReg order; LARC as NVIDIA apex (SwAV); SGD with momentum as PyTorch's (SimSiam); Adam with
PyTorch's coupled L2 weight decay (W-MSE); AdamW for small demos; the warmup-cosine and warmup-step schedules; and
:func:`frozen_for`, which keeps a group of parameters out of the optimiser for its first steps (SwAV's prototypes).

Every optimiser here works on blocks of parameters too (``optim.shard_state``: each device updates a block of
every parameter it can split): all of them are elementwise but for the per-parameter norms of LARS and LARC, which
are :func:`vicreg_jax.collectives.leaf_norm`'s, the whole parameter's norm when each device holds a block.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from vicreg_jax import collectives, errors


def lr_schedule(base_lr: float, global_batch: int, total_steps: int, warmup_steps: int,
                end_factor: float = 0.001, *, kind: str = 'cosine', start_factor: float = 0.0,
                warmup_linspace: bool = False, milestones: Sequence[int] = (),
                decay_factor: float = 0.1, steps_per_epoch: int = 1) -> optax.Schedule:
  """The learning rate at each step: a linear warmup to ``peak = base_lr·global_batch/256``, then ``kind``.

  Warmup (steps k < warmup_steps = W), from ``start = start_factor·peak``: ``start + (peak - start)·k/W`` (the
  official VICReg / Barlow Twins ``adjust_learning_rate``: peak reached at step W), or with ``warmup_linspace``
  ``start + (peak - start)·k/(W - 1)``, i.e. SwAV's ``np.linspace(start_warmup, base_lr, W)`` (the peak already
  at step W - 1); W-MSE's ``lr·(k + 1)/500`` is the latter with ``start_factor = 1/W``.
  After it, ``kind`` 'cosine': ``peak·q + end·(1 - q)`` with ``q = (1 + cos(π·t/(total - W)))/2``,
  ``t = step - W``, ``end = end_factor·peak`` (the official VICReg's, and SwAV's ``final_lr + (base_lr -
  final_lr)·(1 + cos(π·t/T))/2`` over its ``T = total - W`` iterations, the same formula and indexing), held at
  ``end`` past the last step; 'cosine_epochs': that cosine read at the first step of each epoch of
  ``steps_per_epoch`` and held through the epoch (SimSiam's ``adjust_learning_rate``, called once per epoch:
  ``init_lr·(1 + cos(π·epoch/epochs))/2``); 'step': ``peak·decay_factor^n``, n the number of ``milestones``
  (steps) at or before the step (PyTorch's ``MultiStepLR`` stepped once per epoch, as W-MSE: an epoch starting
  at a milestone runs at the lower rate).
  """
  peak = base_lr * global_batch / 256
  warmup_steps = max(int(warmup_steps), 0)
  warm = _warmup(peak, start_factor, warmup_steps, warmup_linspace)
  if kind in ('cosine', 'cosine_epochs'):
    after = _cosine(peak, peak * end_factor, warmup_steps, total_steps)
    if kind == 'cosine_epochs':
      cosine, epoch = after, max(int(steps_per_epoch), 1)
      after = lambda step: cosine(jnp.floor(step / epoch) * epoch)
  elif kind == 'step':
    after = _steps(peak, milestones, decay_factor)
  else:
    raise errors.ConfigError(f"Unknown optim.schedule {kind!r}: use 'cosine', 'cosine_epochs' or 'step'.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return jnp.where(step < warmup_steps, warm(step), after(step))

  return schedule


def _warmup(peak: float, start_factor: float, steps: int, linspace: bool) -> Callable:
  """``k -> start + (peak - start)·k/span`` with ``span`` W (or W - 1 for ``linspace``), at least 1."""
  start = peak * start_factor
  span = max(steps - 1 if linspace else steps, 1)
  return lambda step: start + (peak - start) * step / span


def _cosine(peak: float, end: float, warmup_steps: int, total_steps: int) -> Callable:
  """The cosine from ``peak`` at step ``warmup_steps`` to ``end`` at ``total_steps`` (held after it)."""
  decay_steps = max(int(total_steps) - warmup_steps, 1)

  def cosine(step):
    t = jnp.clip(step - warmup_steps, 0, decay_steps)
    q = 0.5 * (1 + jnp.cos(math.pi * t / decay_steps))
    return peak * q + end * (1 - q)

  return cosine


def _steps(peak: float, milestones: Sequence[int], factor: float) -> Callable:
  """``peak·factor^n``, n the number of ``milestones`` at or before the step."""
  def steps(step):
    n = sum((jnp.where(step >= m, 1, 0) for m in milestones), jnp.zeros((), jnp.int32))
    return peak * jnp.power(jnp.float32(factor), n)

  return steps


def exclude_bias_and_norm(params) -> optax.Params:
  """Mask that is True for weights (ndim > 1) and False for biases and norm scales/offsets (ndim == 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(learning_rate: optax.ScalarOrSchedule,
         weight_decay: float = 1e-6,
         momentum: float = 0.9,
         eta: float = 0.001,
         lr_in_momentum: bool = False) -> optax.GradientTransformation:
  """LARS as the official VICReg code applies it, built from optax transforms.

  For every weight (ndim > 1): ``dp = g + wd·p``; ``dp *= eta·‖p‖/‖dp‖`` (1 where either norm is 0).
  Biases and norm parameters keep ``dp = g``. Then for all: ``mu = momentum·mu + dp``; ``p -= lr·mu``.
  Unlike ``optax.lars`` the learning rate multiplies the momentum buffer, not the gradient, which differs
  whenever the schedule changes. ``lr_in_momentum``: ``mu = momentum·mu + lr·dp``; ``p -= mu`` instead, the
  official SimCLR's ``LARSOptimizer(classic_momentum=True)`` (and ``optax.lars``'s order).
  """
  scaling = [optax.masked(optax.add_decayed_weights(weight_decay), exclude_bias_and_norm),
             optax.masked(scale_by_trust_ratio(eta), exclude_bias_and_norm)]
  momentum_then_lr = [optax.trace(decay=momentum, nesterov=False), optax.scale_by_learning_rate(learning_rate)]
  return optax.chain(*scaling, *(momentum_then_lr[::-1] if lr_in_momentum else momentum_then_lr))


def scale_by_trust_ratio(trust: float) -> optax.GradientTransformation:
  """Each update ``u`` times ``trust·‖p‖/‖u‖`` of its parameter ``p`` (1 where either norm is 0):
  ``optax.scale_by_trust_ratio(trust_coefficient=trust, eps=0.0)``, with the norms of
  :func:`collectives.leaf_norm` (whole-parameter norms when each device holds a block)."""

  def scale(path, u, p):
    p_norm, u_norm = collectives.leaf_norm(path, p), collectives.leaf_norm(path, u)
    ratio = trust * p_norm / u_norm
    return u * jnp.where((p_norm == 0.0) | (u_norm == 0.0), jnp.array(1.0, p.dtype), ratio)

  def update(updates, state, params=None):
    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# A ViT's class token and learned position embedding (vicreg_jax/models/vit.py): timm's ``no_weight_decay()``.
EMBEDDINGS = ('cls_token', 'pos_embed')


def decay_weights_only(params) -> optax.Params:
  """Mask that is True for weights (ndim > 1) other than a ViT's :data:`EMBEDDINGS`: biases, norm parameters,
  the class token and the position embedding are not decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and getattr(path[-1], 'key', None) not in EMBEDDINGS, params)


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, scaled by the learning rate) with weight decay on weights only
  (:func:`decay_weights_only`: ndim > 1, a ViT's class token and position embedding excluded as timm's)."""
  return optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_weights_only)


def adamw_all(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.1) -> optax.GradientTransformation:
  """AdamW with weight decay on every parameter it updates: ``torch.optim.AdamW(model.parameters())``, MoCo v3's
  (facebookresearch/moco-v3@c349e6e:main_moco.py:L229-L230; biases, norms and the class token decayed too)."""
  return optax.adamw(learning_rate, weight_decay=weight_decay)


def scale_bias_and_norm(factor: float) -> optax.GradientTransformation:
  """Multiplies the final updates of biases and norm parameters (ndim == 1) by ``factor``: after
  :func:`lars`, whose learning rate is its last factor, the same as a learning rate ``factor·lr`` for them (the
  official Barlow Twins' second parameter group, lr-biases 0.0048 = 0.024 × lr-weights 0.2)."""
  return optax.masked(optax.scale(factor), lambda params: jax.tree.map(lambda p: p.ndim <= 1, params))


def sgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-4,
        momentum: float = 0.9, nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with momentum as PyTorch's (SimSiam's optimiser): ``dp = g + wd·p`` on every parameter (biases and norms
  too), ``mu = momentum·mu + dp``, ``p -= lr·mu`` (``nesterov``: ``p -= lr·(dp + momentum·mu)``)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=nesterov),
                     optax.scale_by_learning_rate(learning_rate))


def larc(learning_rate: optax.ScalarOrSchedule,
         weight_decay: float = 1e-6,
         momentum: float = 0.9,
         trust: float = 0.001,
         eps: float = 1e-8) -> optax.GradientTransformation:
  """NVIDIA apex's ``LARC(SGD(momentum, weight_decay), trust_coefficient=trust, clip=False)``, SwAV's optimiser.

  For **every** parameter (weights, biases, BatchNorm, prototypes) with ``‖p‖ ≠ 0`` and ``‖g‖ ≠ 0``:
  ``g ← (g + wd·p)·trust·‖p‖/(‖g‖ + wd·‖p‖ + eps)``; otherwise ``g`` unchanged and no weight decay that step (LARC
  takes the decay out of SGD). Then PyTorch's SGD: ``buf = momentum·buf + g`` (the first step ``buf = g``),
  ``p -= lr·buf``. Unlike :func:`lars` the decay enters the ratio's denominator as ``wd·‖p‖``, not ``‖g + wd·p‖``.
  """
  return optax.chain(_larc_scaling(weight_decay, trust, eps), optax.trace(decay=momentum, nesterov=False),
                     optax.scale_by_learning_rate(learning_rate))


def _larc_scaling(weight_decay: float, trust: float, eps: float) -> optax.GradientTransformation:
  """LARC's per-parameter rescaling of the gradient, weight decay included (see :func:`larc`)."""

  def rescale(path, g, p):
    p_norm, g_norm = collectives.leaf_norm(path, p), collectives.leaf_norm(path, g)
    adaptive = trust * p_norm / (g_norm + p_norm * weight_decay + eps)
    return jnp.where((p_norm != 0) & (g_norm != 0), (g + weight_decay * p) * adaptive, g)

  def update(updates, state, params=None):
    return jax.tree_util.tree_map_with_path(rescale, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adam(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-6) -> optax.GradientTransformation:
  """``torch.optim.Adam(lr, weight_decay=wd)`` (W-MSE's ``adam_l2``): the coupled L2 ``g + wd·p`` on every
  parameter, then Adam (β 0.9, 0.999, eps 1e-8, bias-corrected) and the learning rate. :func:`adamw` instead
  decays weights only and decoupled from the gradient's moments."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                     optax.scale_by_learning_rate(learning_rate))


class FrozenState(NamedTuple):
  """:func:`frozen_for`'s state: its calls so far and the wrapped optimiser's state."""
  count: jax.Array
  inner: optax.OptState


def frozen_for(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """``inner``, except that for its first ``steps`` calls the updates are zero and ``inner``'s state stays as it
  was: what PyTorch's optimisers do with a parameter whose ``grad`` is None (SwAV's frozen prototypes): no
  gradient, no weight decay, no momentum. From call ``steps`` on, ``inner`` runs as from its start, so a
  schedule inside it counts from there (:func:`vicreg_jax.methods.make_optimizer` shifts it by ``steps``)."""

  def init(params):
    return FrozenState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    active = state.count >= steps
    new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_inner, state.inner)
    return new_updates, FrozenState(optax.safe_increment(state.count), new_inner)

  return optax.GradientTransformation(init, update)
