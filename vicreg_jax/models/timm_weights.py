"""timm ``VisionTransformer`` state dicts (also MoCo v3's ``vits.py``, a subclass) ↔ the variables of our Flax ViT.

  timm                                         Flax (``vit.vit(arch)``)
  cls_token [1, 1, D]                          params/cls_token [1, 1, D]
  pos_embed [1, 1 + N, D]                      params/pos_embed (``pos_embed='learned'``); with 'sincos' the
                                               fixed table (:func:`sincos_2d`), not a parameter
  patch_embed.proj.weight [D, C, p, p]         params/patch_embed/kernel [p, p, C, D] (and bias)
  blocks.I.norm1, norm2 (weight, bias)         params/blockI/norm1, norm2 (scale, bias)
  blocks.I.attn.qkv, attn.proj [O, I]          params/blockI/qkv, proj (kernel [I, O], bias)
  blocks.I.mlp.fc1, mlp.fc2                    params/blockI/fc1, fc2
  norm (weight, bias)                          params/norm (scale, bias)

``head.*`` is ignored on the way in and not written on the way out (the backbone's output is the class token).
A state dict's ``pos_embed`` equal to MoCo v3's sin-cos table (to 1e-6) is read as ``pos_embed='sincos'``; on the
way out a sin-cos model writes that table, so timm and MoCo v3 load the result with ``strict=True``. The number of
heads is not in the weights: it is the config's ``model.num_heads``.

Only numpy here (no JAX, Flax or torch), as :mod:`torch_weights`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from vicreg_jax import errors
from vicreg_jax.models.torch_weights import StateDictError, _check_keys, as_numpy, flatten

# name: (patch size, width D, depth, timm's number of heads): vit.ARCHS is this table (vit.py imports it).
ARCHS = {
    'vit_ti16': (16, 192, 12, 3),
    'vit_s16': (16, 384, 12, 6),
    'vit_b16': (16, 768, 12, 12),
    'vit_micro4': (4, 64, 4, 4),  # ours: 16×16 digits and tests
}
MLP_RATIO = 4
ANCHOR = 'patch_embed.proj.weight'  # the key that marks a ViT state dict


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
  """MoCo v3's fixed position embedding, float32 [1 + grid_h·grid_w, dim], row 0 (the class token's) zero. For the
  patch in row r and column c (row-major, as the patches are flattened) the dim/4 frequencies
  ``ω_k = 1/temperature^(k/(dim/4))`` give ``[sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)]``: the official code's
  ``torch.meshgrid(grid_w, grid_h)`` ('ij') makes its first coordinate the patch's row."""
  if dim % 4:
    raise errors.ConfigError(f'a 2-D sin-cos position embedding needs a width divisible by 4, not {dim}.')
  omega = 1.0 / temperature**(np.arange(dim // 4, dtype=np.float32) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32), indexing='ij')
  out_r = rows.reshape(-1)[:, None] * omega[None]
  out_c = cols.reshape(-1)[:, None] * omega[None]
  table = np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], axis=1)
  return np.concatenate([np.zeros((1, dim), np.float32), table.astype(np.float32)], axis=0)


def _sincos_like(shape) -> np.ndarray:
  """The sin-cos table in a state dict's ``pos_embed`` shape [1, 1 + g·g, D] (a square grid)."""
  g = int(round((shape[1] - 1)**0.5))
  return sincos_2d(g, g, shape[2])[None]


def _check_arch(arch: str) -> None:
  if arch not in ARCHS:
    raise errors.ConfigError(f'Unknown ViT {arch!r}; choose one of {sorted(ARCHS)}.')


def layout(arch: str, pos_embed: str = 'sincos', image_size: int = 224, channels: int = 3) -> list:
  """One entry per tensor, in timm's ``state_dict()`` order: ``(torch key, torch shape, Flax path, kind)``, kind
  'linear' (transposed), 'conv' (OIHW ↔ HWIO) or 'same'. ``pos_embed`` 'sincos' has an entry with path None."""
  _check_arch(arch)
  p, d, depth, _ = ARCHS[arch]
  g = image_size // p
  entries = [('cls_token', (1, 1, d), ('cls_token',), 'same'),
             ('pos_embed', (1, 1 + g * g, d), ('pos_embed',) if pos_embed == 'learned' else None, 'same'),
             ('patch_embed.proj.weight', (d, channels, p, p), ('patch_embed', 'kernel'), 'conv'),
             ('patch_embed.proj.bias', (d,), ('patch_embed', 'bias'), 'same')]
  norm = lambda t, f: [(f'{t}.weight', (d,), f + ('scale',), 'same'), (f'{t}.bias', (d,), f + ('bias',), 'same')]  # noqa: E731

  def linear(t, f, out, inp):
    return [(f'{t}.weight', (out, inp), f + ('kernel',), 'linear'), (f'{t}.bias', (out,), f + ('bias',), 'same')]

  for i in range(depth):
    b, f = f'blocks.{i}', (f'block{i}',)
    entries += (norm(f'{b}.norm1', f + ('norm1',)) + linear(f'{b}.attn.qkv', f + ('qkv',), 3 * d, d) +
                linear(f'{b}.attn.proj', f + ('proj',), d, d) + norm(f'{b}.norm2', f + ('norm2',)) +
                linear(f'{b}.mlp.fc1', f + ('fc1',), MLP_RATIO * d, d) +
                linear(f'{b}.mlp.fc2', f + ('fc2',), d, MLP_RATIO * d))
  return entries + norm('norm', ('norm',))


def infer(state_dict: Mapping[str, object]) -> tuple[str, str, int]:
  """``(arch, pos_embed, image_size)`` of a timm ViT state dict: the arch from the patch size, width and depth, the
  position embedding 'sincos' when ``pos_embed`` is MoCo v3's table, the image side from its grid."""
  if ANCHOR not in state_dict or 'pos_embed' not in state_dict:
    raise StateDictError(f'not a ViT state dict: no {ANCHOR} or pos_embed.')
  d, _, p, _ = as_numpy(state_dict[ANCHOR]).shape
  depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
  arch = next((a for a, (pa, da, dep, _) in ARCHS.items() if (pa, da, dep) == (p, d, depth)), None)
  if arch is None:
    raise StateDictError(f'a ViT with {p}×{p} patches, width {d} and depth {depth} is none of {sorted(ARCHS)}.')
  pos = as_numpy(state_dict['pos_embed']).astype(np.float32)
  g = int(round((pos.shape[1] - 1)**0.5))
  sincos = pos.shape == (1, 1 + g * g, d) and np.allclose(pos[0], sincos_2d(g, g, d), rtol=0, atol=1e-6)
  return arch, 'sincos' if sincos else 'learned', g * p


def from_timm(state_dict: Mapping[str, object], arch: Optional[str] = None, pos_embed: Optional[str] = None,
              image_size: Optional[int] = None) -> dict:
  """The Flax variables ``{'params'}`` (nested dicts of float32 numpy arrays) of ``vit.vit(arch,
  pos_embed=…, image_size=…)`` holding a timm state dict's weights (None: inferred, :func:`infer`). ``head.*`` is
  ignored; any other key missing or left over, or a shape that differs, is a :class:`StateDictError`."""
  found = infer(state_dict)
  arch, pos_embed, image_size = arch or found[0], pos_embed or found[1], image_size or found[2]
  entries = layout(arch, pos_embed, image_size)
  given = {k for k in state_dict if not k.startswith('head.')}
  _check_keys(f'not a {arch} state dict', given, {e[0] for e in entries})
  params = {}
  for tkey, shape, path, kind in entries:
    value = as_numpy(state_dict[tkey]).astype(np.float32)
    if value.shape != shape:
      raise StateDictError(f'not a {arch} state dict: {tkey} has shape {value.shape}, expected {shape}.')
    if path is None:
      continue  # the fixed sin-cos table
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.ascontiguousarray(value.T if kind == 'linear' else
                                          value.transpose(2, 3, 1, 0) if kind == 'conv' else value)
  return {'params': params}


def to_timm(variables: Mapping, arch: str, pos_embed: str = 'sincos', image_size: int = 224) -> dict:
  """The timm state dict (``{key: float32 numpy array}``, in ``state_dict()`` order, no ``head``) of our ViT's
  variables ``{'params'}``; a sin-cos model writes its table as ``pos_embed``. :class:`StateDictError` if the
  variables are not that ViT's."""
  entries = layout(arch, pos_embed, image_size)
  flat = flatten(variables.get('params', {}))
  _check_keys(f'not the variables of a Flax {arch}', {'/'.join(k) for k in flat},
              {'/'.join(e[2]) for e in entries if e[2] is not None})
  state_dict = {}
  for tkey, shape, path, kind in entries:
    if path is None:
      value = _sincos_like(shape)
    else:
      value = as_numpy(flat[path]).astype(np.float32)
      value = value.T if kind == 'linear' else value.transpose(3, 2, 0, 1) if kind == 'conv' else value
    if value.shape != shape:
      raise StateDictError(f'not the variables of a Flax {arch}: {"/".join(path)} gives {tkey} the shape '
                           f'{value.shape}, expected {shape}.')
    state_dict[tkey] = np.ascontiguousarray(value)
  return state_dict


def random_state_dict(arch: str, seed: int = 0, pos_embed: str = 'learned', image_size: int = 224) -> dict:
  """A random timm ViT state dict, the same for the same arguments on any machine (numpy's PCG64 from ``seed``),
  for golden tests against timm: Linear and patch weights N(0, 1/fan_in) (the residual stream keeps its scale),
  biases and a learned position embedding N(0, 0.1²), the class token N(0, 1), LayerNorm scales U(0.5, 1.5) and
  offsets N(0, 0.1²)."""
  rng = np.random.default_rng(seed)
  out = {}
  for tkey, shape, _, kind in layout(arch, pos_embed, image_size):
    if tkey == 'pos_embed' and pos_embed == 'sincos':
      value = _sincos_like(shape)
    elif kind in ('linear', 'conv'):
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    elif tkey == 'cls_token':
      value = rng.standard_normal(shape)
    elif tkey.endswith('norm1.weight') or tkey.endswith('norm2.weight') or tkey == 'norm.weight':
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    out[tkey] = value.astype(np.float32)
  return out
