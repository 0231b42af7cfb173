"""Official VICReg / torchvision ResNet weights ↔ our Flax ResNet (vicreg_jax.models.torch_weights) and the
converter command (vicreg_jax.convert_weights): torchvision's own outputs on fixed weights (a golden file that
tests/data/make_torchvision_golden.py wrote with torchvision; no torch needed here), exact round trips, one-line
errors, and a converted workdir read by the linear-evaluation job's own loading code."""

import importlib.util
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config, write_folder
from vicreg_jax import checkpoints, convert_weights, errors, parallel, runs
from vicreg_jax.evaluate import linear, watch
from vicreg_jax.models import backbones, resnet, torch_weights

GOLDEN = pathlib.Path(__file__).parent / 'data' / 'torchvision_resnet50_golden.npz'
WEIGHT_SEED = 0  # as in make_torchvision_golden.py
TOLERANCE = 1e-4  # max abs; the golden outputs are O(1) (see test_flax_resnet_reproduces_torchvision)


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN) as z:
    return {k: z[k] for k in z.files}


def _forward(arch: str):
  """Jitted ``(variables, NCHW input) -> {'output', 'stem' (after the max-pool, NCHW), 'layer1'..'layer3' (space
  means)}`` of our ResNet (ImageNet stem, inference mode)."""
  model = resnet.resnet(arch, stem='imagenet')
  stages = torch_weights.ARCHS[arch][0]
  last = {f'stage{i + 1}_block{n}': f'layer{i + 1}' for i, n in enumerate(stages[:3])}

  @jax.jit
  def f(variables, x):
    out, state = model.apply(variables, jnp.transpose(x, (0, 2, 3, 1)), train=False,
                             capture_intermediates=lambda m, method: m.name in (*last, 'stem_bn'))
    inter = state['intermediates']
    stem = flax.linen.max_pool(jax.nn.relu(inter['stem_bn']['__call__'][0]), (3, 3), (2, 2), [(1, 1), (1, 1)])
    found = {v: inter[k]['__call__'][0].mean(axis=(1, 2)) for k, v in last.items()}
    return dict(found, output=out, stem=jnp.transpose(stem, (0, 3, 1, 2)))

  return f


def _same(a, b) -> bool:
  """The same tree (keys), and the same dtype, shape and values at every leaf."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_abs(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_flax_resnet_reproduces_torchvision(golden):
  """Our ResNet-50 and ResNet-18 with the converted weights compute what torchvision computes on them: the
  pooled 2048-d (512-d) output, each stage's output (its spatial mean) and ResNet-50's stem after the max-pool,
  within 1e-4 (max abs) of outputs of size O(1) (the output's std 0.39 and 0.50, max 2.4 and 3.5).
  The check can fail: the stem kernel with its spatial axes swapped misses by far more."""
  x = golden['input']
  for arch in ('resnet50', 'resnet18'):
    variables = torch_weights.from_torchvision(torch_weights.random_state_dict(arch, WEIGHT_SEED), arch)
    f = _forward(arch)
    got = jax.device_get(f(variables, x))
    want = {k[len(arch) + 1:]: v for k, v in golden.items() if k.startswith(arch + '_')}
    assert set(want) <= set(got) and 'output' in want
    assert got['output'].shape == want['output'].shape == (2, 2048 if arch == 'resnet50' else 512)
    assert 0.1 < want['output'].std() < 10  # O(1) outputs: an absolute tolerance means something
    for k, v in want.items():
      assert _max_abs(got[k], v) < TOLERANCE, (arch, k, _max_abs(got[k], v))
    if arch == 'resnet18':  # the same compiled function on wrong weights
      bad = jax.tree.map(np.copy, variables)
      bad['params']['stem_conv']['kernel'] = np.swapaxes(bad['params']['stem_conv']['kernel'], 0, 1)
      assert _max_abs(jax.device_get(f(bad, x))['output'], want['output']) > 100 * TOLERANCE


@pytest.mark.parametrize('arch,width', [('resnet18', 1.0), ('resnet34', 0.25), ('resnet50', 1.0),
                                        ('resnet101', 0.125), ('resnet152', 0.0625)])
def test_names_and_shapes_are_those_of_our_flax_resnet(arch, width):
  """The converted variables have exactly the tree (names, shapes, dtypes) that initialising our ResNet gives,
  and infer_arch recognises depth and width (also of the official resnet50x2 and resnet200x2)."""
  for official in ('resnet50', 'resnet200'):
    keys = {k: np.zeros(shape if k == 'conv1.weight' else 0) for k, shape, *_ in torch_weights.layout(official, 2)}
    assert torch_weights.infer_arch(keys) == (official, 2.0)
  sd = torch_weights.random_state_dict(arch, 1, width)
  assert torch_weights.infer_arch(sd) == (arch, width)
  variables = torch_weights.from_torchvision(sd, None)
  model = resnet.resnet(arch, width_multiplier=width, stem='imagenet')
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), dict(want)) == \
         jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  assert {k: v[0] for k, v in torch_weights.ARCHS.items()} == {k: tuple(v[0]) for k, v in resnet.ARCHS.items()
                                                                if k in torch_weights.ARCHS}


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_round_trips_are_exact(arch):
  """to_torchvision(from_torchvision(sd)) is sd: the same keys in torchvision's order (num_batches_tracked
  included), dtypes and values; and the other way round from our model's own variables."""
  sd = torch_weights.random_state_dict(arch, 2)
  variables = torch_weights.from_torchvision(sd, arch)
  back = torch_weights.to_torchvision(variables, arch)
  assert list(back) == list(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
  assert not any(np.shares_memory(variables['params']['stem_conv']['kernel'], v) for v in back.values())
  # fc (a torchvision classifier's) is ignored; without num_batches_tracked the rest is the same
  extra = dict(sd, **{'fc.weight': np.zeros((10, 2048), np.float32), 'fc.bias': np.zeros(10, np.float32)})
  plain = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  for other in (extra, plain):
    assert _same(torch_weights.from_torchvision(other, arch), variables)
  assert list(torch_weights.to_torchvision(variables, arch, num_batches_tracked=False)) == list(plain)
  # from the Flax side: random values in our model's own tree
  model = resnet.resnet(arch, stem='imagenet')
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  rng = np.random.default_rng(0)
  ours = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), dict(shapes))
  again = torch_weights.from_torchvision(torch_weights.to_torchvision(ours, arch), arch)
  assert _same(again, ours)


def _one_line_error(fn, match: str) -> str:
  with pytest.raises(torch_weights.StateDictError, match=match) as info:
    fn()
  msg = str(info.value)
  assert isinstance(info.value, errors.UserError) and '\n' not in msg and msg.endswith('.'), msg
  return msg


def test_a_state_dict_of_another_model_is_a_one_line_error():
  sd = torch_weights.random_state_dict('resnet18', 0)
  missing = {k: v for k, v in sd.items() if k != 'layer2.0.downsample.1.running_var'}
  _one_line_error(lambda: torch_weights.from_torchvision(missing, 'resnet18'),
                  r'^not a resnet18 state dict: 1 key\(s\) missing \(layer2\.0\.downsample\.1\.running_var\)\.$')
  wrong = dict(sd, **{'layer1.0.conv2.weight': np.zeros((64, 32, 3, 3), np.float32)})
  _one_line_error(lambda: torch_weights.from_torchvision(wrong, 'resnet18'),
                  r'layer1\.0\.conv2\.weight has shape \(64, 32, 3, 3\), expected \(64, 64, 3, 3\)')
  extra = dict(sd, **{'projector.0.weight': np.zeros((8, 512), np.float32)})
  _one_line_error(lambda: torch_weights.from_torchvision(extra, 'resnet18'), r'1 unexpected \(projector\.0\.weight\)')
  msg = _one_line_error(lambda: torch_weights.from_torchvision(sd, 'resnet34'), r'^not a resnet34 state dict: ')
  assert '80 key(s) missing' in msg and 'and 77 more' in msg  # 8 more blocks of 2 convolutions and 2 BatchNorms
  _one_line_error(lambda: torch_weights.from_torchvision(sd, 'resnet50'), 'missing')
  _one_line_error(lambda: torch_weights.infer_arch({'weight': sd['conv1.weight']}), 'no key conv1.weight')
  variables = torch_weights.from_torchvision(sd, 'resnet18')
  del variables['batch_stats']['stage3_block1']['proj_bn']
  _one_line_error(lambda: torch_weights.to_torchvision(variables, 'resnet18'),
                  r'Flax resnet18: 2 key\(s\) missing \(batch_stats/stage3_block1/proj_bn/mean, ')
  with pytest.raises(errors.ConfigError, match='Unknown architecture'):
    torch_weights.from_torchvision(sd, 'resnet19')


def _convert(argv, capsys) -> tuple[int, str, str]:
  status = convert_weights.main(['convert_weights', *argv])
  out, err = capsys.readouterr()
  return status, out, err


@pytest.mark.slow  # a linear job end to end, 9 s: the fast tier stays under 5 minutes
def test_converted_workdir_is_read_by_the_linear_job(tmp_path, capsys):
  """The command writes a workdir (here from an .npz of a ResNet-18 state dict) that the linear-evaluation job
  accepts: its config, last step and checkpoint list, and its own restore functions give back exactly the
  converted backbone variables, for the backbone the config names. Exported again, the state dict is the same."""
  sd = torch_weights.random_state_dict('resnet18', 3)
  np.savez(tmp_path / 'r18.npz', **sd)
  images = write_folder(tmp_path / 'images', {'a': 2, 'b': 2}, shape=(8, 8))
  pre = tmp_path / 'pre'
  status, out, err = _convert([f'--torch={tmp_path / "r18.npz"}', f'--workdir={pre}', '--config.data.source=folder',
                               f'--config.data.data_dir={images}'], capsys)
  assert status == 0, err
  assert out.count('\n') == 1 and out.startswith(f'Wrote {pre}: the resnet18 backbone of ') and \
         'checkpoint 1 ' in out and f'--config.pretrain_workdir={pre}' in out, out

  # what linear.run does with --config.pretrain_workdir=pre (evaluate/linear.py)
  cfg = load_config('imagenet_linear')
  pre_config = ml_collections.ConfigDict(linear._pretraining_config(str(pre)))
  assert (pre_config.model.arch, pre_config.model.width_multiplier, pre_config.model.stem,
          pre_config.model.dtype) == ('resnet18', 1.0, 'imagenet', 'float32')
  final_step, _, _ = runs.schedule_steps(pre_config)
  mngr = checkpoints.reader(str(pre / 'checkpoints'))
  assert final_step == 1 and watch.next_checkpoint(mngr, {}, cfg, final_step) == 1
  outcome, restored = checkpoints.read_backbone(str(pre / 'checkpoints'), 1, parallel.make_mesh(), 10.0)
  assert outcome == checkpoints.READ
  restored = jax.device_get(restored)
  want = torch_weights.from_torchvision(sd, 'resnet18')
  assert _same(restored, want)
  model = backbones.from_config(pre_config.model)
  h = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), train=False), restored)
  assert h.shape == (1, 512) and h.dtype == jnp.float32

  # again into the same workdir: refused; back out as a state dict (.npz, and .pth where torch is installed)
  status, _, err = _convert([f'--torch={tmp_path / "r18.npz"}', f'--workdir={pre}'], capsys)
  assert status == 1 and err.startswith('error: ') and 'already holds checkpoints' in err and err.count('\n') == 1
  status, out, err = _convert([f'--from_workdir={pre}', f'--to_torch={tmp_path / "out.npz"}'], capsys)
  assert status == 0 and 'checkpoint 1 of' in out, err
  with np.load(tmp_path / 'out.npz') as z:
    assert list(z.files) == list(sd) and all(np.array_equal(z[k], v) and z[k].dtype == v.dtype for k, v in sd.items())
  status, out, err = _convert([f'--from_workdir={pre}', f'--to_torch={tmp_path / "out.pth"}'], capsys)
  if importlib.util.find_spec('torch') is None:
    assert status == 1 and 'needs PyTorch' in err and err.count('\n') == 1
  else:
    assert status == 0, err
    pth, note = convert_weights.read_state_dict(str(tmp_path / 'out.pth'))
    assert note == '' and list(pth) == list(sd) and all(np.array_equal(pth[k], v) for k, v in sd.items())


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
  sd = torch_weights.random_state_dict('resnet18', 0)
  np.savez(tmp_path / 'r18.npz', **sd)
  for argv, status, match in [
      ([f'--torch={tmp_path / "r18.npz"}'], 2, 'pass either --torch=FILE --workdir=DIR'),
      ([f'--torch={tmp_path / "r18.npz"}', f'--workdir={tmp_path / "w"}', f'--from_workdir={tmp_path}'], 2,
       'pass either'),
      ([f'--torch={tmp_path / "nope.npz"}', f'--workdir={tmp_path / "w"}'], 1, 'no file .*nope.npz'),
      ([f'--torch={tmp_path / "r18.txt"}', f'--workdir={tmp_path / "w"}'], 1, "expected a .pth, .pth.tar, .pt or .npz file"),
      ([f'--torch={tmp_path / "r18.npz"}', f'--workdir={tmp_path / "w"}', '--arch=resnet50'], 1,
       'holds a resnet18 .*not the resnet50 that --arch names'),
      ([f'--torch={tmp_path / "r18.npz"}', f'--workdir={tmp_path / "w"}', '--config.model.nope=1'], 2,
       'unknown config key'),
      ([f'--from_workdir={tmp_path / "empty"}', f'--to_torch={tmp_path / "o.npz"}'], 1, 'has no config.json'),
  ]:
    got, out, err = _convert(argv, capsys)
    assert got == status and out == '' and err.count('\n') == 1 and err.startswith('error: '), (argv, err)
    assert __import__('re').search(match, err), (argv, err)
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_official_training_checkpoint_layout_is_unwrapped():
  """An official training checkpoint ({'epoch', 'model': {'module.backbone.*', 'module.projector.*'}}) gives the
  backbone's entries, with a note of what was left out."""
  sd = torch_weights.random_state_dict('resnet18', 0)
  wrapped = {'epoch': 100, 'model': {**{f'module.backbone.{k}': v for k, v in sd.items()},
                                     'module.projector.0.weight': np.zeros((4, 512), np.float32)}}
  got, note = convert_weights.backbone_entries(wrapped)
  assert list(got) == list(sd) and "under 'module.backbone.'" in note and 'module.projector.0.weight' in note
  plain, note = convert_weights.backbone_entries(sd)
  assert note == '' and _same(plain, sd)
