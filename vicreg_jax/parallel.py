"""Processes, devices and data placement: one mesh axis ``'data'`` over every device of every process.

Start-up (:func:`initialize`): ``jax.distributed.initialize`` when the multi-process flags are given or JAX's
own cluster detection finds several processes (Cloud TPU VM slices, GKE, SLURM under ``srun``, Open MPI);
nothing on a single machine. Placement: :func:`global_array` / :func:`replicate` build global arrays from
values every process holds in full, :func:`gather` brings a global array (or per-process values) to every
process, :func:`share_from_process_0` hands process 0's decision (a JSON value) to the others.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from vicreg_jax import errors
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


class DistributedStartError(RuntimeError):
  """The processes of a multi-process job could not find each other; the message says what to check."""


# --- start-up -------------------------------------------------------------------------------------------------

def _detected_cluster() -> Optional[tuple[str, int]]:
  """(cluster name, number of processes) when JAX's cluster detection finds an environment with several
  processes, else None. A SLURM job step of several tasks not started by ``srun`` is an error: its processes
  would wait for peers that never come."""
  from jax._src import clusters  # JAX's detectors (the same that jax.distributed.initialize() consults)
  ntasks = int(os.environ.get('SLURM_NTASKS', '1') or 1)
  if os.environ.get('SLURM_JOB_ID') and ntasks > 1 and 'SLURM_STEP_NUM_TASKS' not in os.environ:
    raise DistributedStartError(
        f'SLURM_NTASKS={ntasks} but this process was not started by srun: run `srun python -m vicreg_jax.main '
        '...` (one task per node or per GPU), see launch/slurm_gpu.sbatch')
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
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
  mesh = make_mesh()

  def collectives(x):
    gathered = jax.lax.all_gather(x, AXIS, tiled=True)
    return (jax.lax.psum(x, AXIS).sum() + gathered.sum()
            + jax.lax.psum_scatter(gathered, AXIS, tiled=True).sum())

  x = jax.make_array_from_process_local_data(data_sharding(mesh), np.ones(jax.local_device_count(), np.float32))
  run = jax.jit(jax.shard_map(collectives, mesh=mesh, in_specs=P(AXIS), out_specs=P(), check_vma=False))
  jax.block_until_ready(run(x))


_START_HINT = ('check that every process was started with the same coordinator address and process count and '
               'that process 0 is reachable on that port; --distributed_init_timeout sets the wait')

# The filter passes this process's stderr through, except the distributed runtime's reports of a lost peer or
# coordinator: error lines of its coordination service (multi-line statuses, held back until it is clear they
# do not precede a fatal error), then a fatal line and a C++ stack trace, after which the runtime aborts the
# process. Those become one line. It runs as its own small process, so it still writes that line after this one
# has been aborted; a line of ours starting 'error: ' supersedes the held reports.
_FILTER = r"""
import re, sys
GLOG = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+?):\d+\] ')
RUNTIME = ('coordination_service', 'client.h', 'distributed', 'preemption')
out, held, fatal, trace, coordinator = sys.stdout, [], None, False, '?'
START_HINT = sys.argv[1]

def summary(text):
    if 'RegisterTask' in text or 'register' in text:
        return ('could not start the distributed run (coordinator ' + coordinator + ') within the start-up '
                'timeout: ' + START_HINT)
    if 'heartbeat' in text or 'unhealthy' in text:
        ids = re.findall(r'(?m)(?:task:|^\s*)(\d+)\s*$', text)
        who = 'process ' + ', '.join(ids) if ids else 'a process'
        return 'distributed run stopped: ' + who + ' stopped responding (crashed, killed or preempted); see its log'
    if 'leader' in text or 'Failed to send RPC' in text or 'Socket closed' in text:
        return ('distributed run stopped: lost the coordinator (process 0): it crashed, was preempted or cannot be '
                'reached; see its log')
    return 'distributed run stopped: ' + ' '.join(text.split())[:300]

for line in iter(sys.stdin.readline, ''):
    if fatal is not None:  # the process is being aborted: keep the status, drop the stack trace
        trace = trace or line.startswith('*** Check failure') or line.startswith('    @ ')
        if not trace:
            fatal.append(line)
        continue
    m = GLOG.match(line)
    if 'Connecting to JAX distributed service on ' in line:
        coordinator = line.split(' on ')[-1].strip()
    if m and line[0] in 'EF' and any(r in m.group(1) for r in RUNTIME):
        if line[0] == 'F':
            held, fatal = [], [line[m.end():]]
        else:
            held.append(line)
        continue
    if line.startswith('error: '):
        held = []
    elif held and not m:  # a continuation line of a held report
        held.append(line)
        continue
    out.writelines(held + [line])
    out.flush()
    held = []
if fatal is not None:
    out.write('error: ' + summary(''.join(fatal)) + '\n')
out.writelines(held)
out.flush()
"""


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


def install_error_filter() -> None:
  """Routes this process's stderr (fd 2) through :data:`_FILTER`, so that a lost peer or coordinator ends the
  run with one line, ``error: distributed run stopped: process 1 stopped responding ...``, instead of the
  runtime's status and C++ stack trace. For multi-process runs (called by :func:`initialize`); set
  ``VICREG_JAX_RAW_STDERR=1`` to see the runtime's own report."""
  if getattr(install_error_filter, 'done', False) or os.environ.get('VICREG_JAX_RAW_STDERR'):
    return
  sys.stderr.flush()
  original = os.dup(2)
  filt = subprocess.Popen([sys.executable, '-I', '-u', '-c', _FILTER, _START_HINT], stdin=subprocess.PIPE,
                          stdout=original, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
  os.close(original)
  os.dup2(filt.stdin.fileno(), 2)
  install_error_filter.done = True


# --- compilation: options and cache -------------------------------------------------------------------------

# XLA:CPU (jaxlib 0.10) hands convolutions, matrix products and reductions to YNNPACK. Its own (Eigen)
# convolutions ran this package's ResNet-18 step 1.7x as fast on an x86 CPU (README, "Speed"), so on CPU the
# package's programs keep YNNPACK for matrix products and reductions only.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
_compiler_options: dict = {}  # {'options': what compiler_options() decided}, once per process


def compiler_options() -> Optional[dict]:
  """The XLA options of the package's jitted programs on the default backend: :data:`CPU_COMPILER_OPTIONS` on
  CPU; None on accelerators, when ``XLA_FLAGS`` chooses the YNNPACK fusion types itself (the user's choice
  wins), or when this XLA does not know the option (checked once by compiling a tiny program with it)."""
  if 'options' not in _compiler_options:
    options = None
    if jax.default_backend() == 'cpu' and 'ynn_fusion_type' not in os.environ.get('XLA_FLAGS', ''):
      try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(np.float32(0)).compile()
        options = dict(CPU_COMPILER_OPTIONS)
      except Exception:  # pylint: disable=broad-except  # another XLA: its defaults then
        pass
    _compiler_options['options'] = options
  return _compiler_options['options']


def jit(fun: Callable, **kwargs) -> Callable:
  """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options`."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


_cache_hits = {'count': 0}


def _count_cache_hit(event: str, **kwargs) -> None:
  del kwargs
  if event == '/jax/compilation_cache/cache_hits':
    _cache_hits['count'] += 1


jax.monitoring.register_event_listener(_count_cache_hit)


def enable_compilation_cache(path: str, min_compile_seconds: float = 1.0) -> None:
  """JAX's persistent compilation cache in ``path`` (a directory, ``gs://`` allowed): a restart loads the
  compiled programs instead of compiling them again (minutes for a ResNet-50 step on a pod host). Programs that
  compiled in less than ``min_compile_seconds`` are not stored. :func:`compilation_cache_hits` counts loads."""
  from jax.experimental.compilation_cache import compilation_cache
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update('jax_compilation_cache_dir', path)
    compilation_cache.reset_cache()  # JAX reads the directory once, at the first compilation after this
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_seconds))


def compilation_cache_hits() -> int:
  """How many programs this process has loaded from the persistent compilation cache."""
  return _cache_hits['count']


# --- mesh and placement ---------------------------------------------------------------------------------------

def make_mesh() -> Mesh:
  """A 1-D mesh named ``'data'`` over all devices of all processes (process by process)."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


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


_shared = {'count': 0}


def share_from_process_0(compute: Callable[[], Any], timeout_seconds: float = 24 * 3600) -> Any:
  """``compute()`` on process 0, and its (JSON) value returned on every process: for decisions only one
  process may take (which checkpoint to read) and host-side results the others need (probe figures). The value
  travels through the distributed runtime's key-value store, so the others wait without a device collective.
  Every process must call it the same number of times, in the same order."""
  if jax.process_count() == 1:
    return compute()
  from jax._src import distributed  # the runtime's client; JAX has no public key-value API
  client = distributed.global_state.client
  _shared['count'] += 1
  key = f'vicreg_jax/share/{_shared["count"]}'
  if jax.process_index() == 0:
    value = compute()
    client.key_value_set(key, json.dumps(value))
    return value
  return json.loads(client.blocking_key_value_get(key, int(timeout_seconds * 1000)))


def exit_at_once(status: int = 1) -> None:
  """Ends this process now, without the runtime's orderly shutdown (which would wait for peers that may be
  blocked in a collective): they see it stop and end too. For an error on one process of several."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)
