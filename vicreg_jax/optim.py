"""LARS in the official VICReg order, AdamW for small demos, and their warmup-cosine learning-rate schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def lr_schedule(base_lr: float, global_batch: int, total_steps: int, warmup_steps: int,
                end_factor: float = 0.001) -> optax.Schedule:
  """Linear warmup from 0 to ``peak = base_lr·global_batch/256``, then cosine to ``end_factor·peak``.

  Matches the official ``adjust_learning_rate``: lr(step) = peak·step/warmup during warmup, then
  peak·q + end·(1 - q) with q = (1 + cos(π·t/(total - warmup)))/2, t = step - warmup.
  """
  peak = base_lr * global_batch / 256
  end = peak * end_factor
  warmup_steps = max(int(warmup_steps), 0)
  decay_steps = max(int(total_steps) - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    t = jnp.clip(step - warmup_steps, 0, decay_steps)
    q = 0.5 * (1 + jnp.cos(math.pi * t / decay_steps))
    return jnp.where(step < warmup_steps, warm, peak * q + end * (1 - q))

  return schedule


def exclude_bias_and_norm(params) -> optax.Params:
  """Mask that is True for weights (ndim > 1) and False for biases and norm scales/offsets (ndim == 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(learning_rate: optax.ScalarOrSchedule,
         weight_decay: float = 1e-6,
         momentum: float = 0.9,
         eta: float = 0.001) -> optax.GradientTransformation:
  """LARS as the official VICReg code applies it, built from optax transforms.

  For every weight (ndim > 1): ``dp = g + wd·p``; ``dp *= eta·‖p‖/‖dp‖`` (1 where either norm is 0).
  Biases and norm parameters keep ``dp = g``. Then for all: ``mu = momentum·mu + dp``; ``p -= lr·mu``.
  Unlike ``optax.lars`` the learning rate multiplies the momentum buffer, not the gradient, which differs
  whenever the schedule changes.
  """
  return optax.chain(
      optax.masked(optax.add_decayed_weights(weight_decay), exclude_bias_and_norm),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta, eps=0.0), exclude_bias_and_norm),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, scaled by the learning rate) with weight decay on weights only (ndim > 1)."""
  return optax.adamw(learning_rate, weight_decay=weight_decay, mask=exclude_bias_and_norm)


def scale_bias_and_norm(factor: float) -> optax.GradientTransformation:
  """Multiplies the final updates of biases and norm parameters (ndim == 1) by ``factor``: after
  :func:`lars`, whose learning rate is its last factor, the same as a learning rate ``factor·lr`` for them (the
  official Barlow Twins' second parameter group, lr-biases 0.0048 = 0.024 × lr-weights 0.2)."""
  return optax.masked(optax.scale(factor), lambda params: jax.tree.map(lambda p: p.ndim <= 1, params))


def sgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-4,
        momentum: float = 0.9) -> optax.GradientTransformation:
  """SGD with momentum as PyTorch's (SimSiam's optimiser): ``dp = g + wd·p`` on every parameter (biases and norms
  too), ``mu = momentum·mu + dp``, ``p -= lr·mu``."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=False),
                     optax.scale_by_learning_rate(learning_rate))


def freeze(name: str, steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of the top-level subtree ``name`` for the first ``steps`` calls (SwAV keeps its
  prototypes fixed for the first iterations). Chained before and after an optimiser, the frozen parameters get
  neither gradient nor update."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    keep = state.count >= steps
    updates = {k: jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), v) if k == name else v
               for k, v in updates.items()}
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)
