"""Where two layouts of the same devices differ: one process with 4 CPU devices against two processes with 2 each
(``jax.distributed`` on localhost, gloo collectives), on the digits pretraining step of tests/test_multiprocess.py.

    python benchmarks/reduction_layouts.py [--devices=4] [--processes=2] [--config.key=value ...]

Each layout runs, from the same initial state and the same first global batch (compared first):
  1. every device's gradient at step 1 before the cross-device mean (the step's own per-device code up to its
     ``pmean``), with ``reductions`` 'native' (jax.lax's collectives inside the loss and BatchNorm) and
     'ordered' (all-gather, then a sum in device order: vicreg_jax/collectives.py);
  2. two whole steps (on that batch) with either (the first step's learning rate is 0).
It prints, per device, whether the two layouts' values are bitwise equal and their largest difference. Where
the local gradients of 'ordered' already differ, the devices' own computations differ and no order of the
reductions can make the two layouts equal.

Measured (2-core machine, jax 0.10.2): with nothing set, 'ordered' local gradients differ between the layouts
(by up to 2.4e-5 where the largest entry is 7.7): in every array with the test's two micro-batches, in only the
convolutions' weight gradients with one pass (``--config.grad_accum_steps=1 --config.model.remat=False``).
XLA:CPU sizes each process's intra-op thread pool max(cores or ``PJRT_NPROC``, local devices), 4 threads
against 2 here, and Eigen sums a convolution's weight gradient in as many parts as the pool allows (a lone
``jax.grad`` of a convolution on one device gives other bits in a process with 4 devices than in one with 2). With ``PJRT_NPROC=4`` (the pool's size in every process) they are
bitwise equal, and so are the parameters after the steps; 'native' ones still differ (gloo's order). The
script runs both: the pools as they come, then ``PJRT_NPROC`` set to the device count in every process.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The digits step of tests/test_multiprocess.py (its PRETRAIN flags that shape the step).
TEST_STEP = ['--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', '--config.batch_size=64',
             '--config.num_steps=24', '--config.optim.base_lr=0.01', '--config.optim.warmup_epochs=1',
             '--config.optim.name=lars', '--config.augment.on_device=True', '--config.augment.view1.noise_std=0.0',
             '--config.augment.view2.noise_std=0.0', '--config.model.remat=True', '--config.grad_accum_steps=2']


def worker(out_path: str, overrides: list[str]) -> None:
  """One process of a layout: writes (on process 0) the per-device local gradients and the stepped parameters."""
  import jax
  import jax.numpy as jnp
  from absl import flags
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec as P
  from ml_collections import config_flags

  from vicreg_jax import collectives, compilation, methods, parallel, runs, step
  from vicreg_jax.data import pipeline

  cfg = config_flags.DEFINE_config_file('config', os.path.join(REPO, 'configs', 'digits.py'))
  flags.FLAGS([sys.argv[0], *overrides])
  config = cfg.value
  mesh = parallel.make_mesh()
  axis = parallel.AXIS
  total, warmup, _ = runs.schedule_steps(config)
  tx, schedule = methods.make_optimizer(config, total, warmup)
  model = step.build_model(config)
  init = functools.partial(step.init_state, config, step.build_model(config, None), tx)
  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
  batch = next(pipeline.global_batches(pipeline.pretrain_dataset(config, 0, jax.process_index(),
                                                                 jax.process_count()), parallel.data_sharding(mesh)))
  method, kwargs = methods.get(config), methods.loss_kwargs(config)
  colour_ops = step._colour_ops(config) if config.augment.on_device else None  # pylint: disable=protected-access

  def local_gradients(reductions: str):
    def per_device(state, batch):
      with collectives.mode(reductions):
        if colour_ops is not None:
          batch = colour_ops(batch, state.step)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x6d6574), state.step)
        make_views = lambda z, out, params: step._views(z, out, params, target=None, key=key, extra={})  # noqa: E731
        objective = lambda views: method.objective(views, axis_name=axis, **kwargs)  # noqa: E731
        if config.grad_accum_steps > 1:
          grads, _ = step._accumulated_gradients(objective, model, state.params, state.batch_stats, batch,
                                                 make_views, config.model.remat, config.grad_accum_steps)
        else:
          grads, _ = step._gradients(objective, model, state.params, state.batch_stats, batch, make_views,
                                     config.model.remat)
        return jax.tree.map(lambda g: g[None], grads)

    f = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis), check_vma=False)
    return compilation.jit(f)(state, batch)

  results = {'batch': dict(batch)}
  for name in ('native', 'ordered'):
    results[f'local_{name}'] = local_gradients(name)
    config.reductions = name
    train_step = step.make_train_step(config, model, tx, schedule, mesh, total_steps=total)
    new_state = jax.tree.map(jnp.copy, state)
    for _ in range(2):  # the learning rate of step 1 is 0 (the warm-up starts there)
      new_state, _, _ = train_step(new_state, batch)
    results[f'step_{name}'] = new_state.params
  gathered = multihost_utils.process_allgather(results, tiled=True)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(gathered)}
    np.savez(out_path, **flat)


def run_layout(processes: int, devices: int, out_path: str, overrides: list[str], pool: str = '') -> None:
  """Runs the layout's processes; ``pool``: their ``PJRT_NPROC`` (XLA:CPU's thread pool size), '' to leave it."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'))
  if pool:
    env['PJRT_NPROC'] = pool
  procs = []
  for i in range(processes):
    dist = [f'--coordinator_address=localhost:{port}', f'--num_processes={processes}', f'--process_id={i}']
    procs.append(subprocess.Popen([sys.executable, __file__, '--worker', out_path, *(dist if processes > 1 else []),
                                   '--', *overrides], env=env, cwd=REPO))
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f'layout {processes}x{devices}: exit codes {codes}')


def compare(a: dict, b: dict, prefix: str) -> None:
  keys = [k for k in a if k.startswith(f"['{prefix}']")]
  n_dev = a[keys[0]].shape[0] if prefix.startswith('local') else 1
  for d in range(n_dev):
    pick = (lambda x: x[d]) if prefix.startswith('local') else (lambda x: x)
    diffs = [float(np.abs(pick(a[k]).astype(np.float64) - pick(b[k])).max()) for k in keys]
    equal = all(np.array_equal(pick(a[k]), pick(b[k])) for k in keys)
    scale = max(float(np.abs(pick(a[k])).max()) for k in keys)
    where = f'device {d}' if prefix.startswith('local') else ('all' if prefix == 'batch' else 'parameters')
    print(f'  {prefix:22s} {where:10s} bitwise equal: {str(equal):5s}  max |diff| {max(diffs):.3e}  '
          f'(largest entry {scale:.3e}; {sum(x > 0 for x in diffs)} of {len(keys)} arrays differ)')
    differ = [k[len(prefix) + 4:] for k, x in zip(keys, diffs) if x > 0]
    if differ and len(differ) < len(keys):
      print('      those that differ:', ', '.join(differ))


def main(argv: list[str]) -> None:
  devices, processes = 4, 2
  overrides = list(TEST_STEP)
  for arg in argv:
    if arg.startswith('--devices='):
      devices = int(arg.split('=')[1])
    elif arg.startswith('--processes='):
      processes = int(arg.split('=')[1])
    else:
      overrides.append(arg)
  if devices % processes:
    raise SystemExit('--devices must be a multiple of --processes')
  tmp = tempfile.mkdtemp(prefix='reduction_layouts_')
  # XLA:CPU's thread pools: as they come (max(cores, local devices): 4 threads against 2 on a 2-core machine),
  # then the same size in every process.
  for pool in (os.environ.get('PJRT_NPROC', ''), str(devices)):
    one, several = os.path.join(tmp, f'one{pool}.npz'), os.path.join(tmp, f'several{pool}.npz')
    run_layout(1, devices, one, overrides, pool)
    run_layout(processes, devices // processes, several, overrides, pool)
    a, b = dict(np.load(one)), dict(np.load(several))
    print(f'1 process x {devices} devices against {processes} processes x {devices // processes} devices, '
          f'PJRT_NPROC={pool or "unset"}:', flush=True)
    for prefix in ('batch', 'local_native', 'local_ordered', 'step_native', 'step_ordered'):
      compare(a, b, prefix)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--worker':
    out, rest = sys.argv[2], sys.argv[3:]
    split = rest.index('--')
    dist, overrides = rest[:split], rest[split + 1:]
    if dist:
      from vicreg_jax import distributed
      kv = dict(a[2:].split('=', 1) for a in dist)
      distributed.initialize(kv['coordinator_address'], int(kv['num_processes']), int(kv['process_id']))
    worker(out, overrides)
  else:
    main(sys.argv[1:])
