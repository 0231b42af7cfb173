"""The data-parallel layout: one mesh axis ``'data'`` over every device of every process.

:func:`make_mesh` and the shardings (the batch split over ``'data'``, or replicated); :func:`check_batch_size`;
:func:`global_array` / :func:`replicate` build global arrays from values every process holds in full,
:func:`gather` brings a global array (or per-process values) to every process, :func:`prefetch_to_device` keeps
batches ahead on the devices. Starting the processes is :mod:`vicreg_jax.distributed`'s, compiling
:mod:`vicreg_jax.compilation`'s.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vicreg_jax import errors

AXIS = 'data'


def make_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (None: all devices of all processes), in the order
  ``jax.make_mesh`` chooses for the hardware's topology (on TPU a ring through the torus's links, so a
  collective's neighbours are physical neighbours; on CPU and GPU the devices' own order). A process's devices
  need not be neighbours in it: :func:`jax.make_array_from_process_local_data` maps its rows to wherever its
  devices are."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'``."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """One-line error unless the global batch splits evenly over devices and processes."""
  n, pc = mesh.devices.size, jax.process_count()
  if global_batch % n or global_batch % pc:
    raise errors.ConfigError(f'batch_size {global_batch} must be divisible by the device count ({n}) and the '
                             f'number of processes ({pc}); set --config.batch_size to a multiple of {np.lcm(n, pc)}.')


def global_array(x, sharding) -> jax.Array:
  """The global array with value ``x`` (which every process holds in full) laid out by ``sharding``; each
  process places only its own shards (``jax.device_put`` would first compare ``x`` across processes)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def prefetch_to_device(batches: Iterator, size: int) -> Iterator:
  """``batches`` (global arrays), kept ``size`` ahead: each is placed on the devices (its host-to-device copy
  started) while earlier steps run, so the step finds its input there. ``size`` 0: as they come."""
  if size <= 0:
    yield from batches
    return
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of ``tree`` (the same on every process) as an array replicated over ``mesh``."""
  return jax.tree.map(lambda x: global_array(x, replicated(mesh)), tree)


def gather(tree: Any) -> Any:
  """Numpy copies on every process: a global array in full, a per-process value concatenated over processes
  (along axis 0, in process order)."""
  return multihost_utils.process_allgather(tree, tiled=True)
