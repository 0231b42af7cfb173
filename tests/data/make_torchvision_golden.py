"""Writes tests/data/torchvision_resnet50_golden.npz: what torchvision's ResNet-50 (and ResNet-18) compute on
fixed random weights and a fixed input, for tests/test_torch_weights.py (which needs no torch).

  python3 -m venv /work/tvenv && /work/tvenv/bin/pip install torch torchvision numpy
  PYTHONPATH=. /work/tvenv/bin/python tests/data/make_torchvision_golden.py

The weights are ``torch_weights.random_state_dict(arch, WEIGHT_SEED)`` (numpy only: the test rebuilds the same
ones), loaded with ``strict=True`` into ``torchvision.models.<arch>()`` with ``fc = Identity`` (as the official
VICReg backbone), in eval mode (BatchNorm with the running statistics). The input is N(0, 1) from numpy's
``default_rng(INPUT_SEED)``, NCHW. Saved (float32, NCHW as torch has them):

- ``input`` [2, 3, 64, 64];
- ``<arch>_output``: the pooled representation [2, 2048] (ResNet-18: [2, 512]);
- ``<arch>_layer1`` … ``<arch>_layer3``: each stage's output averaged over space (localises an error);
- ``resnet50_stem``: after the stem's max-pool [2, 64, 16, 16].

Also printed: the scale of each, and the float32 run against the same model in float64 (torch's own rounding).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from vicreg_jax.models import torch_weights  # noqa: E402  (numpy only)

WEIGHT_SEED = 0
INPUT_SEED = 1
INPUT_SHAPE = (2, 3, 64, 64)
ARCHS = ('resnet50', 'resnet18')
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torchvision_resnet50_golden.npz')


def run(arch: str, x: np.ndarray, dtype=torch.float32) -> dict:
  model = getattr(torchvision.models, arch)(weights=None)
  model.fc = torch.nn.Identity()
  sd = torch_weights.random_state_dict(arch, WEIGHT_SEED)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model = model.to(dtype).eval()
  seen = {}
  hooks = [model.maxpool.register_forward_hook(lambda m, i, o: seen.__setitem__('stem', o))]
  for i in (1, 2, 3):
    hooks.append(getattr(model, f'layer{i}').register_forward_hook(
        lambda m, inp, o, i=i: seen.__setitem__(f'layer{i}', o.mean(dim=(2, 3)))))
  with torch.inference_mode():
    seen['output'] = model(torch.from_numpy(x).to(dtype))
  for h in hooks:
    h.remove()
  return {k: v.double().numpy() for k, v in seen.items()}


def main():
  torch.manual_seed(0)
  x = np.random.default_rng(INPUT_SEED).standard_normal(INPUT_SHAPE).astype(np.float32)
  out = {'input': x, 'torch_version': np.array(f'torch {torch.__version__}, torchvision {torchvision.__version__}')}
  for arch in ARCHS:
    f32, f64 = run(arch, x), run(arch, x, torch.float64)
    for k, v in f32.items():
      if k == 'stem' and arch != 'resnet50':
        continue
      out[f'{arch}_{k}'] = v.astype(np.float32)
      print(f'{arch} {k:6s} {str(v.shape):18s} max|v| {np.abs(v).max():8.4f}  mean|v| {np.abs(v).mean():8.4f}  '
            f'std {v.std():7.4f}  float32 vs float64: max abs {np.abs(v - f64[k]).max():.2e}')
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB)')


if __name__ == '__main__':
  main()
