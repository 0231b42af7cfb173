"""Each method's evaluation protocol as the evaluation jobs resolve it from a pretraining workdir of that method,
against the official values (written here from the official repositories and papers, issue 25 item 3); explicit
values win, 'none' keeps the config's; ghost BatchNorm the same on 8 devices as on 1; the classifier's optimisers
and schedules against NumPy transcriptions of PyTorch's, apex's and TensorFlow's updates."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from conftest import REPO, finetune_setup, load_config
from vicreg_jax import errors, parallel, runs
from vicreg_jax.evaluate import classifier, linear, protocols, watch
from vicreg_jax.models import backbones, norm

METHODS = ('vicreg', 'barlow_twins', 'byol', 'simclr', 'simsiam', 'swav', 'wmse')

# Linear protocols (the list, from each official repository; see vicreg_jax/evaluate/protocols.py).
SGD_COSINE = dict(optimizer='sgd', momentum=0.9, scale_lr=False, lr_schedule='cosine', head_init='normal',
                  head_init_std=0.01, crop='bilinear', resize='bilinear', cache=False)
LINEAR = {
    'vicreg': dict(SGD_COSINE, head_lr=0.02, weight_decay=1e-6, batch_size=256, epochs=100, report='best'),
    'barlow_twins': dict(SGD_COSINE, head_lr=0.3, weight_decay=1e-6, batch_size=256, epochs=100, report='best'),
    'byol': dict(optimizer='nesterov', momentum=0.9, head_lr=0.2, scale_lr=True, batch_size=4096, epochs=80,
                 weight_decay=0.0, lr_schedule='cosine_steps', head_init='haiku', crop='bicubic',
                 resize='bicubic', report='last', cache=False),
    'simclr': dict(optimizer='nesterov', momentum=0.9, head_lr=0.1, scale_lr=True, batch_size=4096, epochs=90,
                   weight_decay=1e-6, lr_schedule='cosine_steps', head_init='normal', head_init_std=0.0,
                   crop='bicubic', resize='bicubic', report='last', cache=False),
    'simsiam': dict(optimizer='larc', momentum=0.9, head_lr=0.1, scale_lr=True, batch_size=4096, epochs=90,
                    weight_decay=0.0, lr_schedule='cosine', report='best', cache=False),
    'swav': dict(SGD_COSINE, head_lr=0.3, weight_decay=1e-6, batch_size=256, epochs=100, report='best'),
    'wmse': dict(optimizer='adam', head_lr=1e-2, lr_schedule='exponential', lr_decay_factor=1e-4,  # 1e-2 to 1e-6
                 epochs=500, weight_decay=5e-6, batch_size=1000, head_init='torch', cache=True, report='last'),
}
# Semi-supervised (the whole network), by (method, percent of the labels): the published rows, then the chosen.
VICREG_SEMI = dict(optimizer='sgd', momentum=0.9, weight_decay=0.0, epochs=20, batch_size=256, lr_schedule='cosine',
                   batchnorm='ghost', report='best')
SWAV_SEMI = dict(optimizer='sgd', momentum=0.9, weight_decay=0.0, epochs=20, batch_size=256, lr_schedule='step',
                 lr_decay_epochs=[12, 16], lr_decay_factor=0.2, batchnorm='sync', report='best')
SIMCLR_SEMI = dict(optimizer='nesterov', momentum=0.9, backbone_lr=0.05, head_lr=0.05, scale_lr=True,
                   batch_size=4096, weight_decay=0.0, lr_schedule='cosine_steps', batchnorm='sync', report='last')
SEMI = {
    ('vicreg', 1): dict(VICREG_SEMI, backbone_lr=0.03, head_lr=0.08),
    ('vicreg', 10): dict(VICREG_SEMI, backbone_lr=0.01, head_lr=0.1),
    ('barlow_twins', 1): dict(VICREG_SEMI, backbone_lr=0.005, head_lr=0.5),
    ('swav', 1): dict(SWAV_SEMI, backbone_lr=0.02, head_lr=5.0, head_init='torch'),
    ('swav', 10): dict(SWAV_SEMI, backbone_lr=0.01, head_lr=0.2, head_init='torch'),
    ('simclr', 1): dict(SIMCLR_SEMI, epochs=60, head_init_std=0.0),
    ('simclr', 10): dict(SIMCLR_SEMI, epochs=30, head_init_std=0.0),
    # Barlow Twins 10%: the paper's appendix B.2 (one setting for 1% and 10%; the README's 1% backbone lr is 0.005)
    ('barlow_twins', 10): dict(VICREG_SEMI, backbone_lr=0.002, head_lr=0.5, lr_schedule='step',
                               lr_decay_epochs=[12, 16], lr_decay_factor=0.2),
    # chosen where the source gives a sweep or no row (protocols.py says so): BYOL (appendix C.1: Nesterov, batch
    # 1024, no decay; lr and epochs swept) 0.05·B/256 and 50 / 30 epochs; SimSiam and W-MSE VICReg's
    ('byol', 1): dict(SIMCLR_SEMI, epochs=50, batch_size=1024, head_init='haiku'),
    ('byol', 10): dict(SIMCLR_SEMI, epochs=30, batch_size=1024, head_init='haiku'),
    ('simsiam', 1): dict(VICREG_SEMI, backbone_lr=0.03, head_lr=0.08),
    ('simsiam', 10): dict(VICREG_SEMI, backbone_lr=0.01, head_lr=0.1),
    ('wmse', 1): dict(VICREG_SEMI, backbone_lr=0.03, head_lr=0.08),
    ('wmse', 10): dict(VICREG_SEMI, backbone_lr=0.01, head_lr=0.1),
}


def _flat(saved: dict) -> dict:
  """The protocol's keys of a job's config.json under the short names used above."""
  cl = saved['classifier']
  out = {k: cl[k] for k in ('optimizer', 'head_lr', 'backbone_lr', 'scale_lr', 'weight_decay', 'momentum',
                            'lr_schedule', 'lr_decay_epochs', 'lr_decay_factor', 'head_init', 'head_init_std',
                            'batchnorm', 'report', 'backbone_dtype')}
  out.update(batch_size=saved['batch_size'], epochs=saved['epochs'], cache=saved['features']['cache'],
             crop=saved['transforms']['train'].get('crop_method'),  # digits_linear.py: no train transform
             resize=saved['transforms']['eval']['method'])
  return out


def _pretraining_workdir(tmp_path, method: str, **config) -> str:
  """A pretraining workdir as the evaluation jobs first see it: only its config.json (digits data, so the jobs
  can count its examples)."""
  pre = tmp_path / f'pre_{method}'
  pre.mkdir()
  (pre / 'config.json').write_text(json.dumps({'method': method, 'data': {
      'source': 'digits', 'name': 'digits', 'test_split': 'test', 'image_size': 16, 'channels': 1}, **config}))
  return str(pre)


def _semi_config(arg: str):
  spec = importlib.util.spec_from_file_location('semi', REPO / 'configs' / 'imagenet_semi.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _run_job(config, pre: str, workdir, monkeypatch, capsys) -> tuple[dict, str]:
  """What the evaluation job resolves and writes before it evaluates anything (the checkpoint follower
  stubbed): its config.json and the protocol line it printed."""
  monkeypatch.setattr(watch, 'follow', lambda *a: False)
  config.pretrain_workdir = pre
  config.data.update(source='digits', name='digits', test_split='test', channels=1)  # a dataset the job can count
  linear.run(config, str(workdir), finetune=config.job == 'finetune')
  line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('Evaluation protocol')]
  assert len(line) == 1, line
  return json.loads((workdir / 'config.json').read_text()), line[0]


@pytest.mark.parametrize('method', METHODS)
def test_each_methods_protocols_as_resolved_from_its_pretraining_workdir(method, tmp_path, monkeypatch, capsys):
  """configs/imagenet_linear.py and imagenet_semi.py:1 / :10 (protocol 'auto') on a pretraining workdir of
  ``method``: the job's config.json holds that method's official linear and semi-supervised values (backbone in
  float32), and its printed line names the protocol."""
  pre = _pretraining_workdir(tmp_path, method, model={'dtype': 'bfloat16'})
  saved, line = _run_job(load_config('imagenet_linear'), pre, tmp_path / 'lin', monkeypatch, capsys)
  assert saved['protocol'] == method and line.startswith(f'Evaluation protocol {method} (auto')
  got = _flat(saved)
  assert {k: got[k] for k in LINEAR[method]} == LINEAR[method]
  assert got['backbone_dtype'] == 'float32'  # whatever pretraining computed in
  for percent in (1, 10):
    saved, _ = _run_job(_semi_config(str(percent)), pre, tmp_path / f'semi{percent}', monkeypatch, capsys)
    got = _flat(saved)
    assert saved['protocol'] == method and saved['classifier']['labels_percent'] == percent
    assert {k: got[k] for k in SEMI[(method, percent)]} == SEMI[(method, percent)], percent


def test_named_protocols_explicit_values_and_none(tmp_path, monkeypatch, capsys):
  """``imagenet_linear.py:swav`` on a VICReg run takes SwAV's; ``imagenet_semi.py:swav,1`` SwAV's 1% row; a key
  set on the command line wins over the protocol (and is named in the line); 'none' (the digits configs) keeps
  the config's own values whatever the pretraining method."""
  pre = _pretraining_workdir(tmp_path, 'vicreg')
  spec = importlib.util.spec_from_file_location('lin', REPO / 'configs' / 'imagenet_linear.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  saved, line = _run_job(module.get_config('swav'), pre, tmp_path / 'swav', monkeypatch, capsys)
  assert saved['protocol'] == 'swav' and _flat(saved)['head_lr'] == 0.3 and '(auto' not in line
  saved, _ = _run_job(_semi_config('swav,1'), pre, tmp_path / 'swav1', monkeypatch, capsys)
  assert (_flat(saved)['head_lr'], _flat(saved)['backbone_lr'], _flat(saved)['batchnorm']) == (5.0, 0.02, 'sync')

  simclr = _pretraining_workdir(tmp_path, 'simclr')
  config = load_config('imagenet_linear')
  config.batch_size, config.classifier.head_lr = 512, 0.5
  saved, line = _run_job(config, simclr, tmp_path / 'explicit', monkeypatch, capsys)
  got = _flat(saved)
  assert (got['batch_size'], got['head_lr'], got['optimizer'], got['epochs']) == (512, 0.5, 'nesterov', 90)
  assert line.endswith('set by the config: batch_size=512, classifier.head_lr=0.5'), line

  saved, line = _run_job(load_config('digits_linear'), simclr, tmp_path / 'digits', monkeypatch, capsys)
  got = _flat(saved)
  assert saved['protocol'] == 'none' and line.startswith('Evaluation protocol none:')
  assert (got['optimizer'], got['head_lr'], got['weight_decay'], got['epochs'], got['report']) == (
      'sgd', 0.1, 1e-3, 500, 'last')  # digits_linear.py's own, not SimCLR's


def test_an_evaluation_transform_given_whole_gets_the_protocols_interpolation():
  config = load_config('imagenet_linear')
  config.transforms.eval = dict(resize=0, crop=0, mean=None, std=None)  # as the digits configs once wrote it
  assert protocols.resolve(config, 'byol')[0].transforms.eval.method == 'bicubic'


def test_a_protocol_without_a_row_is_one_line():
  config = load_config('imagenet_semi')
  config.classifier.labels_percent = 50
  with pytest.raises(errors.ConfigError, match=r'^config.protocol: swav has semi-supervised rows for 1% and 10%'):
    protocols.resolve(config, 'swav')
  config = load_config('imagenet_linear')
  config.classifier.lr_decay_epochs = (12, -1)
  with pytest.raises(errors.ConfigError, match='^config.classifier.lr_decay_epochs must be a tuple of epochs'):
    protocols.resolve(config, 'vicreg')


def test_converted_weights_record_their_method_for_auto(tmp_path, capsys):
  """``convert_weights --config.method=simclr`` writes the method into the workdir's config.json, so the
  evaluation jobs' 'auto' resolves SimCLR's protocol."""
  from vicreg_jax import convert_weights
  from vicreg_jax.models import torch_weights
  np.savez(tmp_path / 'r18.npz', **torch_weights.random_state_dict('resnet18', 3))
  pre = tmp_path / 'pre'
  status = convert_weights.main(['convert', f'--torch={tmp_path / "r18.npz"}', f'--workdir={pre}',
                                 '--config.method=simclr', '--config.data.source=digits'])
  out = capsys.readouterr()
  assert status == 0, out.err
  assert 'method simclr' in out.out, out.out
  config = runs.read_config(str(pre))
  resolved, line = protocols.resolve(load_config('imagenet_linear'), config.method)
  assert resolved.protocol == 'simclr' and resolved.classifier.optimizer == 'nesterov'


# --- ghost BatchNorm ----------------------------------------------------------------------------------------------

def _ghost_setup():
  pre, head, params, variables, cl, batch = finetune_setup()
  return backbones.from_config(pre.model), head, params, variables['batch_stats'], cl, batch


def _ghost_steps(devices, size, setup, steps=1):
  backbone, head, params, stats, cl, batch = setup
  mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
  norm.check_ghost(32, len(devices), size)
  tx = classifier.make_optimizer(cl, params, 2, 3, 32)
  state = jax.device_put(classifier.ClassifierState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                                                    opt_state=tx.init(params)), parallel.replicated(mesh))
  step = classifier.make_train_step(head, backbone, tx, mesh, True, 'ghost', 'native', size)
  for _ in range(steps):
    state, metrics = step(state, {}, jax.device_put(batch, parallel.data_sharding(mesh)))
  return jax.device_get((state.params, state.batch_stats, metrics['loss']))


def test_ghost_batchnorm_is_the_same_groups_on_8_devices_as_on_1():
  """Ghost BatchNorm over groups of 8 of 32 rows: on 1 device (4 groups on it), on 8 devices (each group spread
  over 2 devices) and with groups of 4 (one per device) it equals one device normalising each group separately,
  the loss their rows' mean, the running statistics the first group's."""
  setup = _ghost_setup()
  backbone, head, params, stats, cl, batch = setup

  def reference(size):
    def loss_fn(p):
      losses, first = [], None
      for g in range(32 // size):
        rows = slice(g * size, (g + 1) * size)
        h, upd = backbone.apply({'params': p['backbone'], 'batch_stats': stats}, batch['image'][rows], train=True,
                                mutable=['batch_stats'])
        logits = head.apply({'params': p['head']}, h)
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'][rows]).mean())
        first = upd['batch_stats'] if first is None else first
      return jnp.mean(jnp.stack(losses)), first
    (loss, first), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    tx = classifier.make_optimizer(cl, params, 2, 3, 32)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), first, loss

  want = {size: jax.device_get(reference(size)) for size in (4, 8)}
  for size, devices in ((8, jax.devices()[:1]), (8, jax.devices()), (4, jax.devices())):
    got = _ghost_steps(devices, size, setup)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want[size])
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want[8][0]), jax.tree.leaves(params)))
  assert moved > 1e-4 and not np.allclose(want[4][2], want[8][2])  # it trains; the groups' size matters
  with pytest.raises(errors.ConfigError, match='ghost_batch_size=16 must divide'):
    norm.check_ghost(48, 8, 16)  # 6 rows per device: neither divides the other


# --- optimisers, schedules, head init ---------------------------------------------------------------------------

def _classifier(**keys):
  config = load_config('imagenet_linear')
  config.classifier.update(keys)
  return protocols.resolve(config, 'vicreg')[0].classifier


def _run_optimizer(cl, params, grads_seq, steps_per_epoch=2, epochs=3, batch_size=256):
  tx = classifier.make_optimizer(cl, params, steps_per_epoch, epochs, batch_size)
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  return jax.device_get(p)


def _problem(seed=0, steps=5):
  rng = np.random.default_rng(seed)
  params = {'head': {'fc': {'kernel': rng.normal(size=(6, 3)).astype(np.float32),
                            'bias': np.zeros(3, np.float32)}}}  # a zero bias: apex skips it while its norm is 0
  grads = [{'head': {'fc': {'kernel': rng.normal(size=(6, 3)).astype(np.float32),
                            'bias': rng.normal(size=3).astype(np.float32)}}} for _ in range(steps)]
  return params, grads


def _torch_sgd(params, grads, lrs, momentum, wd, nesterov=False, larc_trust=None):
  """torch.optim.SGD (dampening 0; the first buffer is the gradient), under apex's LARC when ``larc_trust``,
  in float64, leaf by leaf."""
  out = {}
  for name in ('kernel', 'bias'):
    p, buf = params['head']['fc'][name].astype(np.float64), None
    for g_all, lr in zip(grads, lrs):
      g = g_all['head']['fc'][name].astype(np.float64)
      if larc_trust is not None:
        pn, gn = np.linalg.norm(p), np.linalg.norm(g)
        if pn != 0 and gn != 0:
          g = (g + wd * p) * (larc_trust * pn / (gn + pn * wd + 1e-8))
      else:
        g = g + wd * p
      buf = g.copy() if buf is None else momentum * buf + g
      p = p - lr * (g + momentum * buf if nesterov else buf)
    out[name] = p
  return out


def _torch_adam(params, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam with weight_decay (added to the gradient), in float64."""
  out = {}
  for name in ('kernel', 'bias'):
    p = params['head']['fc'][name].astype(np.float64)
    m = v = np.zeros_like(p)
    for t, (g_all, lr) in enumerate(zip(grads, lrs), 1):
      g = g_all['head']['fc'][name].astype(np.float64) + wd * p
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
    out[name] = p
  return out


@pytest.mark.parametrize('optimizer', ['sgd', 'nesterov', 'larc', 'adam'])
def test_the_classifier_optimisers_against_their_official_updates(optimizer):
  """Five steps of each optimiser (weight decay 0.01, 2 steps per epoch, cosine per epoch over 3 epochs; lr
  0.4 × 512/256 where scaled) against a float64 transcription of torch.optim.SGD / Adam and apex's LARC, the
  zero bias included (LARC leaves it unadapted and undecayed until its norm is not 0)."""
  params, grads = _problem()
  cl = _classifier(optimizer=optimizer, head_lr=0.4, weight_decay=0.01, momentum=0.9, scale_lr=True)
  got = _run_optimizer(cl, params, grads, batch_size=512)
  lrs = [0.8 * (1 + math.cos(math.pi * (s // 2) / 3)) / 2 for s in range(5)]
  if optimizer == 'adam':
    want = _torch_adam(params, grads, lrs, 0.01)
  else:
    want = _torch_sgd(params, grads, lrs, 0.9, 0.01, nesterov=optimizer == 'nesterov',
                      larc_trust=0.001 if optimizer == 'larc' else None)
  # Adam: optax computes the bias corrections 1 - β^t in float32 (1 - 0.999 rounds at 1.3e-5 relative), torch
  # in float64: 1.8e-5 apart after 5 steps of 0.8 here; with float32 corrections in the reference, 1.9e-7
  atol = 3e-5 if optimizer == 'adam' else 1e-7
  for name in ('kernel', 'bias'):
    np.testing.assert_allclose(got['head']['fc'][name], want[name], rtol=2e-6, atol=atol)


def test_the_classifier_schedules_against_torch_and_tf():
  """The learning rate per step (4 steps per epoch, 10 epochs, base 0.5) against transcriptions of
  MultiStepLR (×0.2 at epochs 4 and 7), ExponentialLR (γ = 1e-4^(1/10), multiplied in each epoch) and TF's
  cosine_decay (per step, to 0 after 40 steps)."""
  step_cl = _classifier(lr_schedule='step', lr_decay_epochs=(4, 7), lr_decay_factor=0.2)
  exp_cl = _classifier(lr_schedule='exponential', lr_decay_factor=1e-4)
  cos_cl = _classifier(lr_schedule='cosine_steps')
  gamma, lr_exp = 1e-4 ** (1 / 10), [0.5]
  for _ in range(10):
    lr_exp.append(lr_exp[-1] * gamma)
  for step in range(0, 44):
    epoch = step // 4
    multistep = 0.5 * 0.2 ** sum(epoch >= m for m in (4, 7))
    cosine = 0.5 * 0.5 * (1 + math.cos(math.pi * min(step, 40) / 40))
    assert float(classifier.lr_schedule(step_cl, 0.5, 4, 10)(step)) == pytest.approx(multistep, rel=1e-6)
    assert float(classifier.lr_schedule(exp_cl, 0.5, 4, 10)(step)) == pytest.approx(lr_exp[min(epoch, 10)], rel=2e-5)
    assert float(classifier.lr_schedule(cos_cl, 0.5, 4, 10)(step)) == pytest.approx(cosine, rel=1e-5, abs=1e-8)


def test_head_inits_and_the_float32_backbone():
  """'normal' with std 0 is SimCLR's zero head; 'torch' draws weights and bias in ±1/√fan_in (nn.Linear);
  'haiku' weights in ±2/√fan_in with std about 0.88/√fan_in and a zero bias (hk.Linear); a bfloat16 pretraining
  run's backbone computes in float32 for the evaluation jobs unless classifier.backbone_dtype says otherwise."""
  key, dim = jax.random.key(3), 400
  zeros = classifier.init_head(_classifier(head_init='normal', head_init_std=0.0), 1000, key, dim)
  assert not np.any(zeros['fc']['kernel']) and not np.any(zeros['fc']['bias'])
  torch_init = jax.device_get(classifier.init_head(_classifier(head_init='torch'), 1000, key, dim))
  for leaf in torch_init['fc'].values():
    assert np.abs(leaf).max() <= 1 / 20 and np.abs(leaf).max() > 0.95 / 20  # uniform over ±1/√400
  haiku = jax.device_get(classifier.init_head(_classifier(head_init='haiku'), 1000, key, dim))
  assert np.abs(haiku['fc']['kernel']).max() <= 2 / 20 and not np.any(haiku['fc']['bias'])
  assert haiku['fc']['kernel'].std() == pytest.approx(0.8796 / 20, rel=0.01)
  pre = load_config('imagenet')
  assert pre.model.dtype == 'bfloat16'
  assert classifier.backbone_model(pre, _classifier()).dtype == 'float32'
  assert classifier.backbone_model(pre, _classifier(backbone_dtype='bfloat16')).dtype == 'bfloat16'


@pytest.mark.slow
def test_the_protocols_run_as_jobs(tmp_path):
  """A tiny digits run evaluated with BYOL's (Nesterov, cosine per step, hk.Linear's head), SimSiam's (LARC) and
  W-MSE's (Adam, exponential, cached features) linear protocols and SwAV's 1% fine-tuning (steps, nn.Linear's
  head, synchronised BatchNorm), each at batch 32 for 2 epochs: every job resolves its protocol, trains through
  the non-finite guard ('stop') and reports. (Bicubic test images need pipeline.eval_dataset's interpolation.)"""
  from conftest import tiny_digits
  from vicreg_jax import train
  pre = str(tmp_path / 'pre')
  train.train_and_evaluate(tiny_digits(num_steps=2), pre)
  for method, job in (('byol', 'linear'), ('simsiam', 'linear'), ('wmse', 'linear'), ('swav', 'finetune')):
    config = load_config('imagenet_linear') if job == 'linear' else _semi_config(f'{method},1')
    config.update(pretrain_workdir=pre, protocol=method, batch_size=32, epochs=2, timeout_seconds=60.0)
    config.data.update(source='digits', name='digits', test_split='test', channels=1)
    config.classifier.labels_per_class = 5 if job == 'finetune' else 0
    config.transforms.train.update(crop_size=0, mean=None, std=None)  # in-memory 16 px digits: as they are
    config.transforms.eval.update(resize=0, crop=0, mean=None, std=None)
    results = linear.run(config, str(tmp_path / method), finetune=job == 'finetune')
    saved = json.loads((tmp_path / method / 'config.json').read_text())
    assert saved['protocol'] == method and results['2']['epochs'] == 2, (method, results)
    assert 0.0 < results['2']['top1'] <= 1.0, (method, results)
