"""Each method's own configs run: ``configs/digits.py --config.method=NAME`` and ``configs/imagenet_NAME.py`` on
mocked ImageNet (the end-to-end runs of minutes, in the slow tier)."""

import jax
import jax.numpy as jnp
import pytest

from conftest import checkpoint_arrays, load_config, max_abs_difference
from vicreg_jax import methods, parallel, train
from vicreg_jax import step as step_lib


def shrunk(name: str, data_dir: str):
  """``configs/NAME.py`` (its optimiser and state at their official settings) with its heads shrunk, a tiny
  ResNet-18 at 32 px, batch 16, two steps."""
  config = load_config(name)
  config.model.update(arch='resnet18', width_multiplier=1 / 16, projector='64-64-64')
  if 'predictor' in config[config.method]:
    config[config.method].predictor = '32'
  config.update(batch_size=16, num_steps=2, log_every_steps=1)
  config.data.update(shuffle_buffer=16, data_dir=data_dir, image_size=32)
  for view in (config.augment.view1, config.augment.view2):
    view['crop_size'] = 32
  config.augment.small_view['crop_size'] = 16  # SwAV's multi-crop: 2×32 + 6×16
  if config.method == 'wmse':
    config.wmse.update(projector='64-8', w_size=16)
  if config.method == 'swav':
    config.swav.update(num_prototypes=20, freeze_prototypes_steps=1)
  if config.model.ghost_batch_size:  # MoCo v2's groups of 32 rows: 8 of the 16 (each over 4 of 8 devices)
    config.model.ghost_batch_size = 8
  return config


IMAGENET_SPLITS = {'train': 1_281_167, 'validation': 50_000}


@pytest.mark.slow
def test_the_swav_imagenet_config_runs_on_mocked_tfds(tmp_path, mock_tfds):
  """SwAV's ImageNet config (prototypes frozen for a step, its queue) takes two steps on mocked ImageNet, end to
  end (VICReg's: test_train.py); the other methods' are traced below (compiling each costs ~40 s here)."""
  config = shrunk('imagenet_swav', str(tmp_path / 'tfds'))
  with mock_tfds('imagenet2012', tmp_path / 'tfds', IMAGENET_SPLITS, 32):
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 2
  state = checkpoint_arrays(tmp_path / 'run' / 'checkpoints' / '2' / 'default')
  assert set(methods.get(config).heads(config, None, None)) <= set(state['params'])


@pytest.mark.parametrize('name', ['imagenet_wmse', 'imagenet_simclr', 'imagenet_byol', 'imagenet_simsiam',
                                  'imagenet_moco_v3_r50', 'imagenet_moco_v2'])
def test_method_imagenet_configs_trace_their_train_step(name, tmp_path, mock_tfds):
  """Each method's ImageNet config builds its model, heads, optimiser and state, and its whole train step
  traces (every head's shape and the loss fit together) on ImageNet-shaped batches."""
  config = shrunk(name, str(tmp_path / 'tfds'))
  mesh = parallel.make_mesh()
  with mock_tfds('imagenet2012', tmp_path / 'tfds', IMAGENET_SPLITS, 32):
    tx, schedule = methods.make_optimizer(config, 10, 1)
    online = step_lib.make_probe(config, 1000)
    state = jax.eval_shape(lambda k: step_lib.init_state(config, step_lib.build_model(config, None), tx, k, online),
                           jax.random.key(0))
    step = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh, online, total_steps=10)
  view = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
  lowered = step.lower(state, {'view1': view, 'view2': view, 'label': jax.ShapeDtypeStruct((16,), jnp.int32)})
  new_state, metrics, _ = lowered.out_info
  assert set(methods.get(config).heads(config, None, None)) <= set(new_state.params)
  assert {'loss', 'finite', *methods.get(config).terms} <= set(metrics)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['wmse', 'simclr', 'simsiam'])
def test_every_method_trains_on_the_digits_config(name, tmp_path):
  """``--config=configs/digits.py --config.method=NAME`` (with a ×1/4 backbone and 3 steps): finite losses, and
  the parameters move. The other methods train on this config in test_train.py (the sharded step: Barlow Twins,
  BYOL, SwAV, MoCo v3, MoCo v2; the command line: VICReg) and test_multiprocess.py (MoCo v3, MoCo v2)."""
  c = load_config('digits')
  c.update(method=name, num_steps=3, log_every_steps=1, batch_size=128)
  c.model.width_multiplier = 0.25
  c.augment.on_device = False
  c.final_probe.enabled = False
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary['steps'] == 3
  state = checkpoint_arrays(tmp_path / 'checkpoints' / '3' / 'default')  # the loss was finite at every step
  tx, _ = methods.make_optimizer(c, 3, 0)
  init = step_lib.init_state(c, step_lib.build_model(c, None), tx, jax.random.key(c.seed)).params
  assert max_abs_difference(state['params'], init) > 1e-4
  assert set(methods.get(c).heads(c, None, jnp.float32)) <= set(state['params'])
  if name == 'byol':
    assert max_abs_difference(state['extra']['target']['params'], state['params']) > 1e-3
