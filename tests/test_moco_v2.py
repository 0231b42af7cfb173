"""MoCo v2: the queue (random unit keys to start, the global batch's keys written after the loss), the constant
momentum, the key view shuffled across the devices under ghost BatchNorm, the recipes, the linear protocol and
the import of official checkpoints."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from conftest import convert_and_back, load_config, tiny_digits
from vicreg_jax import errors, losses, methods, parallel
from vicreg_jax import step as step_lib
from vicreg_jax.data import pipeline
from vicreg_jax.evaluate import protocols
from vicreg_jax.models import heads, norm, torch_weights

# Batch 64 in ghost groups of 16: 4 groups; on 8 devices (8 rows each) every group spans two devices.
TINY = {'model.projector': '32-16', 'model.projector_bn': False, 'model.projector_output_bias': True,
        'model.ghost_batch_size': 16, 'moco_v2.queue_length': 128, 'moco_v2.momentum': 0.9}


def _setup(config, devices):
  mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
  tx, schedule = methods.make_optimizer(config, 10, 2)
  state = step_lib.init_state(config, step_lib.build_model(config, None), tx, jax.random.key(0))
  step = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh, total_steps=10)
  return mesh, state, step


def _keys(config, target, view, step_index, devices, shuffle=True):
  """The step's keys of ``view`` (its rows in the original order) from the momentum encoder ``target``, on
  ``devices``: :func:`step._target_embeddings` as the train step calls it."""
  mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
  model = step_lib.build_model(config)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x736875), step_index)

  def body(target, view):
    (k,), stats = step_lib._target_embeddings(model, target, {'view2': view}, False, ('view2',),
                                              config.model.ghost_batch_size, key if shuffle else None)
    return k, stats

  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(parallel.AXIS), P()),
                    check_vma=False)
  return jax.device_get(jax.jit(f)(target, view))


def test_shuffled_keys_equal_a_ghost_batchnorm_pass_on_the_permuted_batch():
  """On 8 devices the key view is permuted across them (a permutation of the seed and the step), the momentum
  encoder runs with BatchNorm per group of 16 rows of the permuted batch, and each device gets its own rows'
  keys back: the same as one device running ghost BatchNorm on the permuted batch and un-permuting."""
  config = tiny_digits(method='moco_v2', **TINY)
  _, state, _ = _setup(config, jax.devices()[:1])
  target = jax.device_get(state.extra['target'])
  view = next(pipeline.pretrain_dataset(config).as_numpy_iterator())['view2']
  got, got_stats = _keys(config, target, view, 3, jax.devices())
  perm = np.asarray(jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x736875), 3), 0), 64))
  want, want_stats = _keys(config, target, view[perm], 3, jax.devices()[:1], shuffle=False)
  np.testing.assert_allclose(got, want[np.argsort(perm)], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_stats, want_stats)
  # The ghost pass depends on the grouping (so the shuffle changes the keys), the permutation on the step.
  unshuffled, _ = _keys(config, target, view, 3, jax.devices(), shuffle=False)
  assert np.abs(unshuffled - got).max() > 1e-3
  other_step, _ = _keys(config, target, view, 4, jax.devices())
  assert np.abs(other_step - got).max() > 1e-3


def test_the_queue_takes_the_global_batchs_keys_after_the_loss_and_the_momentum_is_constant():
  """Step 1: the momentum encoder (a copy of the online network at init) moves first, so it equals the initial
  online weights; its keys, normalised and in the batch's order, fill queue rows 0-63 and ``queue_ptr`` moves to
  64; the loss is the InfoNCE against the queue as it was before (its random unit keys). Step 2 writes rows
  64-127 and the pointer wraps to 0; m stays 0.9 (no cosine)."""
  config = tiny_digits(method='moco_v2', **TINY)
  mesh, state, step = _setup(config, jax.devices())
  queue0 = np.asarray(state.extra['queue'])
  assert queue0.shape == (128, 16) and int(state.extra['queue_ptr']) == 0
  np.testing.assert_allclose(np.linalg.norm(queue0, axis=1), 1.0, rtol=1e-6)
  host = jax.device_get(state)
  batches = [b for _, b in zip(range(2), pipeline.pretrain_dataset(config).as_numpy_iterator())]
  state, metrics, _ = step(jax.device_put(state, parallel.replicated(mesh)),
                           jax.device_put(batches[0], parallel.data_sharding(mesh)))
  after1 = jax.device_get(state)
  assert float(metrics['ema_decay']) == pytest.approx(0.9)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after1.extra['target']['params'],
               {k: host.params[k] for k in ('backbone', 'projector')})
  keys, _ = _keys(config, host.extra['target'] | {'params': after1.extra['target']['params']}, batches[0]['view2'],
                  0, jax.devices())
  np.testing.assert_allclose(after1.extra['queue'][:64], heads.l2_normalize(keys), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(after1.extra['queue'][64:], queue0[64:])
  assert int(after1.extra['queue_ptr']) == 64
  # The loss of step 1: the online network's queries of view 1 (ghost BatchNorm) against those keys and queue0.
  model = step_lib.build_model(config, None)
  q = [model.apply({'params': host.params, 'batch_stats': host.batch_stats}, batches[0]['view1'][g * 16:(g + 1) * 16],
                   train=True, mutable=['batch_stats'])[0][1] for g in range(4)]
  want, _ = losses.moco_v2_loss(np.concatenate(q), keys, queue0, temperature=0.2)
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)
  state, metrics, _ = step(state, jax.device_put(batches[1], parallel.data_sharding(mesh)))
  after2 = jax.device_get(state)
  assert float(metrics['ema_decay']) == pytest.approx(0.9) and int(after2.extra['queue_ptr']) == 0
  np.testing.assert_array_equal(after2.extra['queue'][:64], after1.extra['queue'][:64])
  assert np.abs(after2.extra['queue'][64:] - queue0[64:]).min() > 0
  moved = jax.tree.map(lambda t, o: 0.9 * t + 0.1 * o, after1.extra['target']['params'],
                       {k: after1.params[k] for k in ('backbone', 'projector')})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), after2.extra['target']['params'],
               moved)


def test_the_queue_and_ghost_groups_are_checked_at_start():
  with pytest.raises(errors.ConfigError, match='multiple of the global batch'):
    _setup(tiny_digits(method='moco_v2', **dict(TINY, **{'moco_v2.queue_length': 100})), jax.devices())
  with pytest.raises(errors.ConfigError, match='ghost_batch_size=24 must divide'):
    _setup(tiny_digits(method='moco_v2', **dict(TINY, **{'model.ghost_batch_size': 24})), jax.devices())
  with pytest.raises(errors.ConfigError, match='views_together=False'):
    _setup(tiny_digits(**{'model.ghost_batch_size': 16, 'model.views_together': True}), jax.devices())


def test_ghost_groups_tile_the_batch_in_either_direction():
  """Groups inside a device (vmap) and a group spread over devices (gathered) give the statistics of the same
  rows: the per-group means of a BatchNorm-free function are those of the rows by global position."""
  x = np.arange(64, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)

  def apply(rows):
    return rows - rows.mean(0), {'mean': rows.mean(0)}

  for size, devices in ((16, 8), (16, 2), (32, 8), (8, 8)):
    mesh = Mesh(np.asarray(jax.devices()[:devices]), (parallel.AXIS,))
    f = jax.shard_map(lambda v, size=size: norm.ghost_apply(apply, v, size, parallel.AXIS), mesh=mesh,
                      in_specs=P(parallel.AXIS), out_specs=(P(parallel.AXIS), P()), check_vma=False)
    out, stats = jax.device_get(jax.jit(f)(x))
    groups = x.reshape(64 // size, size, 3)
    np.testing.assert_allclose(out, (groups - groups.mean(1, keepdims=True)).reshape(64, 3))
    np.testing.assert_allclose(stats['mean'], groups[0].mean(0))


def test_recipes_hold_the_official_values():
  c = load_config('imagenet_moco_v2')
  assert (c.method, c.batch_size, c.epochs) == ('moco_v2', 256, 200)
  assert (c.model.arch, c.model.projector, c.model.projector_bn, c.model.projector_hidden_bias,
          c.model.projector_output_bias, c.model.projector_output_bn, c.model.zero_init_residual,
          c.model.ghost_batch_size, c.model.views_together) == (
              'resnet50', '2048-128', False, True, True, False, False, 32, False)
  assert (c.moco_v2.momentum, c.moco_v2.temperature, c.moco_v2.queue_length, c.moco_v2.shuffle_keys) == (
      0.999, 0.2, 65536, True)
  assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.momentum, c.optim.warmup_epochs,
          c.optim.end_lr_factor, c.optim.schedule) == ('sgd', 0.03, 1e-4, 0.9, 0, 0.0, 'cosine_epochs')
  for view in (c.augment.view1, c.augment.view2):
    assert (tuple(view['crop_scale']), view['crop_method'], tuple(view['jitter']), view['jitter_p'],
            view['gray_p'], view['blur_p'], tuple(view['blur_sigma']), view['solarize_p'], view['flip_p']) == (
                (0.2, 1.0), 'bilinear', (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, (0.1, 2.0), 0.0, 0.5)
  steps = 1_281_167 // 256
  _, schedule = methods.make_optimizer(c, 200 * steps, 0, steps)
  assert float(schedule(0)) == pytest.approx(0.03) and float(schedule(steps - 1)) == pytest.approx(0.03)
  assert float(schedule(100 * steps)) == pytest.approx(0.015, rel=1e-5)  # cos(π/2): half, held for the epoch
  digits = load_config('digits_moco_v2')
  assert digits.moco_v2.queue_length % digits.batch_size == 0 and digits.model.ghost_batch_size == 32
  state = step_lib.init_state(digits, step_lib.build_model(digits, None), methods.make_optimizer(digits, 10, 2)[0],
                              jax.random.key(0))
  assert 'predictor' not in state.params and set(state.extra['target']['params']) == {'backbone', 'projector'}
  assert 'bias' in state.params['projector']['dense0'] and 'bn0' not in state.params['projector']


def test_the_linear_protocol():
  resolved, line = protocols.resolve(load_config('imagenet_linear'), 'moco_v2', 'resnet50')
  cl = resolved.classifier
  assert (resolved.batch_size, resolved.epochs, cl.optimizer, cl.momentum, cl.head_lr, cl.scale_lr,
          cl.weight_decay, cl.lr_schedule, tuple(cl.lr_decay_epochs), cl.lr_decay_factor, cl.head_init_std,
          cl.report) == (256, 100, 'sgd', 0.9, 30.0, False, 0.0, 'step', (60, 80), 0.1, 0.01, 'best')
  assert 'Evaluation protocol moco_v2' in line


def test_an_official_checkpoint_imports_with_its_method(tmp_path, capsys):
  """MoCo v2's checkpoint layout (``state_dict`` with ``module.encoder_q.`` — its ``fc`` the MLP head —,
  ``module.encoder_k.``, ``module.queue``, ``module.queue_ptr``): the query encoder's backbone is taken."""
  sd = torch_weights.random_state_dict('resnet18', seed=5)
  ckpt = {f'module.encoder_q.{k}': v for k, v in sd.items()}
  ckpt.update({'module.encoder_q.fc.0.weight': np.ones((512, 512), np.float32),
               'module.encoder_q.fc.2.bias': np.zeros(128, np.float32),
               'module.queue': np.ones((128, 256), np.float32), 'module.queue_ptr': np.zeros(1, np.int64)})
  ckpt.update({f'module.encoder_k.{k}': v + 1 for k, v in sd.items()})
  pre, out = convert_and_back(tmp_path, ckpt, 'moco_v2', sd, capsys)  # the query encoder's, not the key encoder's
  assert 'module.encoder_q.' in out and 'moco_v2' in out, out
  assert json.loads((pre / 'config.json').read_text())['method'] == 'moco_v2'
