"""The sharded optimiser (``optim.shard_state``, ZeRO-1) on 8 simulated devices: the ordered reduce-scatter is the
block of the ordered mean, bit for bit; every optimiser of the trainer takes the same step sharded as replicated
(up to the order of the sums in LARS's and LARC's norms); the trainer's step over 10 LARS steps; the optimiser
state really split over the devices; checkpoints restored across the two layouts."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from conftest import tiny_digits
from vicreg_jax import checkpoints, collectives, methods, parallel, step as step_lib
from vicreg_jax.data import pipeline

DEVICES = 8


def mesh():
  return Mesh(np.asarray(jax.devices()[:DEVICES]), (parallel.AXIS,))


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('mode', collectives.MODES)
def test_pmean_scatter_is_this_devices_block_of_pmean(mode):
  """Device i's result is block i (along the scattered dimension) of the mean over devices; in the folded modes
  bitwise the same as :func:`collectives.pmean`'s block, so the sharded update keeps their guarantee."""
  x = jax.random.normal(jax.random.key(0), (DEVICES, 3, 4 * DEVICES)) * jnp.arange(1, 4 * DEVICES + 1)

  def per_device(x):
    with collectives.mode(mode):
      x = x[0]
      block = collectives.pmean_scatter(x, parallel.AXIS, 1)
      i = jax.lax.axis_index(parallel.AXIS)
      full = jax.lax.dynamic_slice_in_dim(collectives.pmean(x, parallel.AXIS), i * 4, 4, axis=1)
      return block[None], full[None]

  block, full = jax.jit(jax.shard_map(per_device, mesh=mesh(), in_specs=P(parallel.AXIS),
                                      out_specs=P(parallel.AXIS), check_vma=False))(x)
  expected = np.mean(np.asarray(x, np.float64), axis=0)  # [3, 32]
  got = np.concatenate(list(np.asarray(block)), axis=1)  # device i's block i, side by side
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  if mode != 'native':
    np.testing.assert_array_equal(np.asarray(block), np.asarray(full))


def test_shard_dim_is_the_largest_divisible_dimension():
  assert step_lib.shard_dim((3, 3, 64, 64), 8) == 2  # the first of equals
  assert step_lib.shard_dim((3, 3, 3, 64), 8) == 3
  assert step_lib.shard_dim((2048, 8192), 8) == 1
  assert step_lib.shard_dim((24, 16), 8) == 0
  assert step_lib.shard_dim((8192,), 8) == 0
  assert step_lib.shard_dim((5, 3), 8) is None and step_lib.shard_dim((), 8) is None
  assert step_lib.shard_dim((64, 64), 1) is None


def toy_params(seed: int = 0):
  """Every kind of leaf: convolution and dense kernels (split), biases (split), arrays no dimension of which 8
  divides (updated whole on every device), a predictor and prototypes for the methods that treat them apart."""
  shapes = {'backbone': {'conv': {'kernel': (3, 3, 4, 16)}, 'bn': {'scale': (16,), 'bias': (16,)},
                         'odd': {'kernel': (5, 3), 'bias': (6,)}},
            'projector': {'dense': {'kernel': (16, 24), 'bias': (24,)}},
            'predictor': {'dense': {'kernel': (24, 24), 'bias': (24,)}},
            'prototypes': {'kernel': (24, 12)}}
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s, np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))


def optimiser_steps(configs: dict, shard: bool, steps: int = 3) -> dict:
  """For each of ``configs`` (name: config) the toy parameters' state after ``steps`` steps of its optimiser on
  random per-device gradients (each device its own), replicated or sharded (``shard``); all in one program."""
  txs = {name: methods.make_optimizer(c, 20, 2)[0] for name, c in configs.items()}
  params = toy_params()
  states = {name: step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                                      opt_state=tx.init(params), probe_params={}, probe_opt_state={}, extra={})
            for name, tx in txs.items()}
  specs = {name: step_lib.state_specs(ml_collections.ConfigDict({'optim': {'shard_state': shard}}), state, DEVICES)
           for name, state in states.items()}
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: 0.1 * rng.standard_normal((steps, DEVICES) + p.shape, np.float32), params)

  def per_device(states, grads):
    def one_step(states, g):
      g = jax.tree.map(lambda x: x[0], g)  # this device's gradients of the step
      out = {}
      for name, state in states.items():
        p, opt_state, ok = step_lib._apply_gradients(txs[name], g, state.opt_state, state.params, jnp.float32(1.0),
                                                     parallel.AXIS, shard)
        out[name] = state.replace(params=p, opt_state=opt_state)
        assert ok.shape == ()
      return out, ok
    states, finite = jax.lax.scan(one_step, states, grads)
    return states, jnp.all(finite)

  out, finite = jax.jit(jax.shard_map(per_device, mesh=mesh(), in_specs=(specs, P(None, parallel.AXIS)),
                                      out_specs=(specs, P()), check_vma=False))(states, grads)
  assert bool(finite)
  return out


OPTIMISERS = {  # a config of each optimiser and of each method's treatment of its parameter groups
    'lars': {}, 'lars_classic': {'optim.name': 'lars_classic'}, 'larc': {'optim.name': 'larc'},
    'sgd': {'optim.name': 'sgd'}, 'adam': {'optim.name': 'adam'}, 'adamw': {'optim.name': 'adamw'},
    'swav_frozen_prototypes': {'method': 'swav', 'optim.name': 'larc', 'swav.freeze_prototypes_steps': 1},
    'barlow_bias_lr_factor': {'method': 'barlow_twins'},
    'simsiam_fixed_predictor_lr': {'method': 'simsiam', 'optim.name': 'sgd'},
}
# The LARS family with a trust coefficient large enough that the trust ratios matter.
TOY = {'optim.name': 'lars', 'optim.base_lr': 0.5, 'optim.eta': 0.02, 'optim.warmup_epochs': 0,
       'optim.weight_decay': 1e-3}


def test_every_optimiser_takes_the_same_step_sharded():
  """Three steps of each optimiser (:data:`OPTIMISERS`) sharded and replicated: the same parameters and optimiser
  state up to float rounding; the state's arrays split where a dimension allows, whole elsewhere."""
  configs = {name: tiny_digits(**{**TOY, **overrides}) for name, overrides in OPTIMISERS.items()}
  replicated, sharded = optimiser_steps(configs, False), optimiser_steps(configs, True)
  for name in OPTIMISERS:
    moved = max_diff(replicated[name].params, toy_params())
    diff = max_diff(sharded[name].params, replicated[name].params)
    print(f'{name}: max parameter difference {diff:.2e}, motion {moved:.2e}')
    assert moved > 1e-2 and diff <= 1e-6, name
    assert max_diff(sharded[name].opt_state, replicated[name].opt_state) <= 1e-5, name
    assert all(leaf.sharding.spec == P() for leaf in jax.tree.leaves(replicated[name].opt_state)), name
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded[name].opt_state) if leaf.ndim]
    assert any(parallel.AXIS in spec for spec in specs) and P() in specs, name  # (5, 3) and (6,) stay whole


def test_block_norms_alone_would_give_another_step(monkeypatch):
  """The check above can fail: LARS with each device's block norm instead of the whole parameter's (no psum)
  moves the parameters far more than float rounding."""
  configs = {'lars': tiny_digits(**TOY)}
  replicated = optimiser_steps(configs, False, steps=2)
  monkeypatch.setattr(collectives, 'leaf_norm', lambda path, x: jnp.linalg.norm(x))  # no psum over the blocks
  wrong = optimiser_steps(configs, True, steps=2)
  assert max_diff(wrong['lars'].params, replicated['lars'].params) > 1e-4


def trainer_state(config, mesh):
  """The trainer's initial state of ``config``, laid out by :func:`step.state_shardings`, and its optimiser."""
  tx, schedule = methods.make_optimizer(config, 10, 2)
  online = step_lib.make_probe(config, 10)
  init = functools.partial(step_lib.init_state, config, step_lib.build_model(config, None), tx, online_probe=online)
  key = jax.random.key(0)
  state = jax.jit(init, out_shardings=step_lib.state_shardings(config, mesh, jax.eval_shape(init, key)))(key)
  return state, tx, schedule, online


def trainer_steps(config, batches):
  mesh_ = mesh()
  state, tx, schedule, online = trainer_state(config, mesh_)
  step = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh_, online, total_steps=10)
  for batch in batches:
    state, metrics, _ = step(state, jax.device_put(batch, parallel.data_sharding(mesh_)))
    assert bool(metrics['finite'])
  return state


def test_ten_lars_steps_of_the_train_step_sharded_equal_replicated():
  """Acceptance: the trainer's step (tiny ConvNet, LARS) over 10 steps with and without ``optim.shard_state``:
  parameters within 1e-6; the momentum of every convolution and dense kernel split over the 8 devices (each
  holding 1/8 of it), in the parameters' own shapes."""
  config = tiny_digits(**{'optim.name': 'lars', 'optim.base_lr': 0.3, 'optim.warmup_epochs': 0})
  data = pipeline.pretrain_dataset(config).as_numpy_iterator()
  batches = [next(data) for _ in range(10)]
  replicated = trainer_steps(config, batches)
  config.optim.shard_state = True
  sharded = trainer_steps(config, batches)
  start, _, _, _ = trainer_state(config, mesh())
  moved, diff = max_diff(replicated.params, start.params), max_diff(sharded.params, replicated.params)
  print(f'10 LARS steps: max parameter difference sharded against replicated {diff:.2e}, motion {moved:.2e}')
  assert moved > 1e-3 and diff <= 1e-6
  assert max_diff(sharded.batch_stats, replicated.batch_stats) <= 1e-6
  kernels = jax.tree_util.tree_leaves_with_path(sharded.opt_state)
  kernels = [(jax.tree_util.keystr(k), x) for k, x in kernels if 'kernel' in jax.tree_util.keystr(k)]
  assert len(kernels) == 6  # the momentum of the 3 convolutions and the 3 dense layers
  for name, x in kernels:
    d = step_lib.shard_dim(x.shape, DEVICES)
    assert x.sharding.spec == P(*([None] * d), parallel.AXIS), name
    shard = list(x.shape)
    shard[d] //= DEVICES
    assert [tuple(s.data.shape) for s in x.addressable_shards] == [tuple(shard)] * DEVICES, name
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(sharded.params))


@pytest.mark.parametrize('save_sharded', [True, False], ids=['sharded_to_replicated', 'replicated_to_sharded'])
def test_checkpoints_restore_across_the_layouts(tmp_path, save_sharded):
  """A state saved with ``optim.shard_state`` restores with it off, and the other way round: the same arrays, in
  the layout of the restoring run."""
  config = tiny_digits(**{'optim.name': 'lars'})
  config.optim.shard_state = save_sharded
  saved, *_ = trainer_state(config, mesh())
  saved = saved.replace(opt_state=jax.tree.map(lambda x: x + 3, saved.opt_state))  # not the initial zeros
  mngr = checkpoints.manager(str(tmp_path / 'checkpoints'), 2)
  checkpoints.save(mngr, 3, saved)
  mngr.wait_until_finished()
  config.optim.shard_state = not save_sharded
  target, *_ = trainer_state(config, mesh())
  restored = checkpoints.restore_newest(mngr, target, str(tmp_path), 0.0)
  assert max_diff(restored, saved) == 0.0
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  assert any(x.sharding.spec != P() for x in jax.tree.leaves((restored if not save_sharded else saved).opt_state))
