"""benchmarks/tpu_compile.py (the compiled-HLO accounting, on CPU programs; the TPU compile itself when libtpu is
installed) and the one-line out-of-memory error of :func:`vicreg_jax.compilation.out_of_memory`."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vicreg_jax import compilation, errors, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import tpu_compile  # noqa: E402  pylint: disable=wrong-import-position


def test_shape_bytes_counts_arrays_and_tuples():
  assert tpu_compile.shape_bytes('f32[128,8192]{1,0}') == 128 * 8192 * 4
  assert tpu_compile.shape_bytes('(bf16[2,3]{1,0}, s32[], u8[5])') == 12 + 4 + 5
  assert tpu_compile.shape_bytes('token[]') == 0


def test_hlo_accounting_of_a_sharded_program():
  """Two all-gathers of 8×64 f32 shards (one per input) and one all-reduce, found in the compiled CPU HLO with
  their result bytes; the kernels' bytes include the gathered arrays."""
  mesh = parallel.make_mesh()
  n = mesh.size

  def per_device(a, b):
    ga = jax.lax.all_gather(a, 'data', tiled=True)
    gb = jax.lax.all_gather(b * 2.0, 'data', tiled=True)
    return jax.lax.psum(jnp.sum(jnp.tanh(ga) @ gb.T), 'data')

  f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P('data')), out_specs=P()))
  spec = jax.ShapeDtypeStruct((8 * n, 64), jnp.float32, sharding=NamedSharding(mesh, P('data')))
  ops = tpu_compile.hlo_ops(f.lower(spec, spec).compile().as_text())
  found = tpu_compile.collectives(ops)
  assert found['all-gather'] == (2, 2 * 8 * n * 64 * 4)
  assert found['all-reduce'][0] == 1
  top = tpu_compile.largest(ops, 3)
  assert top[0].in_bytes + top[0].out_bytes >= 8 * n * 64 * 4


def test_topology_names():
  assert tpu_compile.chip_of('v5e:4x4') == ('v5e', 16)
  assert tpu_compile.chip_of('v4:2x2x4') == ('v4', 16)
  with pytest.raises(SystemExit, match='expected TYPE'):
    tpu_compile.chip_of('v9:4')


def test_out_of_memory_is_one_line_with_the_advice():
  tpu = RuntimeError('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. '
                     'Used 20.52G of 15.48G hbm. Exceeded hbm capacity by 5.04G.\n\nTotal hbm usage >= 21.02G: ...')
  e = compilation.out_of_memory(tpu, 256)
  assert isinstance(e, errors.ConfigError) and '\n' not in str(e)
  assert '256 examples per chip' in str(e) and '20.52G of 15.48G hbm' in str(e)
  assert 'grad_accum_steps' in str(e) and 'remat' in str(e)
  compile_time = RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
                               'temporaries (16.18G) exceeds available HBM (15.75G).')
  assert 'temporaries 16.18G of 15.75G HBM' in str(compilation.out_of_memory(compile_time, 256))
  assert compilation.out_of_memory(RuntimeError('INVALID_ARGUMENT: shapes differ'), 256) is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (pip install jax[tpu])')
def test_compiles_a_tiny_config_for_v5e_2x2(tmp_path):
  """The script end to end with libtpu's compile-only v5e devices: a tiny ResNet step, its figures in --json,
  and --check's exit status when the HBM is made too small."""
  args = [sys.executable, os.path.join(ROOT, 'benchmarks', 'tpu_compile.py'), '--config=configs/imagenet.py',
          '--topology=v5e:2x2', '--json', '--config.model.arch=resnet18', '--config.model.projector=256-256',
          '--config.batch_size=32', '--config.data.image_size=32', '--config.augment.view1.crop_size=32',
          '--config.augment.view2.crop_size=32']
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')
  out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['chips'] == 4 and r['fits'] and r['tflop'] > 0 and r['hbm_gb_accessed'] > 0
  assert r['collectives']['all-reduce']['count'] >= 1
  assert 0 < r['memory_gib']['peak'] < 1
  out = subprocess.run(args + ['--check', '--hbm_gib=0.51'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == tpu_compile.NOT_FIT, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith('error: does not fit on v5e:2x2: per-chip batch 8')


def test_time_and_cost_row_is_a_range_from_the_roofline():
  r = {'topology': 'v5e:4x4', 'chips': 16, 'batch_size': 2048, 'roofline_seconds': 0.2, 'compute_seconds': 0.1,
       'memory_seconds': 0.2, 'memory_gib': {'peak': 10.0, 'hbm': 16}, 'tflop': 6.5, 'hbm_gb_accessed': 160}
  t = tpu_compile.time_and_cost(r, 36_000)
  assert t['slice'] == 'v5litepod-16'
  assert t['hours'] == pytest.approx((2.0, 3.0)) and t['chip_hours'] == pytest.approx((32, 48))
  assert t['cost'] == pytest.approx((32 * 1.20, 48 * 1.20))
  assert tpu_compile.table_row(r, 36_000).startswith('| v5litepod-16 | 16 | 128 | 10.00 of 16 |')
