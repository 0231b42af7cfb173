"""Device mesh and data-parallel plumbing: one mesh axis ``'data'`` over every device of every host."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Calls ``jax.distributed.initialize()`` on multi-host runs only (Cloud TPU pods, SLURM, or when the
  coordinator is named by ``JAX_COORDINATOR_ADDRESS``); a single machine never needs it."""
  multi_host = (os.environ.get('JAX_COORDINATOR_ADDRESS') or int(os.environ.get('SLURM_NTASKS', '1')) > 1
                or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0)
  if multi_host and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  """A 1-D mesh named ``'data'`` over all devices."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'``."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """One-line error unless the global batch splits evenly over devices and hosts."""
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(f'batch_size {global_batch} must be divisible by the device count ({n}); '
                     f'set --config.batch_size to a multiple of {n}.')
