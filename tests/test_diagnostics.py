"""Collapse diagnostics on inputs of known spectrum, std and correlation; the spectrum plots and command."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vicreg_jax import collapse
from vicreg_jax.evaluate import diagnostics

from conftest import REPO


def orthonormal(rows, cols, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
  return q


def test_rankme_of_k_equal_singular_values_is_k():
  for k in (1, 3, 10):
    x = orthonormal(200, k, 0) @ (5.0 * orthonormal(50, k, 1).T)  # singular values: k fives, then zeros
    assert abs(collapse.rankme(x) - k) < 0.01 * k
    s = collapse.singular_values(x)
    assert np.sum(s > 1e-6) == k


def test_rankme_of_a_skewed_spectrum_is_between_one_and_rank():
  s = np.array([10.0, 1.0, 0.1])
  x = orthonormal(100, 3, 2) @ np.diag(s) @ orthonormal(20, 3, 3).T
  p = s / s.sum()
  expected = np.exp(-np.sum(p * np.log(p)))  # the definition, on the known spectrum
  assert abs(collapse.rankme(x) - expected) < 1e-3
  assert 1.0 < expected < 2.0
  assert collapse.rankme_from_spectrum(s) == pytest.approx(expected, abs=1e-4)


def test_rank_three_matrix_has_rankme_three_and_three_nonzero_singular_values():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 32))).astype(np.float32)
  assert float(collapse.collapse_stats(x)['rankme']) == pytest.approx(collapse.rankme(x), abs=1e-3)
  assert abs(float(collapse.collapse_stats(x)['rankme']) - 3) < 0.1
  s = np.asarray(collapse.spectrum(x))
  assert s.shape == (32,) and np.all(np.diff(s) <= 0)
  assert np.sum(s > 1e-3 * s[0]) == 3 and np.all(s[3:] < 1e-5 * s[0])


def test_orthogonal_columns_are_full_rank_and_uncorrelated_parallel_columns_are_correlated():
  d = 32
  x = np.random.default_rng(4).normal(size=(256, d))
  x = 3.0 * np.linalg.qr(x - x.mean(0))[0]  # centred orthogonal columns of equal norm: whitened data
  stats = collapse.collapse_stats(x.astype(np.float32))
  assert float(stats['rankme']) == pytest.approx(d, rel=1e-4)
  assert float(stats['corr_offdiag']) < 1e-4
  rng = np.random.default_rng(5)
  a = rng.uniform(0.5, 2.0, size=d) * rng.choice([-1.0, 1.0], size=d)
  parallel = np.outer(rng.normal(size=256), a).astype(np.float32)  # x[:, j] = a_j v
  stats = collapse.collapse_stats(parallel)
  assert float(stats['corr_offdiag']) == pytest.approx(1.0, abs=1e-3)
  assert float(stats['rankme']) == pytest.approx(1.0, abs=0.01)


def test_std_against_numpy_with_a_constant_column_and_blocked_correlation():
  rng = np.random.default_rng(6)
  x = (rng.normal(size=(64, 40)) * rng.uniform(0.1, 3.0, size=40)).astype(np.float32)
  x[:, 7] = 2.5  # zero variance
  std = np.sqrt(np.mean((x.astype(np.float64) - x.mean(0, dtype=np.float64)) ** 2, axis=0))
  xc = x.astype(np.float64) - x.mean(0, dtype=np.float64)
  corr = (xc.T @ xc / len(x)) / np.outer(std + 1e-6, std + 1e-6)
  expected_corr = np.abs(corr[~np.eye(40, dtype=bool)]).mean()
  for block in (1024, 16):  # one block; three blocks, the last one padded
    stats = {k: float(v) for k, v in collapse.collapse_stats(x, block=block).items()}
    assert all(np.isfinite(v) for v in stats.values())
    assert stats['std_mean'] == pytest.approx(std.mean(), rel=1e-5)
    assert stats['std_min'] == pytest.approx(0.0, abs=1e-6)
    assert stats['corr_offdiag'] == pytest.approx(expected_corr, rel=1e-4)


@pytest.mark.parametrize('shape', [(64, 16), (16, 64), (48, 48)])
def test_jax_spectrum_and_rankme_agree_with_numpy_also_under_jit(shape):
  x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
  s, r = collapse.singular_values(x), collapse.rankme(x)
  for f in (collapse.spectrum, jax.jit(collapse.spectrum)):
    np.testing.assert_allclose(np.asarray(f(x)), s, rtol=1e-4)
  for f in (collapse.collapse_stats, jax.jit(collapse.collapse_stats)):
    assert float(f(x)['rankme']) == pytest.approx(r, rel=1e-4)


def test_spectrum_plot_is_an_rgb_image_with_one_panel_per_name():
  flat, rank3 = np.ones(32), np.r_[3.0, 2.0, 1.0, np.zeros(29)]
  one = diagnostics.spectrum_plot({'flat': flat, 'rank 3': rank3}, title='t')
  two = diagnostics.spectrum_plot({'a': {'representations': flat, 'embeddings': rank3},
                                   'b': {'representations': rank3, 'embeddings': flat}})
  for img in (one, two):
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10
  assert two.shape[1] > one.shape[1] and two.shape[0] == one.shape[0]


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'vicreg_jax.evaluate.diagnostics', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_command_draws_the_spectra_of_two_runs(tmp_path):
  rank3 = np.r_[3.0, 2.0, 1.0, np.zeros(29)]
  for name, s in (('vicreg', np.ones(32)), ('inv', rank3)):
    (tmp_path / name).mkdir()
    np.savez(tmp_path / name / 'spectra.npz', representations=s, embeddings=s[:16])
  out = tmp_path / 'spectra.png'
  res = _cli(f'--workdirs={tmp_path / "vicreg"},{tmp_path / "inv"}', '--labels=VICReg,invariance-only',
             f'--out={out}')
  assert res.returncode == 0, res.stderr
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_command_without_spectra_fails_with_one_error_line(tmp_path):
  (tmp_path / 'empty').mkdir()
  res = _cli(f'--workdirs={tmp_path / "empty"}', f'--out={tmp_path / "x.png"}')
  assert res.returncode == 1
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and 'spectra.npz' in lines[0], res.stderr
  assert not (tmp_path / 'x.png').exists()


def test_absolute_plot_shows_a_collapse_in_scale_that_the_normalised_one_hides():
  s = np.geomspace(10.0, 0.1, 50)
  same = {'run a': s, 'run b': s}
  shrunk = {'run a': s, 'run b': s * 1e-4}  # same shape, 10^4 times smaller (embeddings shrinking to a point)
  def differing(a, b):  # fraction of pixels that differ (anti-aliasing of rounding differences aside)
    return np.mean(np.abs(a.astype(int) - b.astype(int)).max(-1) > 8)
  normalised = differing(diagnostics.spectrum_plot(shrunk, normalize=True),
                         diagnostics.spectrum_plot(same, normalize=True))
  absolute = differing(diagnostics.spectrum_plot(shrunk), diagnostics.spectrum_plot(same))
  assert normalised < 1e-4 < 0.002 < absolute, (normalised, absolute)
