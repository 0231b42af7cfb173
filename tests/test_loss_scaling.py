"""The D×D products of VICReg's covariance and Barlow Twins' cross-correlation are split between the replicas for
any embedding dimension D, not only one divisible by the device count: with D = 100 or 394 on 6 devices (a
sub-mesh of conftest's 8) and on 12 (a process of its own, with 12 simulated devices) the sharded losses and
gradients equal the single-device ones, and one device's FLOPs (XLA's cost analysis of the compiled value and
gradient) are at most 1.25 × the single-device FLOPs / devices. Also: the bfloat16 all-gather (``gather_dtype``).

Run as a script (``python tests/test_loss_scaling.py DEVICES``, with that many simulated devices in XLA_FLAGS) the
module runs the same checks on all the process's devices: the 12-device test starts it so.
"""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vicreg_jax import errors, losses

# (N, D): D not a multiple of 6, 8 or 12; 4 < 6: some replicas hold only padding columns.
VALUE_SHAPES = ((36, 100), (12, 4))
FLOPS_SHAPE = (72, 394)  # N·D² dominates the O(N·D) terms; compiles in about a second
MAX_OVER_IDEAL = 1.25

OBJECTIVES = {
    'vicreg': lambda a, b, ax: losses.vicreg_loss(a, b, sim_coeff=3.0, std_coeff=7.5, cov_coeff=0.4, axis_name=ax),
    'barlow_twins': lambda a, b, ax: losses.barlow_twins_loss(a, b, lambd=0.05, axis_name=ax),
}


def _covariance(a, b, axis_name):
  """VICReg's covariance part alone: the two views' off-diagonal sums of the gathered, centred batch."""
  za, zb = (losses.gather_batch(z, axis_name) for z in (a, b))
  return losses.off_diagonal_sq_sum(za - za.mean(0), axis_name) + losses.off_diagonal_sq_sum(zb - zb.mean(0),
                                                                                             axis_name)


FLOPS_OBJECTIVES = {'covariance': _covariance,
                    'vicreg': lambda a, b, ax: OBJECTIVES['vicreg'](a, b, ax)[0],
                    'barlow_twins': lambda a, b, ax: OBJECTIVES['barlow_twins'](a, b, ax)[0]}


def _inputs(n, d, seed=0):
  """Two correlated views with a non-trivial covariance, per-dimension stds straddling 1 (the variance hinge is
  active on some dimensions only)."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d)) * rng.uniform(0.4, 1.6, size=(1, d))
  a = a + 0.3 * a @ (rng.normal(size=(d, d)) / np.sqrt(d))
  b = a + 0.5 * rng.normal(size=(n, d))
  return a.astype(np.float32), b.astype(np.float32)


def _mesh(devices):
  return jax.sharding.Mesh(np.array(jax.devices()[:devices]), ('data',))


def _sharded(objective, devices, with_metrics=True):
  """``objective(a, b, axis_name) -> (loss, metrics)`` (or a scalar) under shard_map over ``devices`` devices,
  differentiated w.r.t. both views: (every replica's metrics, the gradients w.r.t. each replica's rows)."""
  def body(a, b):
    if with_metrics:
      (_, metrics), grads = jax.value_and_grad(lambda a, b: objective(a, b, 'data'), argnums=(0, 1),
                                               has_aux=True)(a, b)
      return {k: v[None] for k, v in metrics.items()}, grads
    value, grads = jax.value_and_grad(lambda a, b: objective(a, b, 'data'), argnums=(0, 1))(a, b)
    return value[None], grads

  return jax.jit(jax.shard_map(body, mesh=_mesh(devices), in_specs=(P('data'), P('data')),
                               out_specs=(P('data'), (P('data'), P('data'))), check_vma=False))


def _single(objective, with_metrics=True):
  return jax.jit(jax.value_and_grad(lambda a, b: objective(a, b, None), argnums=(0, 1), has_aux=with_metrics))


def check_values_and_gradients(devices: int) -> None:
  """Every replica's loss and terms equal the single-device ones (rtol 1e-5), and each replica's gradient w.r.t.
  its rows is ``devices`` × the single-device gradient (the convention of vicreg_jax.losses)."""
  for name, objective in OBJECTIVES.items():
    for n, d in VALUE_SHAPES:
      a, b = _inputs(n, d, seed=n + d)
      (_, want), want_grads = _single(objective)(a, b)
      metrics, grads = _sharded(objective, devices)(a, b)
      for k in want:
        np.testing.assert_allclose(metrics[k], np.full(devices, want[k]), rtol=1e-5, atol=1e-6,
                                   err_msg=f'{name} {k} (N={n}, D={d}, {devices} devices)')
      for got, single_grad in zip(grads, want_grads):
        scale = float(np.abs(single_grad).max())
        np.testing.assert_allclose(np.asarray(got) / devices, single_grad, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=f'{name} gradient (N={n}, D={d}, {devices} devices)')


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def flops_over_ideal(devices: int) -> dict:
  """name -> one device's FLOPs (value and gradient, sharded over ``devices``) / (single-device FLOPs / devices)."""
  n, d = FLOPS_SHAPE
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
  ratios = {}
  for name, objective in FLOPS_OBJECTIVES.items():
    single = _flops(_single(objective, with_metrics=False).lower(spec, spec).compile())
    sharded = _flops(_sharded(objective, devices, with_metrics=False).lower(spec, spec).compile())
    ratios[name] = sharded / (single / devices)
  return ratios


def check_flops(devices: int) -> dict:
  ratios = flops_over_ideal(devices)
  for name, ratio in ratios.items():
    assert ratio <= MAX_OVER_IDEAL, (f'{name} on {devices} devices (N, D = {FLOPS_SHAPE}): one device computes '
                                     f'{ratio:.2f} × its share of the single-device FLOPs: {ratios}')
  return ratios


# ------------------------------------------------------------------------------------------------------ tests


def test_6_devices_split_d_not_divisible_and_match_one_device():
  check_values_and_gradients(6)


def test_6_devices_flops_are_a_sixth():
  ratios = check_flops(6)
  assert all(r >= 0.9 for r in ratios.values()), ratios  # the cost analysis does see the whole computation


def test_12_devices_in_a_process_of_their_own():
  """The same checks with 12 simulated devices (more than conftest's 8): D = 100 and 394 are not multiples of 12."""
  from conftest import REPO, job_env
  proc = subprocess.run([sys.executable, __file__, '12'], cwd=REPO, env=job_env(12), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  ratios = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(ratios) == set(FLOPS_OBJECTIVES) and max(ratios.values()) <= MAX_OVER_IDEAL, ratios


# --- the bfloat16 all-gather ------------------------------------------------------------------------------


@functools.cache
def _vicreg_gathered(dtype, devices=8):
  return _sharded(lambda a, b, ax: losses.vicreg_loss(a, b, gather_dtype=dtype, axis_name=ax), devices)


def test_bfloat16_gather_is_close_to_float32():
  """Gathering in bfloat16 rounds every entry to 8 significant bits before the float32 statistics: the loss and
  each term move by a small relative amount (measured on these inputs: at most 4e-4 of a term, 5e-5 of the loss),
  never by nothing (the cast is there); the gradients by about 0.5 % in norm, asserted below 2 % (mostly the
  rounding of z_a - z_b in the invariance term's gradient; the bfloat16 reduce-scatter of the cotangents adds
  little)."""
  a, b = _inputs(64, 40, seed=1)
  m32, g32 = _vicreg_gathered('float32')(a, b)
  m16, g16 = _vicreg_gathered('bfloat16')(a, b)
  for k in m32:
    rel = abs(float(m16[k][0]) - float(m32[k][0])) / abs(float(m32[k][0]))
    assert 0 < rel < 1e-2, (k, rel)
    np.testing.assert_array_equal(m16[k], np.full(8, m16[k][0]))  # one global loss on every replica
  for got, want in zip(g16, g32):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got))
    assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
  # Rows that are bfloat16 values already gather exactly: the same loss as float32.
  a16, b16 = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (a, b))
  np.testing.assert_allclose(_vicreg_gathered('bfloat16')(a16, b16)[0]['loss'],
                             _vicreg_gathered('float32')(a16, b16)[0]['loss'], rtol=1e-6)


def test_gather_dtype_without_an_axis_changes_nothing_and_a_wrong_one_is_refused():
  a, b = _inputs(16, 8)
  assert float(losses.vicreg_loss(a, b, gather_dtype='bfloat16')[0]) == float(losses.vicreg_loss(a, b)[0])
  for fn in (losses.vicreg_loss, losses.barlow_twins_loss):
    with pytest.raises(errors.ConfigError, match="gather_dtype must be one of .*'float16'"):
      fn(a, b, gather_dtype='float16')


if __name__ == '__main__':
  count = int(sys.argv[1])
  assert jax.device_count() == count, (jax.device_count(), count)
  check_values_and_gradients(count)
  print(json.dumps(check_flops(count)))
