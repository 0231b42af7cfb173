"""The ViT backbones against timm (a golden file written by tests/data/make_timm_golden.py from timm's own
VisionTransformer on random weights) and MoCo v3's sin-cos table; their state dicts both ways; any input grid."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vicreg_jax import config as schema
from vicreg_jax import errors, methods
from vicreg_jax import step as step_lib
from vicreg_jax.models import backbones, timm_weights, vit
from vicreg_jax.models.torch_weights import StateDictError

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), 'data', 'timm_vit_golden.npz'))
CASES = {'vit_micro4': ('vit_micro4', 'learned', 16, 4), 'vit_micro4_sincos': ('vit_micro4', 'sincos', 16, 4),
         'vit_s16': ('vit_s16', 'learned', 224, 2)}  # as the generator's CASES


def _count(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('arch', ['vit_ti16', 'vit_s16', 'vit_b16'])
def test_parameter_counts_equal_timms(arch):
  model = vit.vit(arch, pos_embed='learned')  # timm's embedding is learned
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _count(shapes['params']) == int(GOLDEN[f'params_{arch}'])
  sincos = jax.eval_shape(lambda: vit.vit(arch).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  width = timm_weights.ARCHS[arch][1]
  assert _count(sincos['params']) == int(GOLDEN[f'params_{arch}']) - 197 * width  # the table is no parameter


@pytest.mark.parametrize('case', list(CASES))
def test_outputs_equal_timms_on_the_golden_weights(case):
  arch, pos, size, batch = CASES[case]
  sd = timm_weights.random_state_dict(arch, 0, pos, size)
  assert timm_weights.infer(sd) == (arch, pos, size)
  variables = timm_weights.from_timm(sd)
  x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)
  model = vit.vit(arch, pos_embed=pos, image_size=size)
  out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  ref = GOLDEN[f'{case}_output']
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err <= 1e-5, (case, err)
  # the golden's second block, to localise a failure: the class token there
  _, inter = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), capture_intermediates=True)
  block1 = np.asarray(inter['intermediates']['block1']['__call__'][0][:, 0])
  assert np.abs(block1 - GOLDEN[f'{case}_block1']).max() <= 1e-5 * np.abs(GOLDEN[f'{case}_block1']).max()


@pytest.mark.parametrize('grid,dim', [(14, 384), (4, 64), (6, 384), (2, 8)])
def test_sincos_table_is_moco_v3s(grid, dim):
  ref = GOLDEN[f'moco_sincos_{grid}x{grid}_{dim}']
  np.testing.assert_allclose(timm_weights.sincos_2d(grid, grid, dim), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize('pos', ['learned', 'sincos'])
def test_state_dicts_round_trip_and_keep_timms_keys(pos):
  sd = timm_weights.random_state_dict('vit_micro4', 3, pos, 16)
  variables = timm_weights.from_timm(sd)
  back = timm_weights.to_timm(variables, 'vit_micro4', pos, 16)
  assert list(back) == list(sd)  # timm's state_dict() order, so load_state_dict(strict=True) takes it
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  model = vit.vit('vit_micro4', pos_embed=pos, image_size=16)
  ours = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  assert jax.tree.map(np.shape, ours['params']) == jax.tree.map(np.shape, variables['params'])
  with_head = dict(sd, **{'head.weight': np.zeros((10, 64), np.float32), 'head.bias': np.zeros(10, np.float32)})
  assert _count(timm_weights.from_timm(with_head)) == _count(variables)  # the head is left out


def test_a_wrong_state_dict_is_one_sentence():
  sd = timm_weights.random_state_dict('vit_micro4', 0, 'learned', 16)
  del sd['blocks.3.mlp.fc2.bias']
  with pytest.raises(StateDictError, match='blocks.3.mlp.fc2.bias'):
    timm_weights.from_timm(sd)
  sd = timm_weights.random_state_dict('vit_micro4', 0, 'learned', 16)
  sd['norm.weight'] = np.ones(65, np.float32)
  with pytest.raises(StateDictError, match='norm.weight has shape'):
    timm_weights.from_timm(sd)


@pytest.mark.parametrize('pos', ['learned', 'sincos'])
def test_any_grid_runs_and_the_native_grid_is_unchanged(pos):
  model = vit.vit('vit_micro4', pos_embed=pos, image_size=16)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  small = jax.jit(model.apply)(variables, x)  # multi-crop's small crops: a 2×2 grid
  assert small.shape == (2, 64) and np.all(np.isfinite(small))
  if pos == 'learned':
    table = variables['params']['pos_embed']
    assert vit.resample_pos_embed(table, 4, 4) is table
    resampled = vit.resample_pos_embed(table, 2, 2)
    assert resampled.shape == (1, 5, 64)
    np.testing.assert_array_equal(resampled[:, 0], table[:, 0])  # the class token's row is kept


def test_patch_size_must_divide_the_image():
  model = vit.vit('vit_micro4', image_size=16)
  with pytest.raises(errors.ConfigError, match='divisible by 4'):
    model.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)))


def test_num_heads_is_a_model_key():
  c = schema.digits_config()
  c.model.update(arch='vit_s16', num_heads=12)
  model = backbones.from_config(c.model)
  assert model.num_heads == 12 and model.width == 384
  c.model.num_heads = 0
  assert backbones.from_config(c.model).num_heads == 6  # timm's
  c.model.num_heads = 7
  with pytest.raises(errors.ConfigError, match='7 heads'):
    backbones.from_config(c.model).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _decayed(config, arch='vit_micro4', pos='learned'):
  """Which of a ViT backbone's parameters the optimiser's weight decay touches: those whose first update from a
  small gradient changes when the decay goes from 0 to 1."""
  config.model.update(arch=arch, pos_embed=pos, pos_embed_size=16)
  config.data.image_size = 16
  model = backbones.from_config(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))['params']
  params = {'backbone': jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), shapes)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  def update(decay):
    config.optim.update(weight_decay=decay, base_lr=256.0 / config.batch_size, warmup_epochs=0)
    tx, _ = methods.make_optimizer(config, 10, 0, 10)
    return jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads)['backbone']

  differ = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), update(0.0), update(1.0))
  return {'/'.join(k.key for k in path) for path, d in jax.tree_util.tree_flatten_with_path(differ)[0] if d}


@pytest.mark.parametrize('optimiser', ['lars', 'lars_classic', 'larc', 'sgd', 'adam', 'adamw'])
def test_weight_decay_masks_on_a_vit(optimiser):
  """What each optimiser decays on a ViT. LARS in both orders (VICReg, Barlow Twins, BYOL; SimCLR) by the official
  VICReg rule ``exclude_bias_and_norm`` (ndim 1): the class token and a learned position embedding are decayed,
  as they would be on timm's ViT; LARC (SwAV), SGD (SimSiam) and Adam's coupled L2 (W-MSE) decay every parameter,
  as their official code; our AdamW also leaves the class token and position embedding out (timm's
  ``no_weight_decay``)."""
  config = schema.base_config()
  config.optim.name = optimiser
  decayed = _decayed(config)
  every = _decayed(_with_optimiser('sgd'))
  assert 'block0/qkv/kernel' in decayed and 'patch_embed/kernel' in decayed
  if optimiser in ('larc', 'sgd', 'adam'):
    assert decayed == every and 'block0/norm1/scale' in every and 'norm/bias' in every
  else:
    assert not any(k.endswith(('bias', 'scale')) for k in decayed)
    embeddings = {'cls_token', 'pos_embed'} & decayed
    assert embeddings == (set() if optimiser == 'adamw' else {'cls_token', 'pos_embed'})


def _with_optimiser(name):
  config = schema.base_config()
  config.optim.name = name
  return config


@pytest.mark.slow
@pytest.mark.parametrize('method', list(methods.METHODS))
def test_every_method_trains_a_vit(method):
  """Each method's digits config with ``vit_micro4`` (SwAV's with its 6×8² small crops through the same ViT): two
  steps on 8 devices give a finite loss and move every backbone parameter (but MoCo v3's frozen patch projection);
  VICReg's equal one device's."""
  from conftest import load_config, train_steps
  from vicreg_jax.data import pipeline
  config = load_config('digits' if method == 'vicreg' else f'digits_{method}')
  config.model.update(arch='vit_micro4', pos_embed_size=16, projector='32-32-32')
  config.update(batch_size=64, log_every_steps=1)
  config.final_probe.enabled = False
  for key, value in {'wmse': dict(projector='32-16', w_size=32), 'byol': dict(predictor='32'),
                     'simsiam': dict(predictor='16'), 'moco_v3': dict(predictor='32', predictor_output_bn=True),
                     'swav': dict(num_prototypes=12, freeze_prototypes_steps=1, queue_length=0)}.get(method, {}).items():
    config[method][key] = value
  if method == 'swav':  # multi-crop: 2 views of 16 px and 6 crops of 8 px (a 2×2 grid) through the same ViT
    config.augment.update(small_crops=6, on_device=True)
    config.model.views_together = True
    for view in (config.augment.view1, config.augment.view2):
      view['noise_std'] = 0.0  # the uint8 transfer would clip it
    config.augment.small_view.update(dict(config.augment.view1, crop_size=8, crop_scale=(0.2, 0.5), translate=1,
                                          cutout_p=0.0))
    schema.validate(config)
  batches = [b for _, b in zip(range(2), pipeline.pretrain_dataset(config).as_numpy_iterator())]
  assert method != 'swav' or batches[0]['small'].shape[1:4] == (6, 8, 8)
  state, metrics = train_steps(config, batches)
  assert np.isfinite(metrics['loss'])
  init = step_lib.init_state(config, step_lib.build_model(config, None), methods.make_optimizer(config, 10, 2)[0],
                             jax.random.key(0)).params['backbone']
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state.params['backbone'], init)
  still = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(moved) if v == 0]
  # MoCo v3 keeps its random patch projection (--stop-grad-conv1); everything else moves.
  assert still == (["['patch_embed']['bias']", "['patch_embed']['kernel']"] if method == 'moco_v3' else []), still
  if method == 'vicreg':
    # LARS, the official optimiser: under AdamW the qkv bias's key third and the final LayerNorm's bias (before
    # the projector's BatchNorm) have exactly zero gradient, and Adam turns its rounding noise into steps of ~lr.
    config.optim.name = 'lars'
    state, metrics = train_steps(config, batches)
    one, one_metrics = train_steps(config, batches, jax.devices()[:1])
    np.testing.assert_allclose(metrics['loss'], one_metrics['loss'], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), state.params, one.params)


def test_a_timm_vit_converts_into_a_workdir_the_linear_job_reads_and_back(tmp_path, capsys):
  """A MoCo v3-style checkpoint (``module.base_encoder.`` entries, a sin-cos pos_embed, a head) → a workdir whose
  config names the ViT and whose checkpoint the evaluation reader gives back (no batch_stats); exported again it is
  the same state dict (no head)."""
  import ml_collections
  from conftest import write_folder
  from vicreg_jax import checkpoints, convert_weights, parallel
  from vicreg_jax.evaluate import linear
  sd = timm_weights.random_state_dict('vit_micro4', 5, 'sincos', 16)
  wrapped = {f'module.base_encoder.{k}': v for k, v in sd.items()}
  wrapped['module.base_encoder.head.weight'] = np.zeros((8, 64), np.float32)
  np.savez(tmp_path / 'moco.npz', **wrapped)
  images = write_folder(tmp_path / 'images', {'a': 2, 'b': 2}, shape=(16, 16))
  pre = tmp_path / 'pre'
  status = convert_weights.main(['convert_weights', f'--torch={tmp_path / "moco.npz"}', f'--workdir={pre}',
                                 '--config.data.source=folder', f'--config.data.data_dir={images}',
                                 '--config.model.num_heads=4'])
  out, err = capsys.readouterr()
  assert status == 0, err
  assert 'the vit_micro4 backbone of' in out and 'head left out' in out, out
  pre_config = ml_collections.ConfigDict(linear._pretraining_config(str(pre)))
  assert (pre_config.model.arch, pre_config.model.pos_embed, pre_config.model.pos_embed_size) == (
      'vit_micro4', 'sincos', 16)
  outcome, restored = checkpoints.read_backbone(str(pre / 'checkpoints'), 1, parallel.make_mesh(), 10.0)
  assert outcome == checkpoints.READ and restored['batch_stats'] == {}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored['params']),
               timm_weights.from_timm(sd)['params'])
  status = convert_weights.main(['convert_weights', f'--from_workdir={pre}', f'--to_torch={tmp_path / "out.npz"}'])
  out, err = capsys.readouterr()
  assert status == 0 and 'timm state dict' in out, err
  with np.load(tmp_path / 'out.npz') as z:
    assert list(z.files) == list(sd) and all(np.array_equal(z[k], v) for k, v in sd.items())


def test_imagenet_vit_config_traces_its_train_step():
  """configs/imagenet_vit.py (ViT-S/16 with 12 heads, AdamW at 1.5e-4 × 2048/256 after 40 warmup epochs) builds its
  state and its whole train step lowers on ImageNet-shaped batches (32 px: a 2×2 grid of the sin-cos table)."""
  from conftest import load_config
  from vicreg_jax import parallel
  config = load_config('imagenet_vit')
  assert (config.model.arch, config.model.num_heads, config.optim.name, config.epochs) == ('vit_s16', 12, 'adamw', 300)
  _, schedule = methods.make_optimizer(config, 300 * 625, 40 * 625, 625)
  assert float(schedule(40 * 625)) == pytest.approx(1.5e-4 * 2048 / 256)
  config.model.projector = '64-64-64'
  config.update(batch_size=16, num_steps=2)
  config.data.image_size = 32
  tx, schedule = methods.make_optimizer(config, 10, 1)
  state = jax.eval_shape(lambda k: step_lib.init_state(config, step_lib.build_model(config, None), tx, k),
                         jax.random.key(0))
  assert _count(state.params['backbone']) == int(GOLDEN['params_vit_s16']) - 197 * 384
  step = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, parallel.make_mesh(),
                                  total_steps=10)
  view = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.uint8 if config.augment.on_device else jnp.float32)
  new_state, metrics, _ = step.lower(state, {'view1': view, 'view2': view,
                                             'label': jax.ShapeDtypeStruct((16,), jnp.int32)}).out_info
  assert {'loss', 'invariance', 'variance', 'covariance'} <= set(metrics)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
