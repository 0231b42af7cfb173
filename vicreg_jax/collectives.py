"""Cross-device sums for code written per device (``jax.shard_map``, ``jax.pmap``): ``psum``, ``pmean``, a
tiled ``all_gather`` and ``pmean_scatter`` (a reduce-scatter), in one of three modes (``config.reductions``); and
:func:`leaf_norm`, the norm of a parameter of which each device may hold only a block (:func:`sharded_leaves`).

- ``'native'`` (the default): ``jax.lax``'s own collectives. Their sums add the devices' values in an order the
  runtime chooses: in one process XLA:CPU adds them one way, across processes gloo another, on TPU the
  interconnect another. Float addition is not associative, so one process with 4 devices and two processes with
  2 each give results a few units in the last place apart, and training grows such differences.
- ``'ordered'``: every sum over devices is an all-gather, which only copies, followed by a left fold in device
  order, ``((x_0 + x_1) + x_2) + …``. The same program then gives bitwise the same sums on any split of the same
  devices into processes, provided each device's own values are bitwise the same: on CPU that needs the same
  intra-op thread pool in every process (XLA:CPU sizes it max(``PJRT_NPROC`` or the core count, local devices),
  and a convolution's weight gradient is summed in as many parts as the pool allows); benchmarks/
  reduction_layouts.py measures both.
- ``'reversed'``: the same fold in reverse device order. Mathematically the same step as the other two; what it
  changes against ``'ordered'`` is the rounding of every sum over devices, so the distance between the two runs
  is the noise floor of a comparison that cannot be exact (tests/test_multiprocess.py).

The backward passes follow the same rule, as the transposes of ``jax.lax``'s collectives (under ``shard_map``
with ``check_vma=False``): a ``psum``'s cotangent is ``psum``'d, a ``pmean``'s ``pmean``'d, an all-gather's
reduce-scattered. The gathered copies cost devices × the summed array in memory: the two folded modes are for
tests and debugging on small models, not for speed.

The mode applies while a per-device function is traced: put ``with collectives.mode(name):`` around its body.

A sharded optimiser (``optim.shard_state``, :mod:`vicreg_jax.step`) gives each device a block of some
parameters; the optimisers of :mod:`vicreg_jax.optim` take per-parameter norms with :func:`leaf_norm`, which inside
``with collectives.sharded_leaves(axis_name, sharded):`` is the norm of the whole parameter for a sharded one (the
devices' partial sums of squares added by :func:`psum`, so in the folded modes in device order too).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp

from vicreg_jax import errors

MODES = ('native', 'ordered', 'reversed')
_MODE = contextvars.ContextVar('vicreg_jax_reductions', default='native')
_SHARDED = contextvars.ContextVar('vicreg_jax_sharded_leaves', default=None)


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
  """Within the block, the functions of this module trace the reductions of mode ``name`` (one of
  :data:`MODES`)."""
  check(name)
  token = _MODE.set(name)
  try:
    yield
  finally:
    _MODE.reset(token)


def check(name: str) -> str:
  """``name`` if it is one of :data:`MODES`, else :class:`errors.ConfigError`."""
  if name not in MODES:
    raise errors.ConfigError(f'reductions must be one of {", ".join(MODES)}, not {name!r}')
  return name


def current_mode() -> str:
  return _MODE.get()


def _folded_sum(x: jax.Array, axis_name: str, reverse: bool) -> jax.Array:
  """Σ of ``x`` over the devices of ``axis_name``, added in device order or its reverse (all-gather, then a
  left fold)."""
  parts = jax.lax.all_gather(x, axis_name)  # [devices, *x.shape], bitwise copies
  order = range(parts.shape[0])[::-1] if reverse else range(parts.shape[0])
  total = parts[order[0]]
  for i in order[1:]:
    total = total + parts[i]
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _ordered_psum(x: jax.Array, axis_name: str, reverse: bool) -> jax.Array:
  return _folded_sum(x, axis_name, reverse)


def _ordered_psum_fwd(x, axis_name, reverse):
  return _folded_sum(x, axis_name, reverse), None


def _ordered_psum_bwd(axis_name, reverse, _, ct):
  return (_folded_sum(ct, axis_name, reverse),)  # jax.lax.psum's transpose is a psum


_ordered_psum.defvjp(_ordered_psum_fwd, _ordered_psum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _ordered_all_gather(x: jax.Array, axis_name: str, reverse: bool) -> jax.Array:
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _ordered_all_gather_fwd(x, axis_name, reverse):
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True), None


def _ordered_all_gather_bwd(axis_name, reverse, _, ct):
  # jax.lax.all_gather's transpose is a reduce-scatter: the sum of every device's cotangent, this device's rows.
  rows = ct.shape[0] // jax.lax.axis_size(axis_name)
  total = _folded_sum(ct, axis_name, reverse)
  return (jax.lax.dynamic_slice_in_dim(total, jax.lax.axis_index(axis_name) * rows, rows, axis=0),)


_ordered_all_gather.defvjp(_ordered_all_gather_fwd, _ordered_all_gather_bwd)


def psum(tree: Any, axis_name: str) -> Any:
  """``jax.lax.psum(tree, axis_name)``; in a folded mode every leaf summed in (reverse) device order."""
  if current_mode() == 'native':
    return jax.lax.psum(tree, axis_name)
  reverse = current_mode() == 'reversed'
  return jax.tree.map(lambda x: _ordered_psum(x, axis_name, reverse), tree)


def pmean(tree: Any, axis_name: str) -> Any:
  """``jax.lax.pmean(tree, axis_name)``; in a folded mode :func:`psum`'s sum over the device count (as
  ``jax.lax.pmean`` divides its psum)."""
  if current_mode() == 'native':
    return jax.lax.pmean(tree, axis_name)
  n = jax.lax.axis_size(axis_name)
  return jax.tree.map(lambda x: x / n, psum(tree, axis_name))


def all_gather(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Every device's ``x`` concatenated along axis 0 in device order (``x`` itself without an axis). The forward
  pass only copies; the backward pass sums the devices' cotangents (a reduce-scatter), folded in a folded
  mode."""
  if axis_name is None:
    return x
  if current_mode() == 'native':
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
  return _ordered_all_gather(x, axis_name, current_mode() == 'reversed')


def pmean_scatter(x: jax.Array, axis_name: str, dim: int) -> jax.Array:
  """This device's block along ``dim`` of ``pmean(x, axis_name)`` (blocks in device order, ``x.shape[dim]``
  divisible by the device count): ``jax.lax.psum_scatter`` tiled, over the device count. In a folded mode every
  device's block is gathered and added in (reverse) device order, bitwise the same as that block of
  :func:`pmean`. Not differentiable in the folded modes (the gradients' reduction needs no gradient)."""
  n = jax.lax.axis_size(axis_name)
  if current_mode() == 'native':
    return jax.lax.psum_scatter(x, axis_name, scatter_dimension=dim, tiled=True) / n
  size = x.shape[dim] // n
  parts = jax.lax.all_gather(x, axis_name)  # [devices, *x.shape], bitwise copies
  blocks = jax.lax.dynamic_slice_in_dim(parts, jax.lax.axis_index(axis_name) * size, size, axis=dim + 1)
  order = range(n)[::-1] if current_mode() == 'reversed' else range(n)
  total = blocks[order[0]]
  for i in order[1:]:
    total = total + blocks[i]
  return total / n


@contextlib.contextmanager
def sharded_leaves(axis_name: str, sharded: dict) -> Iterator[None]:
  """Within the block, :func:`leaf_norm` treats the leaf at each key path of ``sharded`` (a dict from every
  parameter's key path to whether each device of ``axis_name`` holds only a block of it) accordingly; a path
  missing from ``sharded`` is an error there (a transform that renamed the tree would otherwise get a block's
  norm)."""
  token = _SHARDED.set((axis_name, dict(sharded)))
  try:
    yield
  finally:
    _SHARDED.reset(token)


def leaf_norm(path: tuple, x: jax.Array) -> jax.Array:
  """The Frobenius norm of the parameter (or its update) ``x`` at key path ``path`` (``jnp.linalg.norm``); for
  a leaf that :func:`sharded_leaves` says is sharded, that of the whole array: the square root of the sum over the
  devices (:func:`psum`) of each block's sum of squares."""
  context = _SHARDED.get()
  if context is None:
    return jnp.linalg.norm(x)
  axis_name, sharded = context
  if path not in sharded:
    raise KeyError(f'leaf_norm: {jax.tree_util.keystr(path)} is not a parameter of the sharded optimiser')
  if not sharded[path]:
    return jnp.linalg.norm(x)
  return jnp.sqrt(psum(jnp.sum(x * x), axis_name))
