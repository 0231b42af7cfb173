"""MoCo v3: the momentum encoder (a copy of the online backbone and projector, moved inside the step before the
keys from the weights before the step's update), the heads, the frozen patch projection of a ViT, AdamW on every
parameter, the recipes, the linear protocol per backbone and the import of official checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import convert_and_back, load_config, tiny_digits
from vicreg_jax import losses, methods, parallel
from vicreg_jax import step as step_lib
from vicreg_jax.data import pipeline
from vicreg_jax.evaluate import protocols
from vicreg_jax.models import torch_weights

TINY = {'moco_v3.predictor': '32', 'moco_v3.momentum': 0.9, 'moco_v3.temperature': 0.2,
        'model.projector': '32-16', 'model.projector_hidden_bias': False, 'model.projector_output_bn': True}


def _setup(config, devices=1):
  mesh = Mesh(np.asarray(jax.devices()[:devices]), (parallel.AXIS,))
  tx, schedule = methods.make_optimizer(config, 10, 2)
  state = step_lib.init_state(config, step_lib.build_model(config, None), tx, jax.random.key(0))
  step = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh, total_steps=10)
  return mesh, state, step


def test_momentum_encoder_starts_as_a_copy_and_moves_before_the_keys_from_the_weights_before_the_update():
  """At the start the momentum encoder is the online backbone and projector (no predictor). From a state whose
  encoder differs from the online network: after one step the encoder is ``m₀·encoder + (1 - m₀)·online`` of the
  weights *before* the step's update, and the step's loss is the InfoNCE of the online predictions against the
  keys of that moved encoder (not of the old one)."""
  config = tiny_digits(method='moco_v3', **TINY)
  mesh, state, step = _setup(config)
  target = state.extra['target']
  assert set(target['params']) == {'backbone', 'projector'} and 'predictor' in state.params
  jax.tree.map(np.testing.assert_array_equal, target['params'],
               {k: state.params[k] for k in ('backbone', 'projector')})
  jax.tree.map(np.testing.assert_array_equal, target['batch_stats'],
               {k: state.batch_stats[k] for k in ('backbone', 'projector')})
  # The heads: Linear without bias, BatchNorm; the projector's output BatchNorm without affine parameters.
  assert 'bias' not in state.params['projector']['dense0'] and 'bias' not in state.params['predictor']['dense1']
  assert 'bn_out' not in state.params['projector'] and 'bn_out' in state.batch_stats['projector']
  assert 'bn_out' not in state.batch_stats['predictor']  # the ResNet's predictor: no final BatchNorm

  old = jax.tree.map(lambda p: 0.5 * p + 0.01, state.extra['target']['params'])
  state = state.replace(extra=dict(state.extra, target=dict(state.extra['target'], params=old)))
  batch = next(pipeline.pretrain_dataset(config).as_numpy_iterator())
  host = jax.device_get(state)  # the step donates its input state
  online = host.params
  new_state, metrics, _ = step(jax.device_put(state, parallel.replicated(mesh)),
                               jax.device_put(batch, parallel.data_sharding(mesh)))
  m0 = float(methods.ema_decay(0.9, 0, 10))
  assert m0 == pytest.approx(0.9)
  moved = jax.tree.map(lambda t, o: t + (1 - m0) * (o - t), old, {k: online[k] for k in old})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(new_state.extra['target']['params']), moved)
  assert float(metrics['ema_decay']) == pytest.approx(m0)

  model = step_lib.build_model(config, None)

  @jax.jit
  def loss_with_keys_of(encoder):
    """The InfoNCE of the online predictions against the keys of ``encoder``, each view a training-mode pass."""
    out = {}
    for role, params, stats, heads in (('q', online, host.batch_stats, True),
                                       ('k', encoder, host.extra['target']['batch_stats'], False)):
      for name in ('view1', 'view2'):
        y, upd = model.apply({'params': params, 'batch_stats': stats}, batch[name], train=True, heads=heads,
                             mutable=['batch_stats'])
        stats = upd['batch_stats']
        out.setdefault(role, []).append(y[2]['p'] if heads else y[1])
    return losses.moco_v3_loss(*out['q'], *out['k'], temperature=0.2)[0]

  expected, stale = loss_with_keys_of(moved), loss_with_keys_of(old)
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
  assert abs(float(stale) - float(expected)) > 1e-3  # the test tells the two orders apart


def test_a_vits_patch_projection_stays_at_its_random_init_and_adamw_all_decays_every_parameter():
  """``freeze_patch_embed`` (--stop-grad-conv1): the ViT's patch projection neither moves nor decays, the rest
  trains; 'adamw_all' decays biases and norms (torch's AdamW on every parameter), 'adamw' does not."""
  config = load_config('digits_moco_v3')
  config.model.update(arch='vit_micro4', pos_embed_size=16)
  config.optim.update(name='adamw_all', weight_decay=0.5, warmup_epochs=0)
  tx, _ = methods.make_optimizer(config, 10, 0)
  params = {'backbone': {'patch_embed': {'kernel': jnp.ones((4, 4, 1, 8)), 'bias': jnp.ones((8,))},
                         'norm': {'bias': jnp.ones((8,))}},
            'projector': {'dense0': {'kernel': jnp.ones((8, 4))}}}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)  # no gradient: what moves is the weight decay
  assert float(jnp.abs(updates['backbone']['patch_embed']['kernel']).max()) == 0.0
  assert float(jnp.abs(updates['backbone']['patch_embed']['bias']).max()) == 0.0
  assert float(jnp.abs(updates['backbone']['norm']['bias']).min()) > 0  # decayed: every parameter
  assert float(jnp.abs(updates['projector']['dense0']['kernel']).min()) > 0
  config.optim.name = 'adamw'
  tx, _ = methods.make_optimizer(config, 10, 0)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates['backbone']['norm']['bias']).max()) == 0.0  # 'adamw': weights only
  config.moco_v3.freeze_patch_embed = False
  tx, _ = methods.make_optimizer(config, 10, 0)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates['backbone']['patch_embed']['kernel']).min()) > 0


def test_the_linear_protocol_follows_the_backbone():
  c = load_config('imagenet_linear')
  resnet, line = protocols.resolve(c, 'moco_v3', 'resnet50')
  vit, _ = protocols.resolve(c, 'moco_v3', 'vit_s16')
  for r in (resnet, vit):
    assert (r.batch_size, r.epochs, r.classifier.optimizer, r.classifier.momentum, r.classifier.weight_decay,
            r.classifier.lr_schedule, r.classifier.scale_lr, r.classifier.head_init_std) == (
                1024, 90, 'sgd', 0.9, 0.0, 'cosine', True, 0.01)
  assert (resnet.classifier.head_lr, vit.classifier.head_lr) == (0.1, 3.0)
  assert 'Evaluation protocol moco_v3' in line and 'head lr 0.1 x 1024/256' in line


def test_recipes_hold_the_official_values():
  vit, r50 = load_config('imagenet_moco_v3'), load_config('imagenet_moco_v3_r50')
  for c in (vit, r50):
    assert (c.method, c.batch_size) == ('moco_v3', 4096)
    assert (c.model.projector_hidden_bias, c.model.projector_output_bn, c.model.projector_output_scale,
            c.model.projector_output_bias) == (False, True, False, False)
    assert c.moco_v3.predictor == '4096' and not c.model.views_together
    for view, blur, solarize in ((c.augment.view1, 1.0, 0.0), (c.augment.view2, 0.1, 0.2)):
      assert (view['crop_method'], view['blur_p'], view['solarize_p'], tuple(view['jitter']), view['jitter_p'],
              view['gray_p'], view['blur_kernel_fraction']) == ('bilinear', blur, solarize, (0.4, 0.4, 0.2, 0.1),
                                                                0.8, 0.2, 0.0)
  assert (vit.model.arch, vit.model.num_heads, vit.model.pos_embed, vit.model.projector) == (
      'vit_s16', 12, 'sincos', '4096-4096-256')
  assert (vit.moco_v3.predictor_output_bn, vit.moco_v3.momentum, vit.moco_v3.temperature,
          vit.moco_v3.freeze_patch_embed) == (True, 0.99, 0.2, True)
  assert (vit.optim.name, vit.optim.base_lr, vit.optim.weight_decay, vit.optim.warmup_epochs, vit.epochs,
          vit.optim.end_lr_factor) == ('adamw_all', 1.5e-4, 0.1, 40, 300, 0.0)
  assert tuple(vit.augment.view1['crop_scale']) == (0.08, 1.0)
  assert (r50.model.arch, r50.model.projector, r50.model.zero_init_residual) == ('resnet50', '4096-256', True)
  assert (r50.moco_v3.predictor_output_bn, r50.moco_v3.momentum, r50.moco_v3.temperature) == (False, 0.996, 1.0)
  assert (r50.optim.name, r50.optim.base_lr, r50.optim.weight_decay, r50.optim.eta, r50.optim.momentum,
          r50.optim.warmup_epochs, r50.epochs, r50.optim.end_lr_factor) == (
              'lars', 0.3, 1.5e-6, 0.001, 0.9, 10, 1000, 0.0)
  assert tuple(r50.augment.view1['crop_scale']) == (0.2, 1.0)
  steps = 1_281_167 // 4096
  _, schedule = methods.make_optimizer(r50, 1000 * steps, 10 * steps)
  assert float(schedule(10 * steps)) == pytest.approx(4.8, rel=1e-6)


def test_an_official_resnet50_checkpoint_imports_with_its_method(tmp_path, capsys):
  """MoCo v3's ResNet checkpoint layout (``state_dict`` with ``module.base_encoder.`` — its ``fc`` the projector
  —, ``module.momentum_encoder.``, ``module.predictor.``): the base encoder's backbone is taken, the rest left
  out, and the workdir records moco_v3, whose linear protocol the evaluation then resolves."""
  from vicreg_jax import convert_weights
  from vicreg_jax.evaluate import linear
  sd = torch_weights.random_state_dict('resnet18', seed=3)
  ckpt = {f'module.base_encoder.{k}': v for k, v in sd.items()}
  ckpt.update({'module.base_encoder.fc.0.weight': np.ones((8, 512), np.float32),
               'module.base_encoder.fc.1.running_mean': np.zeros(8, np.float32),
               'module.predictor.0.weight': np.ones((8, 8), np.float32)})
  ckpt.update({f'module.momentum_encoder.{k}': v + 1 for k, v in sd.items()})
  pre, out = convert_and_back(tmp_path, ckpt, 'moco_v3', sd, capsys)  # the base encoder's, not the momentum one's
  assert "module.base_encoder." in out and 'moco_v3' in out, out
  saved = json.loads((pre / 'config.json').read_text())
  assert (saved['method'], saved['model']['arch']) == ('moco_v3', 'resnet18')
  pre_config = linear._pretraining_config(str(pre))
  resolved, _ = protocols.resolve(load_config('imagenet_linear'), pre_config['method'], pre_config['model']['arch'])
  assert resolved.classifier.head_lr == 0.1
  assert convert_weights._extension('r-50-1000ep.pth.tar') == '.pth'
