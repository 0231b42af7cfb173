"""Collapse diagnostics of a matrix of representations or embeddings [N, D].

NumPy (float64, for final evaluation): ``singular_values``, ``rankme``, ``rankme_from_spectrum``.
JAX (float32, jit-able, for a global batch during training): ``collapse_stats``, ``spectrum``.
Plots of normalised spectra: ``spectrum_plot``, ``save_spectrum_plot``, and the command

  python -m vicreg_jax.evaluate.diagnostics --workdirs=DIR1,DIR2 [--labels=A,B] --out=spectra.png

which draws the spectra that finished runs wrote to ``DIR/spectra.npz`` (keys ``representations``,
``embeddings``).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  import jax

PANELS = ('representations', 'embeddings')


def singular_values(x: np.ndarray) -> np.ndarray:
  """Singular values of ``x`` [N, D] (float64), sorted in decreasing order."""
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def rankme_from_spectrum(s: np.ndarray, eps: float = 1e-7) -> float:
  """RankMe of the singular values ``s``: p_k = σ_k / Σσ + eps; exp(-Σ p_k log p_k)."""
  s = np.asarray(s, np.float64)
  p = s / max(s.sum(), 1e-12) + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def rankme(x: np.ndarray, eps: float = 1e-7) -> float:
  """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values of ``x`` [N, D].

  p_k = σ_k / Σσ + eps; RankMe = exp(-Σ p_k log p_k). Between 1 (rank one) and min(N, D) (flat spectrum).
  """
  return rankme_from_spectrum(singular_values(x), eps)


def unit_std(z: np.ndarray) -> float:
  """Complete-collapse score of embeddings ``z`` [N, D]: the mean per-dimension std of the rows scaled to unit
  norm, times √D. About 1 for directions spread over the sphere (each coordinate's std is then ≈ 1/√D),
  0 when every input maps to the same direction; unlike the raw std it does not depend on the embeddings'
  scale (BYOL, SimSiam and SwAV do not fix it)."""
  z = np.asarray(z, np.float64)
  unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.std(unit, axis=0)) * np.sqrt(z.shape[1]))


def spectrum(x: jax.Array) -> jax.Array:
  """Singular values of ``x`` [N, D] in float32, sorted in decreasing order (min(N, D) of them; jit-able).

  ``jnp.linalg.svd(compute_uv=False)`` rather than the eigenvalues of the smaller Gram matrix: the Gram
  matrix squares the condition number, so in float32 every singular value below ~5e-4·σ_1 reads as ~5e-4·σ_1
  (a rank-one x gets RankMe 1.3 instead of 1.0), while the SVD is accurate to ~1e-7·σ_1, which is what a
  collapse diagnostic needs. Its cost (one min(N, D)-sized SVD) is fine for a diagnostic run every few steps.
  """
  import jax.numpy as jnp
  s = jnp.linalg.svd(jnp.asarray(x, jnp.float32), compute_uv=False)
  return jnp.sort(jnp.clip(s, 0.0))[::-1]


def collapse_stats(x: jax.Array, eps: float = 1e-7, block: int = 1024, s: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
  """Collapse statistics of ``x`` [N, D] (float32 scalars; jit-able).

  std_mean, std_min: mean and minimum over dimensions of the per-dimension std over the batch (ddof=0).
  corr_offdiag: mean |C_ij| over i != j of the D×D correlation matrix C, with std + 1e-6 as the normaliser
    (a constant dimension correlates 0 with everything, no NaN); 0 is decorrelated, 1 is one direction.
    C is computed ``block`` rows at a time, so no D×D matrix is held in memory.
  rankme: RankMe of ``spectrum(x)``, the same definition as ``rankme`` (p_k = σ_k / Σσ + eps); pass ``s`` if
    that spectrum is already computed.
  """
  import jax
  import jax.numpy as jnp
  x = jnp.asarray(x, jnp.float32)
  n, d = x.shape
  xc = x - x.mean(0)
  std = jnp.sqrt(jnp.mean(xc * xc, 0))
  z = xc / ((std + 1e-6) * np.sqrt(n))  # C = zᵀ z
  b = min(block, d)
  nb = -(-d // b)
  rows = jnp.pad(z, ((0, 0), (0, nb * b - d))).T.reshape(nb, b, n)  # zero padding adds zeros to C
  abs_sum = jax.lax.map(lambda r: jnp.abs(jnp.matmul(r, z, precision='highest')).sum(), rows).sum()
  diag = jnp.sum(z * z)  # Σ_i C_ii, all non-negative
  s = spectrum(x) if s is None else s
  p = s / jnp.maximum(s.sum(), 1e-12) + eps
  return {
      'std_mean': std.mean(),
      'std_min': std.min(),
      'corr_offdiag': (abs_sum - diag) / max(d * (d - 1), 1),
      'rankme': jnp.exp(-jnp.sum(p * jnp.log(p))),
  }


def _figure(spectra: dict, title: str | None, normalize: bool = False):
  """A matplotlib Figure (Agg, no pyplot state) of σ_k (or σ_k/σ_1 with ``normalize``) against k, log y
  down to 1e-8 of the largest value; one panel per panel name (or one panel for plain arrays); each line
  labelled with its RankMe. Absolute values show a collapse in scale (embeddings shrinking to a point) that
  the normalised shape and RankMe, both scale-free, do not."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  nested = all(isinstance(v, dict) for v in spectra.values()) and spectra
  panels = list(dict.fromkeys(p for v in spectra.values() for p in v)) if nested else [None]
  fig = Figure(figsize=(5 * len(panels), 4), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  for i, panel in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    top = 0.0
    for label, v in spectra.items():
      if nested and panel not in v:
        continue
      s = np.sort(np.asarray(v[panel] if nested else v, np.float64).ravel())[::-1]
      if s.size == 0 or s[0] <= 0:
        continue
      r = s / s[0] if normalize else s
      top = max(top, r[0])
      ax.plot(np.arange(1, s.size + 1), np.where(r > 0, r, np.nan),
              label=f'{label} (RankMe {rankme_from_spectrum(s):.1f})')
    ax.set_yscale('log')
    if ax.lines:
      ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-8 * top))  # below float32 resolution is rounding noise
    ax.set_xlabel('k')
    ax.set_ylabel('σ_k / σ_1' if normalize else 'singular value σ_k')
    ax.grid(True, which='major', alpha=0.3)
    if panel is not None:
      ax.set_title(panel)
    if ax.lines:
      ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  return fig


def spectrum_plot(spectra: dict[str, dict[str, np.ndarray]] | dict[str, np.ndarray],
                  title: str | None = None, normalize: bool = False) -> np.ndarray:
  """Singular values σ_k (or σ_k/σ_1 with ``normalize``; log y) against k, as a uint8 RGB image [H, W, 3].

  ``spectra``: run label -> {panel name -> singular values} (one panel per name, one line per run), or
  label -> singular values (a single panel). Legends show each line's RankMe.
  """
  fig = _figure(spectra, title, normalize)
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_spectrum_plot(spectra: dict[str, dict[str, np.ndarray]] | dict[str, np.ndarray], path: str,
                       title: str | None = None, normalize: bool = False) -> None:
  """Writes the figure of ``spectrum_plot`` to ``path`` as a PNG."""
  with open(path, 'wb') as f:
    _figure(spectra, title, normalize).savefig(f, format='png')


def main() -> None:
  """The command: side-by-side spectra (representations | embeddings) of finished runs, into one PNG."""
  from absl import app, flags
  flags.DEFINE_list('workdirs', None, 'Finished pretraining runs, each holding spectra.npz.', required=True)
  flags.DEFINE_list('labels', None, 'Legend labels, one per workdir (default: the directory names).')
  flags.DEFINE_string('out', 'spectra.png', 'The PNG to write.')
  flags.DEFINE_string('title', None, 'Figure title.')
  flags.DEFINE_bool('normalize', False, 'Plot σ_k/σ_1 (the shape only) instead of σ_k.')
  fl = flags.FLAGS

  def run(argv):
    del argv
    labels = fl.labels or [os.path.basename(os.path.normpath(w)) for w in fl.workdirs]
    if len(labels) != len(fl.workdirs):
      print(f'error: {len(labels)} labels for {len(fl.workdirs)} workdirs', file=sys.stderr)
      return 1
    spectra = {}
    for label, workdir in zip(labels, fl.workdirs):
      path = os.path.join(workdir, 'spectra.npz')
      try:
        with np.load(path) as f:
          spectra[label] = {p: f[p] for p in PANELS}
      except FileNotFoundError:
        print(f'error: {path} not found', file=sys.stderr)
        return 1
      except (OSError, KeyError, ValueError) as e:
        print(f'error: cannot read {path}: {e}'.replace('\n', ' '), file=sys.stderr)
        return 1
    save_spectrum_plot(spectra, fl.out, fl.title, fl.normalize)
    print(f'wrote {fl.out}')
    return 0

  app.run(run)


if __name__ == '__main__':
  main()
