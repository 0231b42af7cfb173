"""Step metrics as means over intervals of steps: summed on the device as the steps go, so that writing them
costs one device-to-host copy per interval, not one per step."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames='latest')
def _add(sums: Optional[dict], count, metrics: dict, finite, latest: tuple):
  """``sums`` plus ``metrics`` where the step was finite (keys in ``latest``: this step's value instead)."""
  if sums is None:
    sums = {k: jnp.zeros_like(v, jnp.float32) for k, v in metrics.items()}
    count = jnp.zeros((), jnp.int32)
  out = {k: (v.astype(jnp.float32) if k in latest else sums[k] + jnp.where(finite, v.astype(jnp.float32), 0.0))
         for k, v in metrics.items()}
  return out, count + finite.astype(jnp.int32)


def all_finite(loss, grads) -> jax.Array:
  """Whether the (global) loss and every gradient entry are finite: a step's ``finite`` metric."""
  return jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))


def keep_if_finite(finite, new, old):
  """``new`` if the step was finite, else ``old`` with only the step counter moved on (states with ``step`` and
  ``replace``): a bad step changes no parameter, statistic or optimiser state, so no checkpoint ever holds its
  NaNs (the host learns of it a step later, from ``metrics['finite']``: :class:`loop.NonFiniteGuard`)."""
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new.replace(step=old.step), old)
  return kept.replace(step=new.step)


class IntervalMean:
  """Accumulates each step's scalar metrics on the device; :meth:`take` returns their means over the steps added
  since the last take and starts a new interval. A step whose ``finite`` metric is False (an update the step
  dropped) is left out of the means; keys in ``latest`` (schedule values, such as the learning rate) are the
  last step's value, not a mean."""

  def __init__(self, latest: Sequence[str] = ()):
    self.latest = tuple(sorted(latest))
    self.steps = 0  # steps added since the last take (finite or not)
    self._sums, self._count = None, None
    self._pending = None

  def add(self, metrics: dict) -> None:
    metrics = dict(metrics)
    finite = jnp.asarray(metrics.pop('finite', True))
    self._sums, self._count = _add(self._sums, self._count, metrics, finite,
                                   tuple(k for k in self.latest if k in metrics))
    self.steps += 1

  def detach(self):
    """Ends the interval without waiting for its steps: its sums (still on the device, possibly being computed),
    for :meth:`means` later; the next step starts a new interval."""
    snapshot = (self._sums, self._count)
    self._sums, self._count, self.steps = None, None, 0
    return snapshot

  def means(self, snapshot) -> dict[str, float]:
    """The means of a :meth:`detach`'ed interval (empty if it had no step; NaN if none of them was finite); one
    copy from the device."""
    if snapshot[0] is None:
      return {}
    sums, count = jax.device_get(snapshot)
    n = int(count)
    return {k: float(v) if k in self.latest else (float(v) / n if n else float('nan')) for k, v in sums.items()}

  def take(self) -> dict[str, float]:
    """The means since the last take: :meth:`means` of :meth:`detach`."""
    return self.means(self.detach())

  def end(self, step: int) -> None:
    """Ends the interval at ``step`` without waiting for it; :meth:`pending` gives its means later (the loop
    waits for each step before the next one's actions, so one step later they cost no wait)."""
    self._pending = (step, self.detach())

  def pending(self) -> Optional[tuple[int, dict[str, float]]]:
    """``(step, means)`` of the interval :meth:`end` ended, once (None if there is none)."""
    if self._pending is None:
      return None
    (step, snapshot), self._pending = self._pending, None
    return step, self.means(snapshot)
