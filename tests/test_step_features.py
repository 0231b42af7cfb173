"""The long-run features of the step and the loop: gradient accumulation (exact where BatchNorm sees the same
statistics), remat (the same gradients), prefetch to the devices, the input-wait share, the profiler window,
the subsampled collapse diagnostics on one device, the persistent compilation cache, and a step module free of
TensorFlow."""

import glob
import os
import re
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import Job, tiny_digits, train_steps
from vicreg_jax import collapse, compilation, errors, loop, methods, parallel, step as step_lib
from vicreg_jax.data import pipeline


def host_batch(config):
  return next(pipeline.pretrain_dataset(config).as_numpy_iterator())


def duplicated_per_device(batch, devices: int, copies: int):
  """Each device's share of ``batch`` cut to 1/copies and each row repeated ``copies`` times in a row: every
  micro-batch of ``copies`` (rows ≡ k mod copies) then holds the same examples, so its BatchNorm statistics are
  the batch's."""
  def dup(x):
    shards = np.split(x, devices)
    return np.concatenate([np.repeat(s[:len(s) // copies], copies, axis=0) for s in shards])
  return {k: dup(v) for k, v in batch.items()}


@pytest.mark.parametrize('method', ['vicreg', 'swav'])
@pytest.mark.slow  # two methods' steps three ways, 9-12 s each: the fast tier stays under 5 minutes
def test_gradient_accumulation_equals_one_pass_when_micro_batches_have_the_batch_statistics(method):
  """4 micro-batches per device on a batch whose micro-batches all hold the same examples: BatchNorm sees the
  same statistics as in one pass, so loss, gradients and the updated parameters must be the same (the loss is
  on the whole global batch in both). On an ordinary batch they differ (BatchNorm per micro-batch)."""
  overrides = {'swav.num_prototypes': 12, 'swav.freeze_prototypes_steps': 0} if method == 'swav' else {}
  config = tiny_digits(method=method, **overrides)
  batch = duplicated_per_device(host_batch(config), 8, 4)
  s1, m1 = train_steps(config, [batch])
  config.grad_accum_steps = 4
  s4, m4 = train_steps(config, [batch])
  for k in ('loss', *methods.METHODS[method].terms, 'online_probe_top1'):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s4.params, s1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s4.probe_params, s1.probe_params)
  if method == 'vicreg':  # an ordinary batch: BatchNorm normalises each micro-batch on its own, so not the same
    plain = host_batch(config)
    _, m_acc = train_steps(config, [plain])
    config.grad_accum_steps = 1
    _, m_one = train_steps(config, [plain])
    assert abs(float(m_acc['loss']) - float(m_one['loss'])) > 1e-4


def test_gradient_accumulation_is_the_same_on_any_device_count():
  """Micro-batch k is the global rows ≡ k (mod K) on any number of devices: 8 devices and 2 take the same step
  (a run resumes on another device count)."""
  config = tiny_digits(grad_accum_steps=4)
  batch = host_batch(config)
  s8, m8 = train_steps(config, [batch])
  s2, m2 = train_steps(config, [batch], jax.devices()[:2])
  np.testing.assert_allclose(m2['loss'], m8['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s2.params, s8.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s2.batch_stats, s8.batch_stats)


def test_gradient_accumulation_errors():
  config = tiny_digits(grad_accum_steps=3)  # 64 / 8 devices = 8 per device: not divisible by 3
  with pytest.raises(errors.ConfigError, match='must divide the per-device batch 8'):
    train_steps(config, [host_batch(config)])
  config = tiny_digits(method='byol', grad_accum_steps=2, **{'byol.predictor': '32'})
  with pytest.raises(errors.ConfigError, match='not supported with byol'):
    train_steps(config, [host_batch(config)])


@pytest.mark.parametrize('arch', ['convnet', *(pytest.param(a, marks=pytest.mark.slow) for a in ('vit_micro4', 'resnet18'))])
@pytest.mark.slow  # the step twice, 10 s (convnet) or more: the fast tier stays under 5 minutes
def test_remat_gives_the_same_step(arch):
  """Recomputing the activations inside each block changes no number of the step; the compiled program does
  recompute (more FLOPs in the cost analysis) and keeps fewer bytes alive (XLA's memory analysis)."""
  config = tiny_digits(**{'model.arch': arch, 'model.stem': 'small', 'model.width_multiplier': 1 / 16})
  batch = host_batch(config)
  plain, m_plain = train_steps(config, [batch])
  config.model.remat = True
  remat, m_remat = train_steps(config, [batch])
  np.testing.assert_allclose(m_remat['loss'], m_plain['loss'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat.params, plain.params)
  if arch == 'resnet18':
    def analysis(remat_on):
      config.model.remat = remat_on
      mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
      tx, schedule = methods.make_optimizer(config, 10, 2)
      state = jax.eval_shape(lambda k: step_lib.init_state(config, step_lib.build_model(config, None), tx, k),
                             jax.random.key(0))
      b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.data_sharding(mesh)),
                       batch)
      state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
                           state)
      compiled = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh,
                                          total_steps=10).lower(state, b).compile()
      return compiled.cost_analysis()['flops'], compiled.memory_analysis().temp_size_in_bytes
    (flops_plain, temp_plain), (flops_remat, temp_remat) = analysis(False), analysis(True)
    assert flops_remat > 1.05 * flops_plain, (flops_remat, flops_plain)
    assert temp_remat < temp_plain, (temp_remat, temp_plain)


def test_prefetch_keeps_order_and_runs_ahead():
  pulled = []

  def source():
    for i in range(6):
      pulled.append(i)
      yield i

  it = parallel.prefetch_to_device(source(), 2)
  assert next(it) == 0 and pulled == [0, 1, 2]  # two batches ahead of the one handed out
  assert list(it) == [1, 2, 3, 4, 5]
  assert list(parallel.prefetch_to_device(iter(range(3)), 0)) == [0, 1, 2]


def test_input_wait_share():
  def slow():
    while True:
      time.sleep(0.05)
      yield 0

  wait = loop.InputWait(slow())
  for _ in range(4):
    next(wait)
  time.sleep(0.2)  # "the step"
  share = wait.share()
  assert 0.35 < share < 0.65, share  # 0.2 s waiting of 0.4 s
  assert wait.share() < 0.05  # reset


def test_diagnostics_on_a_subsample_computed_by_one_device():
  """The diagnostics of a [256, 48] batch on 8 devices with max_rows 64 are those of the 8 rows of every
  device's shard that were taken (float64 reference), and every device holds them."""
  mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  rng = np.random.default_rng(0)
  h = rng.standard_normal((256, 48)).astype(np.float32)
  z = (h[:, :16] @ rng.standard_normal((16, 40))).astype(np.float32)  # rank 16
  diagnose = step_lib.make_diagnostics(mesh, 64)
  scalars, (s_h, s_z) = diagnose(jax.device_put(h, parallel.data_sharding(mesh)),
                                 jax.device_put(z, parallel.data_sharding(mesh)))
  rows = np.concatenate([np.arange(8) + 32 * d for d in range(8)])  # the first 8 of each device's 32
  np.testing.assert_allclose(np.asarray(s_h), collapse.singular_values(h[rows]), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(s_z)[:16], collapse.singular_values(z[rows])[:16], rtol=1e-4)
  assert s_h.shape == (48,) and scalars['repr/rankme'].sharding.is_fully_replicated
  np.testing.assert_allclose(float(scalars['emb/rankme']),
                             collapse.rankme_from_spectrum(collapse.singular_values(z[rows])), rtol=1e-3)
  np.testing.assert_allclose(float(scalars['repr/std_mean']), h[rows].std(0).mean(), rtol=1e-4)


def _library_fusions(compiled_text: str) -> list:
  """The operations XLA:CPU handed to a library (YNNPACK) in a compiled program, by their op names."""
  return re.findall(r'fusion\([^)]*\), kind=kCustom.*?op_name="([^"]+)"', compiled_text)


def test_cpu_programs_keep_convolutions_out_of_ynnpack(monkeypatch):
  """On CPU the package's programs compile convolutions with XLA's own emitter (faster here than YNNPACK:
  docs/performance.md); matrix products and reductions stay with YNNPACK; the values are the same. XLA_FLAGS that
  choose the YNNPACK fusion types themselves win."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)  # (with 8 channels XLA keeps the conv anyway)
  w = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
  m = rng.standard_normal((16 * 16 * 32, 32)).astype(np.float32)

  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape(4, -1) @ m, y.sum(axis=(1, 2))

  assert compilation.compiler_options() == compilation.CPU_COMPILER_OPTIONS
  ours = _library_fusions(compilation.jit(f).lower(x, w, m).compile().as_text())
  assert not [n for n in ours if 'conv' in n], ours
  assert [n for n in ours if 'dot_general' in n] and [n for n in ours if 'reduce_sum' in n], ours
  for a, b in zip(compilation.jit(f)(x, w, m), jax.jit(f)(x, w, m)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  flags = os.environ.get('XLA_FLAGS', '')
  monkeypatch.setattr(compilation, '_compiler_options', {})
  monkeypatch.setenv('XLA_FLAGS', flags + ' --xla_cpu_experimental_ynn_fusion_type=-REDUCE')
  assert compilation.compiler_options() is None
  monkeypatch.setattr(compilation, '_compiler_options', {})
  monkeypatch.setattr(compilation, 'CPU_COMPILER_OPTIONS', {'xla_cpu_experimental_ynn_fusion_type': 'NO_SUCH_TYPE'})
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert compilation.compiler_options() is None  # an XLA that does not know the value: its defaults


@pytest.mark.slow
def test_profile_window_and_compilation_cache_across_restarts(tmp_path):
  """Two starts of the same run (each one step) with a fresh persistent compilation cache: the first loads
  nothing from it, the second loads its programs (the step among them) instead of compiling them. The first
  start also writes a profiler trace of step 1."""
  cache, work, logs = tmp_path / 'cache', tmp_path / 'run', tmp_path / 'logs'
  args = ['--config.model.width_multiplier=0.25', '--config.model.projector=32-32-32', '--config.batch_size=64',
          '--config.final_probe.enabled=False', '--config.num_steps=2', '--config.max_steps_per_run=1',
          f'--config.compilation_cache={cache}', '--config.compilation_cache_min_seconds=0', f'--workdir={work}']
  loaded = []
  for i in range(2):
    job = Job([*args, '--config.profile_steps=1' if i == 0 else '--config.profile_steps='], logs, name=f'start{i}')
    job.check()
    m = re.search(r'(\d+) program\(s\) loaded from the compilation cache', job.stderr())
    assert m, job.stderr()[-2000:]
    loaded.append(int(m.group(1)))
    if i == 0:
      traces = glob.glob(str(work / 'profile' / '**' / '*.xplane.pb'), recursive=True)
      assert traces and os.path.getsize(traces[0]) > 1000, traces
  assert loaded[0] == 0 and loaded[1] >= 3, loaded  # state init, the step, the diagnostics at least
  assert any(cache.iterdir())


def test_profile_steps_errors():
  with pytest.raises(errors.ConfigError, match="profile_steps '5-2'"):
    loop.Profile('5-2', '/tmp')
  assert loop.Profile('3', '/tmp').first == 3
