"""BatchNorm whose cross-device statistics go through :mod:`vicreg_jax.collectives`.

The same computation and variables as ``flax.linen.BatchNorm`` (its defaults: statistics in float32 from the
mean and the mean of squares, the two averaged over ``axis_name`` in one collective; ``params`` ``scale`` and
``bias``, ``batch_stats`` ``mean`` and ``var``), so checkpoints and converted weights are unchanged. The one
difference: the average over devices is :func:`collectives.pmean`, which ``config.reductions='ordered'`` turns
into a sum in device order (Flax calls ``jax.lax.pmean`` itself).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
from flax.linen.dtypes import canonicalize_dtype
import jax
import jax.numpy as jnp

from vicreg_jax import collectives, errors


class BatchNorm(nn.Module):
  """Batch normalisation over every axis but the last. In training (``use_running_average=False``) the
  statistics are those of the batch (of every device of ``axis_name``), and the running averages move by
  ``1 - momentum`` towards them; otherwise the running averages normalise."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      mean, mean_sq = x32.mean(axes), jax.lax.square(x32).mean(axes)
      if self.axis_name is not None and not self.is_initializing():  # one collective for both, as Flax
        moments = collectives.pmean(jnp.stack([mean, mean_sq]), self.axis_name)
        mean, mean_sq = moments[0], moments[1]
      var = jnp.maximum(0.0, mean_sq - jax.lax.square(mean))  # E[x²] - E[x]² can round below 0
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    shape = (1,) * (x.ndim - 1) + (features,)  # the statistics broadcast over every axis but the last
    y = x - mean.reshape(shape)
    mul = jax.lax.rsqrt(var + self.epsilon).reshape(shape)
    args = [x]
    if self.use_scale:
      scale = self.param('scale', self.scale_init, (features,), jnp.float32)
      mul = mul * scale.reshape(shape)
      args.append(scale)
    y = y * mul
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (features,), jnp.float32)
      y = y + bias.reshape(shape)
      args.append(bias)
    return jnp.asarray(y, canonicalize_dtype(*args, dtype=self.dtype))


# --- ghost BatchNorm: fixed groups of rows by global position --------------------------------------------------

def check_ghost(batch_size: int, devices: int, size: int, key: str = 'classifier.ghost_batch_size') -> None:
  """One line (a ConfigError naming ``key``) unless ghost groups of ``size`` rows tile the global batch and the
  per-device batch (one of ``size`` and the per-device batch divides the other)."""
  local = batch_size // devices
  if batch_size % size or (local % size and size % local):
    raise errors.ConfigError(
        f'{key}={size} must divide batch_size={batch_size}, and it or the per-device batch '
        f'({local} on {devices} devices) must divide the other')


def ghost_apply(apply: Callable, x: jax.Array, size: int, axis: str):
  """``(outputs, batch_stats)`` of ``apply(rows) -> (outputs, batch_stats)`` (a network with BatchNorm in train
  mode and without a device axis, on rows of this device's ``x``) under ghost BatchNorm: the global batch in
  groups of ``size`` consecutive rows by global position (device ``d``'s rows are ``d·b … d·b + b - 1``), each
  normalised by its own statistics, whatever the device count: DDP without SyncBN at ``size`` images per GPU.
  Groups inside a device run as a batch of groups (``vmap``); a group spread over k devices is gathered and run
  on each of them, each keeping its own rows' outputs (so the parameters' gradients, summed over the devices, are
  those of the whole batch). ``batch_stats``: the first group's (DDP broadcasts rank 0's buffers), on every
  device. ``size`` and the per-device batch must tile (:func:`check_ghost`)."""
  b = x.shape[0]
  if b % size == 0:  # whole groups on this device
    out, stats = jax.vmap(apply)(x.reshape((b // size, size) + x.shape[1:]))
    out = jax.tree.map(lambda v: v.reshape((b,) + v.shape[2:]), out)
    first = jax.tree.map(lambda v: v[0], stats)
  else:  # size % b == 0: the group spans size // b devices
    k, me = size // b, jax.lax.axis_index(axis)
    rows = jax.lax.all_gather(x, axis, tiled=True)
    out, first = apply(jax.lax.dynamic_slice_in_dim(rows, (me // k) * size, size))
    out = jax.tree.map(lambda v: jax.lax.dynamic_slice_in_dim(v, (me % k) * b, b), out)
  return out, jax.tree.map(lambda v: jax.lax.all_gather(v, axis)[0], first)
