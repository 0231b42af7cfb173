"""Writes tests/data/timm_vit_golden.npz: what timm's VisionTransformer computes on fixed random weights and a fixed
input, for tests/test_vit.py (which needs no torch or timm).

  python3 -m venv /work/tvenv && /work/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 numpy
  PYTHONPATH=. /work/tvenv/bin/python tests/data/make_timm_golden.py

The weights are ``timm_weights.random_state_dict(arch, WEIGHT_SEED, pos_embed, image_size)`` (numpy only: the test
rebuilds the same ones), loaded with ``strict=True`` into ``timm.models.vision_transformer.VisionTransformer``
with ``num_classes=0`` (the class token after the final norm is the output), in eval mode, float32. The input is
N(0, 1) from numpy's ``default_rng(INPUT_SEED)``, NCHW. Saved (float32):

- ``<case>_output`` for each case of CASES (its input is not stored: the test draws it again from INPUT_SEED): ``vit_micro4`` (learned embedding, 16×16),
  ``vit_micro4_sincos`` (the MoCo v3 table loaded as its pos_embed), ``vit_s16`` (learned, 224×224, 2 images);
  ``<case>_block1``: the class token after the second block (localises an error);
- ``params_<arch>``: timm's parameter count of ``vit_tiny/small/base_patch16_224`` with ``num_classes=0``;
- ``moco_sincos_<h>x<w>_<dim>``: MoCo v3's ``build_2d_sincos_position_embedding`` as its vits.py computes it
  (``torch.meshgrid(grid_w, grid_h)``, the four sin/cos blocks, a zero class-token row), written here from that
  description in torch (square grids: the official code's only case; its flattening for h ≠ w does not follow the
  patches' row-major order).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from vicreg_jax.models import timm_weights  # noqa: E402  (numpy only)

WEIGHT_SEED = 0
INPUT_SEED = 1
# case: (arch, pos_embed, image_size, batch)
CASES = {'vit_micro4': ('vit_micro4', 'learned', 16, 4), 'vit_micro4_sincos': ('vit_micro4', 'sincos', 16, 4),
         'vit_s16': ('vit_s16', 'learned', 224, 2)}
TIMM_NAMES = {'vit_ti16': 'vit_tiny_patch16_224', 'vit_s16': 'vit_small_patch16_224',
              'vit_b16': 'vit_base_patch16_224'}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'timm_vit_golden.npz')


def moco_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
  grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                  indexing='ij')
  pos_dim = dim // 4
  omega = 1.0 / temperature**(torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
  out_w = torch.einsum('m,d->md', grid_w.flatten(), omega)
  out_h = torch.einsum('m,d->md', grid_h.flatten(), omega)
  table = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)
  return torch.cat([torch.zeros(1, dim), table], dim=0).numpy()


def run(arch: str, pos_embed: str, size: int, batch: int, seed: int) -> dict:
  patch, width, depth, heads = timm_weights.ARCHS[arch]
  model = VisionTransformer(img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                            num_classes=0).eval()
  sd = timm_weights.random_state_dict(arch, WEIGHT_SEED, pos_embed, size)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
  seen = {}
  hook = model.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__('block1', o[:, 0]))
  with torch.inference_mode():
    out = model(torch.from_numpy(x))
  hook.remove()
  return {'output': out.numpy(), 'block1': seen['block1'].numpy()}


def main():
  torch.manual_seed(0)
  out = {'versions': np.array(f'torch {torch.__version__}, timm {timm.__version__}')}
  for case, (arch, pos, size, batch) in CASES.items():
    for k, v in run(arch, pos, size, batch, INPUT_SEED).items():
      out[f'{case}_{k}'] = v
    print(case, 'output std', out[f'{case}_output'].std())
  for arch, name in TIMM_NAMES.items():
    model = timm.create_model(name, pretrained=False, num_classes=0)
    out[f'params_{arch}'] = np.array(sum(p.numel() for p in model.parameters()))
    print(name, int(out[f'params_{arch}']))
  for h, w, dim in ((14, 14, 384), (4, 4, 64), (6, 6, 384), (2, 2, 8)):
    out[f'moco_sincos_{h}x{w}_{dim}'] = moco_sincos(h, w, dim)
  np.savez_compressed(OUT, **out)
  print('wrote', OUT, os.path.getsize(OUT), 'bytes;', out['versions'])


if __name__ == '__main__':
  main()
