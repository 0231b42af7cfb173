"""Backbones (ResNets, the digits ConvNet) and the projector: shapes, official initialisation and padding, spec
parsing."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_collections

from vicreg_jax.models import backbones, heads, resnet


@pytest.mark.parametrize('arch,stem,size,width,out', [
    ('resnet18', 'small', 8, 0.25, 128),    # 16 → 128 channels after 4 stages
    ('resnet34', 'small', 16, 0.125, 64),
    ('resnet50', 'imagenet', 64, 0.0625, 128),  # bottleneck: 4 · (4 · 2³)
])
def test_backbone_output_dims(arch, stem, size, width, out):
  model = resnet.resnet(arch, width_multiplier=width, stem=stem)
  x = jnp.ones((2, size, size, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  h = model.apply(variables, x, train=False)
  assert h.shape == (2, out) and h.dtype == jnp.float32


def test_imagenet_stem_downsamples_by_32():
  model = resnet.resnet('resnet18', width_multiplier=0.0625, stem='imagenet')
  x = jnp.ones((1, 64, 64, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
  last = inter['intermediates']['stage4_block2']['__call__'][0]
  assert last.shape == (1, 2, 2, 32)


def test_last_bn_scale_of_every_residual_block_is_zero():
  model = resnet.resnet('resnet50', width_multiplier=0.0625)
  params = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)['params']
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  blocks = sorted({k.split('/')[0] for k in flat if k.startswith('stage')})
  assert len(blocks) == 16
  for b in blocks:
    bn_scales = sorted(k for k in flat if k.startswith(b + '/BatchNorm_') and k.endswith('/scale'))
    assert len(bn_scales) == 3
    last = flat[bn_scales[-1]]
    assert np.all(last == 0), b
    assert all(np.all(flat[k] == 1) for k in bn_scales[:-1])
  # With zero-initialised residual branches each block starts as the identity (+ ReLU) on its shortcut.


def test_projector_layers_follow_official_spec():
  proj = heads.Projector('64-64-32')
  variables = proj.init(jax.random.key(0), jnp.ones((4, 16)), train=False)
  p = variables['params']
  assert set(p) == {'dense0', 'bn0', 'dense1', 'bn1', 'dense2'}
  assert p['dense0']['kernel'].shape == (16, 64) and 'bias' in p['dense0']
  assert p['dense2']['kernel'].shape == (64, 32) and 'bias' not in p['dense2']
  z = proj.apply(variables, jnp.ones((4, 16)), train=False)
  assert z.shape == (4, 32)
  # PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  k = np.asarray(p['dense1']['kernel'])
  assert np.abs(k).max() <= 1 / np.sqrt(64) + 1e-6 and np.abs(k).max() > 0.8 / np.sqrt(64)


@pytest.mark.parametrize('spec', ['', '8192-x', '0-8', 'abc'])
def test_bad_projector_spec_raises_one_line(spec):
  with pytest.raises(ValueError, match='Projector spec'):
    heads.parse_mlp_spec(spec)


def test_unknown_arch_raises():
  with pytest.raises(ValueError, match='resnet50'):
    resnet.resnet('resnet51')


def test_strided_convolutions_pad_as_torchvision():
  """A 3×3 stride-2 convolution on an 8×8 input pads (1, 1) (torchvision), not Flax's 'SAME' (0, 1)."""
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
  conv = resnet.torch_conv(4, (3, 3), (2, 2), use_bias=False)
  variables = conv.init(jax.random.key(0), x)
  y = conv.apply(variables, x)
  k = variables['params']['kernel']
  dims = ('NHWC', 'HWIO', 'NHWC')
  torch_padded = jax.lax.conv_general_dilated(x, k, (2, 2), [(1, 1), (1, 1)], dimension_numbers=dims)
  same = jax.lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=dims)
  np.testing.assert_allclose(y, torch_padded, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(y) - np.asarray(same)).max() > 1e-2
  # The ResNet's strided block convolutions and its 7×7/2 stem use it.
  model = resnet.resnet('resnet18', width_multiplier=0.0625, stem='imagenet')
  variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)
  stem = jax.lax.conv_general_dilated(x[:, :, :, :3], variables['params']['stem_conv']['kernel'], (2, 2),
                                      [(3, 3), (3, 3)], dimension_numbers=dims)
  _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
  np.testing.assert_allclose(inter['intermediates']['stem_conv']['__call__'][0], stem, rtol=1e-5, atol=1e-6)


def test_convnet_backbone_from_config():
  model = ml_collections.ConfigDict(dict(arch='convnet', width_multiplier=0.5, stem='small', dtype='float32'))
  net = backbones.from_config(model)
  x = jnp.ones((3, 16, 16, 1))
  variables = net.init(jax.random.key(0), x, train=False)
  assert net.apply(variables, x, train=False).shape == (3, 64)  # 128 · 0.5 channels, mean-pooled
  shapes = {k: v['kernel'].shape for k, v in variables['params'].items() if k.startswith('conv')}
  assert shapes == {'conv0': (3, 3, 1, 16), 'conv1': (3, 3, 16, 32), 'conv2': (3, 3, 32, 64)}
  _, inter = net.apply(variables, x, train=False, capture_intermediates=True)
  assert inter['intermediates']['conv2']['__call__'][0].shape == (3, 4, 4, 64)  # strides 1-2-2


def test_projector_without_hidden_bias():
  p = heads.Projector('8-8-4', hidden_bias=False).init(jax.random.key(0), jnp.ones((4, 6)), train=False)['params']
  assert not any('bias' in p[f'dense{i}'] for i in range(3)) and 'bias' in p['bn0']


def test_zero_init_residual_false_starts_every_block_scale_at_one():
  """torchvision's default (SwAV, W-MSE): no block's last BatchNorm scale starts at 0."""
  model = resnet.resnet('resnet18', width_multiplier=0.0625, zero_init_residual=False)
  flat = flax.traverse_util.flatten_dict(model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)),
                                                    train=False)['params'], sep='/')
  scales = [v for k, v in flat.items() if k.startswith('stage') and k.endswith('/scale')]
  assert len(scales) == 8 * 2 + 3 and all(np.all(s == 1) for s in scales)  # 8 blocks × 2 BNs + 3 shortcut BNs


def test_projector_output_batchnorm_with_scale_and_output_bias():
  """SimCLR v1's head ends in a BatchNorm with a learnt scale and no offset (``center=False``); SwAV's projector
  and W-MSE's head end in a Linear with a bias (PyTorch's init, U(±1/sqrt(fan_in)))."""
  x = jax.random.normal(jax.random.key(1), (16, 6))
  simclr = heads.Projector('8-4', hidden_bias=False, output_bn=True, output_scale=True)
  variables = simclr.init(jax.random.key(0), x, train=False)
  assert set(variables['params']['bn_out']) == {'scale'} and np.all(variables['params']['bn_out']['scale'] == 1)
  variables['params']['bn_out']['scale'] = jnp.full((4,), 2.5)
  z, _ = simclr.apply(variables, x, train=True, mutable=['batch_stats'])
  plain, _ = heads.Projector('8-4', hidden_bias=False).apply(
      {'params': {k: v for k, v in variables['params'].items() if k != 'bn_out'},
       'batch_stats': {'bn0': variables['batch_stats']['bn0']}}, x, train=True, mutable=['batch_stats'])
  plain = np.asarray(plain, np.float64)
  want = 2.5 * (plain - plain.mean(0)) / np.sqrt(plain.var(0) + 1e-5)
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)

  swav = heads.Projector('8-4', output_bias=True)
  p = swav.init(jax.random.key(0), x, train=False)['params']
  b = np.asarray(p['dense1']['bias'])
  assert b.shape == (4,) and 0 < np.abs(b).max() <= 1 / np.sqrt(8)
  p['dense1']['bias'] = jnp.zeros((4,))
  stats = {'bn0': {'mean': jnp.zeros(8), 'var': jnp.ones(8)}}
  with_b = {**p, 'dense1': {**p['dense1'], 'bias': jnp.asarray(b)}}
  without, with_bias = (swav.apply({'params': q, 'batch_stats': stats}, x, train=False) for q in (p, with_b))
  np.testing.assert_allclose(with_bias - without, np.broadcast_to(b, (16, 4)), rtol=1e-5, atol=1e-6)


def test_heads_from_config_keys():
  """``model.projector_output_scale`` / ``projector_output_bias`` reach the projector (methods.projector), and
  ``simsiam.predictor_output_bias`` SimSiam's predictor; by default neither output Linear has a bias."""
  from vicreg_jax import config as schema
  from vicreg_jax import methods

  def params_of(module, width):
    return module.init(jax.random.key(0), jnp.ones((4, width)), train=False)['params']

  c = schema.base_config()
  c.model.update(projector='16-8', projector_hidden_bias=False, projector_output_bn=True)
  assert set(params_of(methods.projector(c, None, jnp.float32), 32)) == {'dense0', 'bn0', 'dense1'}
  c.model.update(projector_output_scale=True, projector_output_bias=True)
  p = params_of(methods.projector(c, None, jnp.float32), 32)
  assert set(p['bn_out']) == {'scale'} and set(p['dense1']) == {'kernel', 'bias'} and set(p['dense0']) == {'kernel'}
  c.method = 'simsiam'
  c.simsiam.predictor = '4'
  predictor = lambda: methods.get(c).heads(c, None, jnp.float32)['predictor']
  assert set(params_of(predictor(), 8)['dense1']) == {'kernel'}
  c.simsiam.predictor_output_bias = True
  assert set(params_of(predictor(), 8)['dense1']) == {'kernel', 'bias'}


def test_the_trainers_model_reads_the_backbone_and_head_keys():
  """step.build_model: ``model.zero_init_residual=False`` starts every block's last BatchNorm scale at 1, and the
  projector has the output bias and the output BatchNorm's scale the model keys ask for."""
  from vicreg_jax import config as schema
  from vicreg_jax import step as step_lib
  c = schema.base_config()
  c.model.update(arch='resnet18', width_multiplier=1 / 16, projector='16-8', zero_init_residual=False,
                 projector_output_bias=True, projector_output_bn=True, projector_output_scale=True)
  c.data.image_size = 32
  params = step_lib.build_model(c, None).init(jax.random.key(0), jnp.ones((2, 32, 32, 3)), train=False)['params']
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  last = [v for k, v in flat.items() if k.startswith('backbone/stage') and k.endswith('BatchNorm_1/scale')]
  assert len(last) == 8 and all(np.all(v == 1) for v in last)
  assert set(params['projector']['dense1']) == {'kernel', 'bias'} and set(params['projector']['bn_out']) == {'scale'}
