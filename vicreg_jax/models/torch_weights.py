"""torchvision ResNet state dicts (the official VICReg checkpoints) ↔ the variables of our Flax ResNet.

The official VICReg backbone (``torch.hub.load('facebookresearch/vicreg:main', 'resnet50')``, the file
``https://dl.fbaipublicfiles.com/vicreg/resnet50.pth``) has torchvision's parameter names and computes what
torchvision's ResNet computes (its stem pads the input by 1 and convolves with padding 2: torchvision's 3), without
``fc``; its ``resnet50x2`` / ``resnet200x2`` widen every layer, as our ``width_multiplier`` does. So one mapping
serves both, for every depth (18, 34, 50, 101, 152, 200) and width:

  torchvision                              Flax (``resnet.resnet(arch, stem='imagenet')``)
  conv1.weight [O, I, kh, kw]              params/stem_conv/kernel [kh, kw, I, O]
  bn1.weight / bias                        params/stem_bn/scale / bias
  bn1.running_mean / running_var           batch_stats/stem_bn/mean / var
  layerI.J.convK, bnK                      stage{I}_block{J+1}/Conv_{K-1}, BatchNorm_{K-1}
  layerI.J.downsample.0, downsample.1      stage{I}_block{J+1}/proj_conv, proj_bn

``num_batches_tracked`` has no counterpart (only PyTorch's momentum-free BatchNorm uses it): ignored on the way
in, written as 0 on the way out, so the result loads into torchvision with ``strict=True``; ``fc.*`` is ignored.

Only numpy here (no JAX, Flax or torch), so that a torch-only environment can import :func:`random_state_dict`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from vicreg_jax import errors

# Stage sizes and block type of every depth: the same table as resnet.ARCHS (a test checks), repeated here so that
# this module needs no Flax.
ARCHS = {
    'resnet18': ((2, 2, 2, 2), 'basic'),
    'resnet34': ((3, 4, 6, 3), 'basic'),
    'resnet50': ((3, 4, 6, 3), 'bottleneck'),
    'resnet101': ((3, 4, 23, 3), 'bottleneck'),
    'resnet152': ((3, 8, 36, 3), 'bottleneck'),
    'resnet200': ((3, 24, 36, 3), 'bottleneck'),
}
_BN = (('weight', 'params', 'scale'), ('bias', 'params', 'bias'),
       ('running_mean', 'batch_stats', 'mean'), ('running_var', 'batch_stats', 'var'))
_IGNORED_SUFFIXES = ('num_batches_tracked',)


class StateDictError(errors.UserError, ValueError):
  """A state dict (or a set of Flax variables) that is not the named ResNet's: keys missing or unexpected, or a
  shape that differs."""


def _check_arch(arch: str) -> None:
  if arch not in ARCHS:
    raise errors.ConfigError(f'Unknown architecture {arch!r}; choose one of {sorted(ARCHS)}.')


def _width(width_multiplier: float, base_width: int = 64) -> int:
  return max(1, int(round(base_width * width_multiplier)))  # as resnet.resnet


def layout(arch: str = 'resnet50', width_multiplier: float = 1.0, in_channels: int = 3) -> list:
  """The correspondence, one entry per tensor: ``(torch key, torch shape, collection, Flax path, kind)`` with kind
  'conv' (OIHW ↔ HWIO) or 'vector', in torchvision's ``state_dict()`` order (``num_batches_tracked`` left out)."""
  _check_arch(arch)
  stages, block = ARCHS[arch]
  width = _width(width_multiplier)
  expansion = 4 if block == 'bottleneck' else 1
  entries = []

  def conv(tkey, out, inp, k, flax):
    entries.append((f'{tkey}.weight', (out, inp, k, k), 'params', flax + ('kernel',), 'conv'))

  def bn(tkey, c, flax):
    for suffix, collection, leaf in _BN:
      entries.append((f'{tkey}.{suffix}', (c,), collection, flax + (leaf,), 'vector'))

  conv('conv1', width, in_channels, 7, ('stem_conv',))
  bn('bn1', width, ('stem_bn',))
  inp = width
  for i, n_blocks in enumerate(stages):
    filters = width * 2**i
    out = filters * expansion
    for j in range(n_blocks):
      t, f = f'layer{i + 1}.{j}', (f'stage{i + 1}_block{j + 1}',)
      if block == 'bottleneck':
        convs = ((filters, inp, 1), (filters, filters, 3), (out, filters, 1))
      else:
        convs = ((filters, inp, 3), (filters, filters, 3))
      for k, (o, c, size) in enumerate(convs):
        conv(f'{t}.conv{k + 1}', o, c, size, f + (f'Conv_{k}',))
        bn(f'{t}.bn{k + 1}', o, f + (f'BatchNorm_{k}',))
      strides = 2 if i > 0 and j == 0 else 1
      if inp != out or strides != 1:  # the projection shortcut: same condition in torchvision and resnet.py
        conv(f'{t}.downsample.0', out, inp, 1, f + ('proj_conv',))
        bn(f'{t}.downsample.1', out, f + ('proj_bn',))
      inp = out
  return entries


def infer_arch(state_dict: Mapping[str, object]) -> tuple[str, float]:
  """``(arch, width_multiplier)`` of a torchvision-named ResNet state dict, from its keys and ``conv1``'s width;
  :class:`StateDictError` if it is none of :data:`ARCHS`."""
  keys = set(state_dict)
  if 'conv1.weight' not in keys:
    some = ', '.join(sorted(keys)[:3])
    raise StateDictError(f'not a torchvision ResNet state dict: no key conv1.weight (its keys start {some}).')
  blocks = tuple(len({k.split('.')[1] for k in keys if k.startswith(f'layer{i}.')}) for i in range(1, 5))
  kind = 'bottleneck' if any(k.endswith('.conv3.weight') for k in keys) else 'basic'
  for arch, spec in ARCHS.items():
    if spec == (blocks, kind):
      return arch, np.shape(state_dict['conv1.weight'])[0] / 64
  raise StateDictError(f'a ResNet state dict with {blocks} {kind} blocks per stage is none of {sorted(ARCHS)}.')


def as_numpy(value) -> np.ndarray:
  """A numpy copy of a tensor-like value (numpy array, torch CPU tensor, jax array)."""
  if hasattr(value, 'detach'):  # a torch tensor (bfloat16 has no numpy dtype)
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    value = value.numpy()
  return np.asarray(value)


def _describe(keys, n: int = 3) -> str:
  keys = sorted(keys)
  more = f' and {len(keys) - n} more' if len(keys) > n else ''
  return ', '.join(keys[:n]) + more


def _check_keys(what: str, given: set, expected: set) -> None:
  missing, unexpected = expected - given, given - expected
  if missing or unexpected:
    parts = ([f'{len(missing)} key(s) missing ({_describe(missing)})'] if missing else []) + (
        [f'{len(unexpected)} unexpected ({_describe(unexpected)})'] if unexpected else [])
    raise StateDictError(f'{what}: {" and ".join(parts)}.')


def _name(arch: str, width_multiplier: float) -> str:
  return arch if width_multiplier == 1 else f'{arch} ×{width_multiplier:g}'


def from_torchvision(state_dict: Mapping[str, object], arch: Optional[str] = 'resnet50',
                     width_multiplier: float = 1.0) -> dict:
  """The Flax variables ``{'params', 'batch_stats'}`` (nested dicts of float32 numpy arrays) of
  ``resnet.resnet(arch, width_multiplier=…, stem='imagenet')`` holding the weights of a torchvision-named ResNet
  state dict (values: numpy arrays or CPU torch tensors). ``arch=None``: inferred (:func:`infer_arch`), width
  included. ``num_batches_tracked`` and ``fc.*`` are ignored; any other key missing or left over, or a shape that
  differs, is a :class:`StateDictError` (one sentence)."""
  if arch is None:
    arch, width_multiplier = infer_arch(state_dict)
  entries = layout(arch, width_multiplier)
  name = _name(arch, width_multiplier)
  given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith('fc.')}
  _check_keys(f'not a {name} state dict', given, {e[0] for e in entries})
  variables = {'params': {}, 'batch_stats': {}}
  for tkey, shape, collection, path, kind in entries:
    value = as_numpy(state_dict[tkey])
    if value.shape != shape:
      raise StateDictError(f'not a {name} state dict: {tkey} has shape {value.shape}, expected {shape}.')
    value = value.astype(np.float32)
    node = variables[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if kind == 'conv' else value
  return variables


def flatten(tree: Mapping, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def to_torchvision(variables: Mapping, arch: str = 'resnet50', width_multiplier: float = 1.0,
                   num_batches_tracked: bool = True) -> dict:
  """The torchvision state dict (``{key: float32 numpy array}``, in ``state_dict()`` order) of our ResNet's
  variables ``{'params', 'batch_stats'}`` (the backbone's; numpy or jax arrays). With ``num_batches_tracked``
  every BatchNorm also gets its counter (0, int64), as ``torchvision.models.resnet50().state_dict()`` has, so
  that ``load_state_dict(..., strict=True)`` accepts it; ``fc`` is not written (the backbone's output is the
  pooled representation). :class:`StateDictError` if the variables are not that ResNet's."""
  entries = layout(arch, width_multiplier)
  name = _name(arch, width_multiplier)
  flat = {(c,) + path: v for c in ('params', 'batch_stats') for path, v in flatten(variables.get(c, {})).items()}
  expected = {(e[2],) + e[3]: e for e in entries}
  _check_keys(f'not the variables of a Flax {name}', {'/'.join(k) for k in flat}, {'/'.join(k) for k in expected})
  state_dict = {}
  for tkey, shape, collection, path, kind in entries:
    value = as_numpy(flat[(collection,) + path]).astype(np.float32)
    value = np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if kind == 'conv' else value
    if value.shape != shape:
      raise StateDictError(f'not the variables of a Flax {name}: {collection}/{"/".join(path)} gives {tkey} the '
                           f'shape {value.shape}, expected {shape}.')
    state_dict[tkey] = value
    if num_batches_tracked and tkey.endswith('.running_var'):
      state_dict[tkey[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return state_dict


def random_state_dict(arch: str = 'resnet50', seed: int = 0, width_multiplier: float = 1.0,
                      num_batches_tracked: bool = True) -> dict:
  """A random but well-conditioned torchvision ResNet state dict, the same for the same arguments on any machine
  (numpy's PCG64 from ``seed``), for golden tests against torchvision: convolutions He-normal (fan-in: a
  convolution and ReLU keep the second moment), the BatchNorms' running means N(0, 0.1²) and variances
  U(0.5, 1.5), biases N(0, 0.1²) and scales U(0.6, 1.2) (a gain of about 1 in inference mode), U(0.4, 0.8) in the
  projection shortcuts and U(0.1, 0.3) for the last BatchNorm of each residual branch: non-zero, so every branch
  matters, yet small enough that the activations stay O(1) over 16–50 blocks."""
  rng = np.random.default_rng(seed)
  out = {}
  for tkey, shape, _, _, kind in layout(arch, width_multiplier):
    if kind == 'conv':
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif tkey.endswith('.weight'):
      module = tkey.rsplit('.', 2)[-2]
      low, high = ((0.1, 0.3) if module == ('bn3' if ARCHS[arch][1] == 'bottleneck' else 'bn2') else
                   (0.4, 0.8) if tkey.endswith('downsample.1.weight') else (0.6, 1.2))
      value = rng.uniform(low, high, shape)
    elif tkey.endswith('.running_var'):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, running_mean
      value = rng.normal(0.0, 0.1, shape)
    out[tkey] = value.astype(np.float32)
    if num_batches_tracked and tkey.endswith('.running_var'):
      out[tkey[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return out
