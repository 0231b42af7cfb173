"""End-to-end trainer tests: sharded step vs one device, resume, the ImageNet config on mocked TFDS, the CLI."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import job_env, load_config, run_module, scalar_events, tiny_digits, train_steps
from vicreg_jax import methods, runs, train
from vicreg_jax import step as step_lib
from vicreg_jax.data import pipeline






def restore_params(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  return ocp.StandardCheckpointer().restore(path)['params']


TINY_HEADS = {'wmse.projector': '32-16', 'wmse.w_size': 32, 'byol.predictor': '32', 'simsiam.predictor': '16',
              'swav.num_prototypes': 12, 'swav.freeze_prototypes_steps': 1, 'swav.queue_length': 64,
              'moco_v3.predictor': '32', 'moco_v2.queue_length': 128}


@pytest.mark.parametrize('method', ['vicreg', 'barlow_twins', 'byol', 'swav', 'moco_v3', 'moco_v2'])
def test_sharded_step_equals_single_device_step(method):
  """8 devices (SyncBN, gathered loss, averaged gradients) take the same steps as 1 device on the same batch;
  BYOL's EMA target, MoCo v3's momentum encoder and SwAV's queue (full at the second step) included; MoCo v2 with
  its queue and ghost BatchNorm in groups of 16 (on 8 devices each group spans two, on 1 device four groups run
  side by side) with the key view shuffled across the devices."""
  ghost = {'model.ghost_batch_size': 16} if method == 'moco_v2' else {}
  config = tiny_digits(num_steps=10, method=method, **TINY_HEADS, **ghost)
  ds = pipeline.pretrain_dataset(config)
  host_batches = [b for _, b in zip(range(2), ds.as_numpy_iterator())]
  (s1, m1), (s8, m8) = (train_steps(config, host_batches, devices)
                        for devices in (jax.devices()[:1], jax.devices()))
  assert len(jax.devices()) == 8
  for k in ('loss', *methods.METHODS[method].terms, 'embedding_std', 'online_probe_top1'):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s8.params, s1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s8.batch_stats,
               s1.batch_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s8.probe_params,
               s1.probe_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s8.extra, s1.extra)
  # The steps did move the parameters (the comparison above is not between two initial states).
  p0 = step_lib.init_state(config, step_lib.build_model(config, None), methods.make_optimizer(config, 10, 2)[0],
                        jax.random.key(0)).params
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), s1.params, p0))
  assert max(moved) > 1e-4


@pytest.mark.slow  # 20 s: the fast tier stays under 5 minutes
def test_imagenet_config_runs_two_steps_on_mocked_tfds(tmp_path, mock_tfds):
  config = load_config('imagenet')
  config.model.update(arch='resnet18', width_multiplier=1 / 16, projector='64-64-64')
  config.batch_size = 16
  config.num_steps = 2
  config.log_every_steps = 1
  config.data.shuffle_buffer = 16
  config.data.data_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'run')
  with mock_tfds('imagenet2012', tmp_path / 'tfds', {'train': 1_281_167, 'validation': 50_000}, 32):
    assert runs.train_examples(config) == 1_281_167  # read from the prepared dataset's metadata
    summary = train.train_and_evaluate(config, workdir)
  assert summary['steps'] == 2
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def run_cli(*args, env_extra=None, timeout=120):
  env = dict(job_env(2), **(env_extra or {}))  # 2 devices: the command line, not the 8-device paths again
  return run_module(args, env, timeout)


@pytest.mark.slow  # end to end, 10-20 s: in the slow tier so that the fast tier stays near 5 minutes
def test_cli_missing_imagenet_is_one_line(tmp_path):
  r = run_cli('--config=configs/imagenet.py', f'--workdir={tmp_path}/run',
              env_extra={'TFDS_DATA_DIR': str(tmp_path / 'empty')}, timeout=60)
  assert r.returncode != 0
  lines = r.stderr.strip().splitlines()
  assert 'Traceback' not in r.stderr
  assert lines[-1].startswith('error: ') and 'imagenet2012' in lines[-1] and 'manual_dir' in lines[-1]
  assert len([line for line in lines if line.startswith('error')]) == 1


@pytest.mark.slow  # a command line as a job (the job server's start): the fast tier stays under 5 minutes
def test_cli_unknown_config_key_is_one_line(tmp_path):
  r = run_cli('--config=configs/digits.py', '--config.model.widht=2', f'--workdir={tmp_path}')
  assert r.returncode != 0
  assert 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('error: unknown config key widht')


@pytest.mark.slow
def test_cli_digits_writes_summary_events_and_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  r = run_cli('--config.num_steps=2', '--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32',
              '--config.final_probe.draws=1', f'--workdir={workdir}', timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert set(summary) == {'linear_top1', 'linear_top1_5_per_class', 'knn_top1_20', 'knn_top1_200', 'rankme',
                          'rankme_embeddings', 'embedding_std', 'embedding_std_unit', 'steps', 'wall_seconds'}
  spectra = np.load(workdir / 'spectra.npz')
  assert spectra['representations'].ndim == 1 and np.all(np.diff(spectra['representations']) <= 0)
  assert summary['steps'] == 2 and 0.1 < summary['linear_top1'] <= 1.0
  assert (workdir / 'checkpoints' / '2').is_dir()
  assert any(p.name.startswith('events.out.tfevents') for p in workdir.iterdir())


@pytest.mark.slow  # end to end, 14 s: the fast tier stays under 5 minutes
def test_step_metrics_are_written_as_interval_means_and_the_diagnostics_at_log_steps(tmp_path):
  """Every metrics_every_steps: each step metric's mean over the steps since the last write (the learning rate
  as at the step); the collapse diagnostics every log_every_steps; compared with the same run writing every step."""
  config = tiny_digits(num_steps=12, metrics_every_steps=1, log_every_steps=12, checkpoint_every_steps=12)
  train.train_and_evaluate(config, str(tmp_path / 'every'))
  config.update(metrics_every_steps=4, log_every_steps=6)
  train.train_and_evaluate(config, str(tmp_path / 'means'))
  every, means = (scalar_events(tmp_path / w) for w in ('every', 'means'))
  assert [s for s, _ in every['loss']] == list(range(1, 13))
  assert [s for s, _ in means['loss']] == [4, 6, 8, 12]  # every 4th, every 6th (a progress line) and the last
  per_step = dict(every['loss'])
  for (step, value), start in zip(means['loss'], [0, 4, 6, 8]):
    np.testing.assert_allclose(value, np.mean([per_step[s] for s in range(start + 1, step + 1)]), rtol=1e-5)
  assert means['learning_rate'] == [(s, v) for s, v in every['learning_rate'] if s in (4, 6, 8, 12)]
  for tag in ('invariance', 'variance', 'covariance', 'embedding_std', 'online_probe_top1'):
    assert len(means[tag]) == 4, tag
  assert [s for s, _ in means['emb/rankme']] == [6, 12] and [s for s, _ in means['repr/std_mean']] == [6, 12]
  assert 'finite' not in means
  # The online probe's epoch top-1 (19 steps an epoch at batch 64: the run's 12 steps end inside the first).
  probe = dict(every['online_probe_top1'])
  assert means['online_probe/epoch_top1'] == [(12, pytest.approx(np.mean([probe[s] for s in range(1, 13)]), 1e-5))]
