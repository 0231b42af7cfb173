"""The evaluation jobs: linear evaluation alongside pretraining (two processes), the ImageNet linear and
semi-supervised configs on mocked TFDS, the sharded classifier step, resuming a half-trained head."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh

from conftest import REPO, Job, finetune_setup, job_env, load_config, run_module, scalar_events, tiny_digits
from vicreg_jax import parallel, runs, train
from vicreg_jax.evaluate import classifier, linear
from vicreg_jax.models import backbones

SIZE = 64


@pytest.mark.slow
def test_linear_job_alongside_pretraining(tmp_path):
  """Pretraining and the linear job start together; the job evaluates every checkpoint as it lands, skips a
  half-written one, stops after the last, and agrees with the pretraining run's own probe."""
  pre, lin = tmp_path / 'pre', tmp_path / 'lin'
  # A checkpoint still being written: orbax writes into a temporary directory and renames it when complete.
  half = pre / 'checkpoints' / '10.orbax-checkpoint-tmp-1790000000000000'
  half.mkdir(parents=True)
  (half / '_CHECKPOINT_METADATA').write_text('{"partial')
  # 2 devices each (8 are tested in-process); the default digits model, compiled as a user's
  logs = tmp_path / 'logs'
  pretrain = Job([f'--workdir={pre}', '--config.num_steps=90', '--config.checkpoint_every_steps=30',
                  '--config.log_every_steps=30', '--config.final_probe.draws=1'], logs, name='pretrain',
                 fast_compile=False)
  evaluate = Job(['--config=configs/digits_linear.py', f'--workdir={lin}', f'--config.pretrain_workdir={pre}',
                  '--config.poll_seconds=0.5', '--config.timeout_seconds=400'], logs, name='linear', fast_compile=False)
  pretrain.check(500)
  pretrain_done = time.time()
  evaluate.check(500)

  results = json.loads((lin / 'results.json').read_text())
  assert sorted(results, key=int) == ['30', '60', '90']   # every checkpoint, not the half-written one
  # The first checkpoint was taken up while pretraining was still running (its evaluation started then; how long
  # it took depends on the machine).
  assert results['30']['finished_at'] - results['30']['seconds'] < pretrain_done
  summary = json.loads((pre / 'summary.json').read_text())
  print('linear job:', {k: round(r['top1'], 4) for k, r in results.items()}, 'in-run probe:', summary['linear_top1'])
  assert abs(results['90']['top1'] - summary['linear_top1']) <= 0.01, (results['90'], summary)
  assert results['90']['top1'] > 0.5  # and the features are not chance (10 classes)
  # TensorBoard: per checkpoint the head's mean train loss every 10 steps and the test top-1 after every epoch
  # (500 epochs of 5 steps); top-1 and top-5 once per checkpoint, at its pretraining step.
  events = scalar_events(lin)
  for step in ('30', '60', '90'):
    assert [s for s, _ in events[f'ckpt{step}/test_top1']] == list(range(5, 2501, 5)), step
    assert [s for s, _ in events[f'ckpt{step}/loss']] == list(range(10, 2501, 10)), step
    assert events[f'ckpt{step}/test_top1'][-1][1] == pytest.approx(results[step]['top1'])
  assert [s for s, _ in events['top1']] == [30, 60, 90]

  # A restart finds everything done and leaves the results as they were.
  again = run_module(['--config=configs/digits_linear.py', f'--workdir={lin}', f'--config.pretrain_workdir={pre}'],
                     job_env(2, fast_compile=False), timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads((lin / 'results.json').read_text()) == results


def tiny_imagenet_pretraining(tmp_path):
  config = load_config('imagenet')
  config.model.update(arch='resnet18', width_multiplier=1 / 16, projector='64-64-64')
  config.update(batch_size=16, num_steps=2, log_every_steps=1)
  config.data.update(shuffle_buffer=16, data_dir=str(tmp_path / 'tfds'), image_size=SIZE)
  for view in (config.augment.view1, config.augment.view2):  # the official recipe, at 64 px to keep CPU time low
    view['crop_size'] = SIZE
  workdir = str(tmp_path / 'pre')
  train.train_and_evaluate(config, workdir)
  return workdir


def eval_overrides(config, tmp_path, pre):
  config.update(pretrain_workdir=pre, batch_size=16, epochs=1, log_every_steps=1, poll_seconds=0.1,
                timeout_seconds=60.0, checkpoint_every_steps=2)
  config.data.update(shuffle_buffer=16, data_dir=str(tmp_path / 'tfds'))
  config.transforms.train['crop_size'] = SIZE
  config.transforms.eval.update(resize=SIZE * 8 // 7, crop=SIZE)
  config.classifier.ghost_batch_size = 8  # ghost BatchNorm groups of 8 of the 16 rows
  return config


@pytest.mark.slow
def test_imagenet_linear_and_semi_configs_on_mocked_tfds(tmp_path, mock_tfds):
  """configs/imagenet_linear.py and imagenet_semi.py run end to end on mock data, as the real jobs do."""
  splits = {'train': 32, 'validation': 24}
  with mock_tfds('imagenet2012', tmp_path / 'tfds', splits, 32), \
       mock_tfds('imagenet2012_subset/10pct', tmp_path / 'tfds', splits, 32):
    pre = tiny_imagenet_pretraining(tmp_path)
    lin = load_config('imagenet_linear')
    assert lin.transforms.train['crop_size'] == 224 and lin.transforms.eval['resize'] == 256  # the official protocol
    lin = eval_overrides(lin, tmp_path, pre)
    results = linear.run(lin, str(tmp_path / 'lin'))
    spec = __import__('importlib').util.spec_from_file_location('semi', REPO / 'configs' / 'imagenet_semi.py')
    module = __import__('importlib').util.module_from_spec(spec)
    spec.loader.exec_module(module)
    semi = eval_overrides(module.get_config('10'), tmp_path, pre)
    assert semi.data.name == 'imagenet2012_subset/10pct' and semi.classifier.labels_percent == 10
    assert lin.protocol == semi.protocol == 'auto'  # the pretraining run's method's: VICReg's
    semi_results = linear.run(semi, str(tmp_path / 'semi'), finetune=True)
  # the resolved protocols, as the jobs wrote them: VICReg's official linear and 10% rows
  ran = {job: json.loads((tmp_path / job / 'config.json').read_text()) for job in ('lin', 'semi')}
  assert ran['lin']['protocol'] == ran['semi']['protocol'] == 'vicreg'
  assert ran['lin']['classifier']['head_lr'] == 0.02 and ran['lin']['classifier']['report'] == 'best'
  assert (ran['semi']['classifier']['backbone_lr'], ran['semi']['classifier']['head_lr']) == (0.01, 0.1)
  assert ran['semi']['classifier']['batchnorm'] == 'ghost' and ran['semi']['epochs'] == 1  # epochs: set here
  for r in (results, semi_results):  # one epoch: the best epoch is the last
    assert list(r) == ['2'] and r['2']['epoch'] == 1 and r['2']['top1'] == r['2']['last_top1']
  # Fine-tuning trained the backbone; the linear job kept it frozen (its state holds only the head).
  def saved(job):
    path = tmp_path / job / 'heads' / '2' / '2' / 'default'
    return ocp.PyTreeCheckpointer().restore(str(path))['params']
  assert set(saved('lin')) == {'head'}
  tuned = saved('semi')['backbone']
  pre_params = ocp.PyTreeCheckpointer().restore(os.path.join(pre, 'checkpoints', '2', 'default'))['params']
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(pre_params['backbone']))]
  assert max(moved) > 1e-6


def test_finetune_step_on_8_devices_equals_1_device():
  """The whole-network step (SyncBN, global-mean loss, averaged gradients) is the same on 8 devices and 1."""
  pre, head, params, variables, cl, batch = finetune_setup()
  out = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
    tx = classifier.make_optimizer(cl, params, 2, 3, 32)
    state = classifier.ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                                       batch_stats=variables['batch_stats'], opt_state=tx.init(params))
    step = classifier.make_train_step(head, backbones.from_config(pre.model, parallel.AXIS), tx, mesh, True)
    state = jax.device_put(state, parallel.replicated(mesh))
    for _ in range(2):
      state, metrics = step(state, {}, jax.device_put(batch, parallel.data_sharding(mesh)))
    out.append(jax.device_get((state.params, state.batch_stats, metrics)))
  (p1, b1, m1), (p8, b8, m8) = out
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), (p8, b8), (p1, b1))
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1['backbone']),
                                                            jax.tree.leaves(params['backbone'])))
  assert moved > 1e-5  # the backbone is trained, not frozen


@pytest.mark.slow  # 10 s: the fast tier stays under 5 minutes
def test_finetune_step_with_per_device_batchnorm_is_the_official_ddp_step():
  """``classifier.batchnorm='per_device'``: each of 8 devices normalises with its own 4 examples' statistics
  (DDP without SyncBN); the step equals one device computing the 8 shards separately, averaging their losses,
  and keeping shard 0's running statistics (DDP broadcasts rank 0's buffers)."""
  pre, head, params, variables, cl, batch = finetune_setup()
  backbone = backbones.from_config(pre.model)  # no axis: per-device statistics
  tx = classifier.make_optimizer(cl, params, 2, 3, 32)
  mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  state = jax.device_put(classifier.ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                                                    batch_stats=variables['batch_stats'], opt_state=tx.init(params)),
                         parallel.replicated(mesh))
  step = classifier.make_train_step(head, backbone, tx, mesh, True, batchnorm='per_device')
  state, metrics = step(state, {}, jax.device_put(batch, parallel.data_sharding(mesh)))
  got = jax.device_get((state.params, state.batch_stats, metrics['loss']))

  def loss_fn(p):
    shards = [(batch['image'][4 * i:4 * i + 4], batch['label'][4 * i:4 * i + 4])
              for i in range(8)]
    losses, stats = [], []
    for x, y in shards:
      h, upd = backbone.apply({'params': p['backbone'], 'batch_stats': variables['batch_stats']}, x, train=True,
                              mutable=['batch_stats'])
      logits = head.apply({'params': p['head']}, h)
      losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
      stats.append(upd['batch_stats'])
    return jnp.mean(jnp.stack(losses)), stats[0]

  (loss, stats0), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)
  np.testing.assert_allclose(got[2], loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[0], expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got[1], stats0)


def test_epoch_cosine_matches_cosine_annealing():
  """lr of epoch e = base·(1 + cos(π e / E)) / 2, constant within an epoch (torch CosineAnnealingLR)."""
  s = classifier.epoch_cosine(0.3, steps_per_epoch=4, epochs=10)
  for step, epoch in ((0, 0), (3, 0), (4, 1), (21, 5), (39, 9)):
    assert float(s(step)) == pytest.approx(0.3 * (1 + np.cos(np.pi * epoch / 10)) / 2, rel=1e-6)


@pytest.mark.slow
def test_linear_head_training_resumes_exactly(tmp_path, monkeypatch):
  """A head training interrupted after a checkpoint and restarted ends with the uninterrupted result."""
  pre = str(tmp_path / 'pre')
  c = tiny_digits(num_steps=2)
  train.train_and_evaluate(c, pre)
  cfg = load_config('digits_linear')
  cfg.update(pretrain_workdir=pre, epochs=4, checkpoint_every_steps=5, log_every_steps=5)
  full = linear.run(cfg, str(tmp_path / 'full'))

  original = classifier.feature_batches

  def stop_after_7(*args, **kw):
    for i, b in enumerate(original(*args, **kw)):
      if i == 7:
        raise KeyboardInterrupt('simulated preemption')
      yield b

  monkeypatch.setattr(classifier, 'feature_batches', stop_after_7)
  with pytest.raises(KeyboardInterrupt):
    linear.run(cfg, str(tmp_path / 'resumed'))
  monkeypatch.setattr(classifier, 'feature_batches', original)
  assert os.listdir(tmp_path / 'resumed' / 'heads' / '2') == ['5']
  resumed = linear.run(cfg, str(tmp_path / 'resumed'))
  assert resumed['2']['top1'] == full['2']['top1'] and resumed['2']['top5'] == full['2']['top5']


def test_linear_job_needs_pretrain_workdir(tmp_path):
  with pytest.raises(ValueError, match='pretrain_workdir'):
    linear.run(load_config('digits_linear'), str(tmp_path))


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_supervised_from_scratch_needs_only_the_config(tmp_path):
  """``from_scratch``: the pretraining run's architecture, freshly initialised, trained with labels — no
  checkpoint is read (there is none), the result is 'checkpoint 0', and a restart does not train again."""
  pre = tmp_path / 'pre'
  c = tiny_digits()
  pre.mkdir()
  runs.save_config(str(pre), c)
  assert not (pre / 'checkpoints').exists()
  cfg = load_config('digits_supervised')
  cfg.update(pretrain_workdir=str(pre), epochs=3, batch_size=64, log_every_steps=10, timeout_seconds=5.0)
  results = linear.run(cfg, str(tmp_path / 'sup'), finetune=True)
  assert list(results) == ['0'] and results['0']['epochs'] == 3
  assert 0.2 < results['0']['top1'] <= 1.0  # 3 epochs of labels already beat chance (0.1) on digits
  cfg.epochs = 1000  # a restart finds the result and trains nothing (1000 epochs would take minutes)
  assert linear.run(cfg, str(tmp_path / 'sup'), finetune=True) == json.loads(
      (tmp_path / 'sup' / 'results.json').read_text())
  a = classifier.init_backbone(c, 0, parallel.make_mesh())['params']
  b = classifier.init_backbone(c, 1, parallel.make_mesh())['params']
  assert not np.allclose(a['conv0']['kernel'], b['conv0']['kernel'])


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_relative_workdirs(tmp_path, monkeypatch):
  """``--workdir=runs/x`` as the README writes it: orbax refuses relative checkpoint paths (and says so only
  once a save is in flight), so both jobs must resolve them."""
  monkeypatch.chdir(tmp_path)
  c = tiny_digits(num_steps=2, checkpoint_every_steps=1)
  train.train_and_evaluate(c, os.path.join('runs', 'pre'))
  assert sorted(os.listdir(tmp_path / 'runs' / 'pre' / 'checkpoints')) == ['1', '2']
  cfg = load_config('digits_linear')
  cfg.update(pretrain_workdir=os.path.join('runs', 'pre'), epochs=2, timeout_seconds=60.0)
  results = linear.run(cfg, os.path.join('runs', 'lin'))
  assert sorted(results, key=int) == ['1', '2'] and (tmp_path / 'runs' / 'lin' / 'heads' / '2').is_dir()


@pytest.mark.slow  # end to end, 15 s: the fast tier stays under 5 minutes
def test_best_epoch_is_reported_with_the_last_beside_it(tmp_path, monkeypatch):
  """``classifier.report='best'`` (official): tested after every epoch, the best epoch's top-1/top-5 reported,
  the last epoch's beside them."""
  pre = str(tmp_path / 'pre')
  c = tiny_digits(num_steps=1)
  train.train_and_evaluate(c, pre)
  cfg = load_config('digits_linear')
  cfg.update(pretrain_workdir=pre, epochs=6, timeout_seconds=60.0)
  cfg.classifier.update(report='best', head_lr=3.0)  # a large lr: test accuracy goes up and down
  seen, original = [], classifier.evaluate
  monkeypatch.setattr(classifier, 'evaluate', lambda *a: seen.append(original(*a)) or seen[-1])
  r = linear.run(cfg, str(tmp_path / 'lin'))['1']
  per_epoch = [e['top1'] for e in seen[:-1]]  # the last call is the final test of the last epoch
  assert len(per_epoch) == 6 and seen[-1]['top1'] == per_epoch[-1] == r['last_top1']
  assert r['top1'] == max(per_epoch) and r['epoch'] == 1 + per_epoch.index(max(per_epoch))
