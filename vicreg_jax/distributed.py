"""Multi-process runs: start-up, failures, and what needs the distributed runtime's client.

Start-up (:func:`initialize`): ``jax.distributed.initialize`` when the multi-process flags are given or JAX's
own cluster detection finds several processes (Cloud TPU VM slices, GKE, SLURM under ``srun``, Open MPI);
nothing on a single machine; a bounded wait, then :class:`DistributedStartError`; CPU collectives opened while
the processes are in step. Failures: the stderr filter (:mod:`vicreg_jax._stderr_filter`) turns the runtime's
report of a lost peer into one line, :func:`lost_peer` recognises a collective that lost its peer,
:func:`exit_at_once` ends one process of several. :func:`share_from_process_0` hands process 0's decision (a
JSON value) to the others through the runtime's key-value store.

This is the package's only module that uses JAX's private modules (``jax._src``), for what JAX has no public
API for: its cluster detectors and the runtime's client. tests/test_distributed.py checks that each private
attribute used here still exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from vicreg_jax import _stderr_filter, parallel


class DistributedStartError(RuntimeError):
  """The processes of a multi-process job could not find each other; the message says what to check."""


# --- JAX's private API ----------------------------------------------------------------------------------------

def _cluster_types() -> list:
  """JAX's cluster detectors, in the order ``jax.distributed.initialize()`` consults them. Private:
  ``jax._src.clusters.ClusterEnv._cluster_types`` (each with ``opt_in_only_method``, ``is_env_present()``,
  ``get_process_count()``); JAX has no public API to ask whether (and how many) processes were detected
  without starting the runtime."""
  from jax._src import clusters  # private: JAX's cluster detectors (see the docstring)
  return list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access


def _runtime_client():
  """The distributed runtime's client (with ``key_value_set`` and ``blocking_key_value_get``). Private:
  ``jax._src.distributed.global_state.client``; JAX has no public key-value API (``jax.distributed`` exports
  only initialize, is_initialized and shutdown)."""
  from jax._src import distributed  # private: the runtime's client (see the docstring)
  return distributed.global_state.client


# --- start-up -------------------------------------------------------------------------------------------------

def _detected_cluster() -> Optional[tuple[str, int]]:
  """(cluster name, number of processes) when JAX's cluster detection finds an environment with several
  processes, else None. A SLURM job step of several tasks not started by ``srun`` is an error: its processes
  would wait for peers that never come."""
  ntasks = int(os.environ.get('SLURM_NTASKS', '1') or 1)
  if os.environ.get('SLURM_JOB_ID') and ntasks > 1 and 'SLURM_STEP_NUM_TASKS' not in os.environ:
    raise DistributedStartError(
        f'SLURM_NTASKS={ntasks} but this process was not started by srun: run `srun python -m vicreg_jax.main '
        '...` (one task per node or per GPU), see launch/slurm_gpu.sbatch')
  for env in _cluster_types():
    if env.opt_in_only_method:
      continue
    try:
      present = env.is_env_present()
    except Exception:  # a detector that cannot run here (e.g. no metadata server) does not apply
      present = False
    if present:
      count = env.get_process_count()
      return (env.__name__, count) if count > 1 else None
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, init_timeout: int = 300, heartbeat_timeout: int = 100) -> bool:
  """Starts JAX's distributed runtime when this is one process of several; returns whether it did.

  With ``coordinator_address`` ('HOST:PORT' of process 0), ``num_processes`` and ``process_id`` (all three or
  none) for clusters JAX cannot detect; otherwise when JAX's cluster detection finds a multi-process
  environment. ``init_timeout`` bounds the wait for the coordinator and for every peer at start-up (then
  :class:`DistributedStartError`); ``heartbeat_timeout`` is how long a silent peer may go unnoticed later,
  after which every process stops (the line of :func:`install_error_filter`).
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise DistributedStartError('give all three of --coordinator_address, --num_processes and --process_id, '
                                'or none of them')
  if jax.distributed.is_initialized():
    return True
  if all(given):
    if not 0 <= process_id < num_processes:
      raise DistributedStartError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
    if num_processes == 1:
      return False
    where = f'coordinator {coordinator_address} (process 0)'
  else:
    found = _detected_cluster()
    if found is None:
      return False
    where = f'the {found[0]} cluster of {found[1]} processes'
  install_error_filter()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(init_timeout),
                               heartbeat_timeout_seconds=int(heartbeat_timeout))
  except Exception as e:  # the runtime's errors are XlaRuntimeError with a multi-line status
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise DistributedStartError(
        f'could not start the distributed run ({where}) within {init_timeout} s ({reason}): ' + _START_HINT) from None
  if jax.default_backend() == 'cpu':
    _open_cpu_connections()
  return True


def _open_cpu_connections() -> None:
  """CPU collectives (gloo) connect the processes at the first collective that needs them, and give up if a
  peer comes more than 30 s later (still compiling, say). They are opened here, right after start-up, when the
  processes are in step; later collectives wait for a late peer as long as it takes."""
  mesh, axis = parallel.make_mesh(), parallel.AXIS

  def collectives(x):
    gathered = jax.lax.all_gather(x, axis, tiled=True)
    return (jax.lax.psum(x, axis).sum() + gathered.sum()
            + jax.lax.psum_scatter(gathered, axis, tiled=True).sum())

  x = jax.make_array_from_process_local_data(parallel.data_sharding(mesh),
                                             np.ones(jax.local_device_count(), np.float32))
  run = jax.jit(jax.shard_map(collectives, mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False))
  jax.block_until_ready(run(x))


_START_HINT = ('check that every process was started with the same coordinator address and process count and '
               'that process 0 is reachable on that port; --distributed_init_timeout sets the wait')


# --- failures -------------------------------------------------------------------------------------------------

def install_error_filter() -> None:
  """Routes this process's stderr (fd 2) through :mod:`vicreg_jax._stderr_filter`, so that a lost peer or
  coordinator ends the run with one line, ``error: distributed run stopped: process 1 stopped responding ...``,
  instead of the runtime's status and C++ stack trace. For multi-process runs (called by :func:`initialize`);
  set ``VICREG_JAX_RAW_STDERR=1`` to see the runtime's own report.

  The filter runs by file path with ``-I``: standard library only, and this checkout's copy whatever
  ``PYTHONPATH`` or an installed package would have ``-m`` find."""
  if getattr(install_error_filter, 'done', False) or os.environ.get('VICREG_JAX_RAW_STDERR'):
    return
  sys.stderr.flush()
  original = os.dup(2)
  filt = subprocess.Popen([sys.executable, '-I', '-u', _stderr_filter.__file__, _START_HINT],
                          stdin=subprocess.PIPE, stdout=original, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
  os.close(original)
  os.dup2(filt.stdin.fileno(), 2)
  install_error_filter.done = True


_LOST_PEER = ('Connection closed by peer', 'Connection reset by peer', 'Gloo', 'Socket closed',
              'coordination service', 'heartbeat')


def lost_peer(error: BaseException) -> Optional[str]:
  """The one-line reason when ``error`` is the runtime's report of a collective whose peer went away (several
  processes only), else None: such an error is the other process's failure, not a bug here."""
  if not jax.distributed.is_initialized() or type(error).__name__ not in ('JaxRuntimeError', 'XlaRuntimeError'):
    return None
  text = str(error)
  if not any(k in text for k in _LOST_PEER):
    return None
  return ('distributed run stopped: another process stopped responding (crashed, killed or preempted); see its '
          f'log ({" ".join(text.split())[:160]})')


def exit_at_once(status: int = 1) -> None:
  """Ends this process now, without the runtime's orderly shutdown (which would wait for peers that may be
  blocked in a collective): they see it stop and end too. For an error on one process of several."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


# --- process 0's decisions ------------------------------------------------------------------------------------

_shared = {'count': 0}


def share_from_process_0(compute: Callable[[], Any], timeout_seconds: float = 24 * 3600) -> Any:
  """``compute()`` on process 0, and its (JSON) value returned on every process: for decisions only one
  process may take (which checkpoint to read) and host-side results the others need (probe figures). The value
  travels through the distributed runtime's key-value store, so the others wait without a device collective.
  Every process must call it the same number of times, in the same order."""
  if jax.process_count() == 1:
    return compute()
  client = _runtime_client()
  _shared['count'] += 1
  key = f'vicreg_jax/share/{_shared["count"]}'
  if jax.process_index() == 0:
    value = compute()
    client.key_value_set(key, json.dumps(value))
    return value
  return json.loads(client.blocking_key_value_get(key, int(timeout_seconds * 1000)))
