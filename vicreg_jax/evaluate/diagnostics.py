"""Plots of the normalised singular-value spectra of representations and embeddings (the measures themselves
are in :mod:`vicreg_jax.collapse`): ``spectrum_plot``, ``save_spectrum_plot``, and the command

  python -m vicreg_jax.evaluate.diagnostics --workdirs=DIR1,DIR2 [--labels=A,B] --out=spectra.png

which draws the spectra that finished runs wrote to ``DIR/spectra.npz`` (keys ``representations``,
``embeddings``).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from vicreg_jax.collapse import rankme_from_spectrum

PANELS = ('representations', 'embeddings')


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
