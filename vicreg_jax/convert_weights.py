"""Official VICReg (torchvision-named) ResNet weights, and timm-named ViTs, ↔ a vicreg_jax pretraining workdir.

Into a workdir that the linear-evaluation and fine-tuning jobs read like a pretraining run's::

  python -m vicreg_jax.convert_weights --torch=resnet50.pth --workdir=runs/vicreg_official \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
  python -m vicreg_jax.main --config=configs/imagenet_linear.py --workdir=runs/vicreg_official_linear \\
      --config.pretrain_workdir=runs/vicreg_official --config.data.data_dir=gs://BUCKET/tensorflow_datasets

``--torch``: a ``.pth`` / ``.pth.tar`` / ``.pt`` (read with PyTorch, imported only then) or ``.npz`` (numpy only)
holding a torchvision ResNet state dict without ``fc``: the official
``https://dl.fbaipublicfiles.com/vicreg/resnet50.pth`` (also ``resnet50x2.pth``, ``resnet200x2.pth``), or a
torchvision ResNet's (``fc.*`` ignored), or a checkpoint that wraps one (``{'model': {'module.backbone.…',
'module.projector.…'}}``, or MoCo v3's ``{'state_dict': {'module.base_encoder.…', 'module.momentum_encoder.…',
'module.predictor.…'}}``, or MoCo v2's ``{'state_dict': {'module.encoder_q.…', 'module.encoder_k.…',
'module.queue', …}}``: the backbone's entries are taken, its ``fc`` projector left out; it is read with
``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and containers). Depth and
width come from the weights (:func:`torch_weights.infer_arch`). A timm ViT state dict (``patch_embed.proj.weight``;
also MoCo v3's ViT checkpoints, taken the same way, heads left out) gives the ViT of its patch size, width and
depth (:func:`timm_weights.infer`: a sin-cos ``pos_embed`` is read as the fixed table); its number of heads is
not in the weights: pass ``--config.model.num_heads`` when it is not timm's (MoCo v3's ViT-S/16 has 12). The
workdir gets what the evaluation jobs read:

- ``config.json``: :func:`config.imagenet_config` (the official recipe) with ``model`` set to the weights'
  architecture, ImageNet stem, float32 (as the official evaluation; ``--config.model.dtype=bfloat16`` to run the
  backbone in bfloat16) and ``num_steps`` = ``--step`` (the jobs stop after the run's last step). The jobs also
  count the examples of the config's training split, so ``data`` must name a dataset they can read: give the
  converter the same ``--config.data.*`` (``data_dir``, or ``source=folder``) as the evaluation job. Give
  ``--config.method=NAME`` (default vicreg) for another method's weights: the evaluation jobs' ``protocol='auto'``
  evaluates them with that method's protocol (vicreg_jax/evaluate/protocols.py);
- ``checkpoints/STEP/default``: an orbax checkpoint of ``{'step', 'params': {'backbone'}, 'batch_stats':
  {'backbone'}}`` (no projector or optimiser: the evaluation jobs read only the backbone; the pretraining job
  refuses to resume from it);
- ``converted_from.json``: where the weights came from.

Back to PyTorch, the backbone of a pretraining run's checkpoint (the newest, or ``--step``)::

  python -m vicreg_jax.convert_weights --from_workdir=runs/vicreg_r50 --to_torch=vicreg_r50.pth   # or .npz

loads with ``m = torchvision.models.resnet50(); m.fc = torch.nn.Identity(); m.load_state_dict(sd)`` (strict);
a ViT's, into timm's ``VisionTransformer(..., num_classes=0)`` that the command prints.
"""

from __future__ import annotations

import io
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported anywhere

import sys  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402

from vicreg_jax import errors  # noqa: E402
from vicreg_jax.models import timm_weights, torch_weights  # noqa: E402

TORCH_EXTENSIONS = ('.pth', '.pt')
DEFAULT_STEP = 1
# Where an official training checkpoint (or another wrapper) keeps the backbone's entries.
_PREFIXES = ('module.backbone.', 'backbone.', 'module.base_encoder.', 'module.encoder_q.', 'module.', 'encoder.',
             'module.encoder.')
_ANCHORS = ('conv1.weight', timm_weights.ANCHOR)  # a key every backbone state dict has: torchvision's, timm's


def base_config():
  """The config a converted workdir starts from: the official ImageNet recipe, the backbone in float32."""
  from vicreg_jax import config as schema
  c = schema.imagenet_config()
  c.model.dtype = 'float32'
  return c


# --- reading and writing state dicts -------------------------------------------------------------------------

def _import_torch():
  try:
    import torch
  except ImportError:
    raise errors.UserError('reading or writing a .pth needs PyTorch (pip install torch); or use a .npz of the '
                           'state dict (numpy.savez(path, **{k: v.numpy() for k, v in sd.items()})).') from None
  return torch


def _extension(path: str) -> str:
  """'.pth', '.pt' or '.npz' (a '.pth.tar', as MoCo v3 and SimSiam name their checkpoints, is a '.pth')."""
  ext = '.pth' if path.lower().endswith('.pth.tar') else os.path.splitext(path)[1].lower()
  if ext not in TORCH_EXTENSIONS + ('.npz',):
    raise errors.UserError(f'{path}: expected a .pth, .pth.tar, .pt or .npz file, not {ext or "no extension"!r}.')
  return ext


def read_state_dict(path: str) -> tuple[dict, str]:
  """The torchvision-named backbone entries of the ``.pth`` / ``.pt`` / ``.npz`` file at ``path`` (local or
  gs://) as numpy arrays, and a note on what was left out (wrapper keys, e.g. the projector), '' for nothing."""
  import tensorflow as tf
  ext = _extension(path)
  if not tf.io.gfile.exists(path):
    raise errors.UserError(f'no file {path} (--torch).')
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = io.BytesIO(f.read())
  if ext == '.npz':
    with np.load(data, allow_pickle=False) as z:
      obj = {k: z[k] for k in z.files}
  else:
    torch = _import_torch()
    try:
      obj = torch.load(data, map_location='cpu', weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects other than tensors and containers
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      raise errors.UserError(
          f'cannot read {path} with torch.load(weights_only=True) ({type(e).__name__}: {first}); if it is a '
          'checkpoint you trust that pickles more than tensors (an official training checkpoint\'s optimizer '
          'state), save its state dict alone first: torch.save(torch.load(FILE, weights_only=False)[\'model\'], '
          '\'model.pth\').') from None
  return backbone_entries(obj, path)


def backbone_entries(obj, path: str = 'the file') -> tuple[dict, str]:
  """The backbone's entries of a loaded state dict or checkpoint (see :func:`read_state_dict`)."""
  for key in ('model', 'state_dict'):  # an official training checkpoint: {'epoch', 'model', 'optimizer'}
    if isinstance(obj, dict) and not any(a in obj for a in _ANCHORS) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
    raise torch_weights.StateDictError(f'{path} holds a {type(obj).__name__}, not a state dict.')
  note = ''
  if not any(a in obj for a in _ANCHORS):
    prefix = next((p for p in _PREFIXES if any(p + a in obj for a in _ANCHORS)), None)
    if prefix is not None:
      rest = [k for k in obj if not k.startswith(prefix)]
      note = f'the entries under {prefix!r}' + (f' ({len(rest)} others left out, e.g. {rest[0]})' if rest else '')
      obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
  return {k: torch_weights.as_numpy(v) for k, v in obj.items()}, note


def write_state_dict(path: str, state_dict: dict) -> None:
  """``state_dict`` (numpy arrays) to ``path``: ``.pth`` / ``.pt`` with ``torch.save`` (tensors), or ``.npz``."""
  import tensorflow as tf
  ext = _extension(path)
  buffer = io.BytesIO()  # GFile (gs://) cannot seek while writing; np.savez and torch.save do
  if ext == '.npz':
    np.savez(buffer, **state_dict)
  else:
    torch = _import_torch()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, buffer)
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())


# --- the two directions --------------------------------------------------------------------------------------

def _count(tree) -> int:
  return sum(int(np.size(v)) for v in torch_weights.flatten(tree).values())


def convert(source: str, workdir: str, config, step: int = DEFAULT_STEP, arch: Optional[str] = None) -> str:
  """Writes the weights in ``source`` as the pretraining workdir ``workdir`` (see the module docstring) with the
  pretraining ``config`` (its ``model`` and ``num_steps`` set here); returns a one-line summary."""
  import tensorflow as tf
  from vicreg_jax import checkpoints, runs

  if step < 1:
    raise errors.ConfigError(f'--step must be at least 1 (0 names the evaluation jobs\' random baseline), not {step}.')
  state_dict, note = read_state_dict(source)
  if timm_weights.ANCHOR in state_dict:  # a timm (or MoCo v3) ViT
    found, pos_embed, size = timm_weights.infer(state_dict)
    width, model = 1.0, dict(arch=found, pos_embed=pos_embed, pos_embed_size=size)
    variables = dict(timm_weights.from_timm(state_dict, found, pos_embed, size), batch_stats={})
    tensors, head = len(timm_weights.layout(found, pos_embed, size)), 'head'
  else:
    found, width = torch_weights.infer_arch(state_dict)
    model = dict(arch=found, width_multiplier=width, stem='imagenet')
    variables = torch_weights.from_torchvision(state_dict, found, width)
    tensors, head = len(torch_weights.layout(found, width)), 'fc'
  if arch and arch != found:
    raise torch_weights.StateDictError(f'{source} holds a {found} (×{width:g}), not the {arch} that --arch names.')
  if any(k.startswith(head + '.') for k in state_dict):
    note = ', '.join(filter(None, [note, f'{head} left out']))

  workdir = runs.make_workdir(workdir)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  if tf.io.gfile.isdir(checkpoint_dir) and any(d.rstrip('/').isdigit() for d in tf.io.gfile.listdir(checkpoint_dir)):
    raise errors.WorkdirError(f'{workdir} already holds checkpoints; pass a new --workdir (or delete it).')
  if runs.read_config(workdir) is not None and not tf.io.gfile.exists(os.path.join(workdir, 'converted_from.json')):
    raise errors.WorkdirError(f'{workdir} already holds a run (config.json); pass a new --workdir (or delete it).')
  config = config.copy_and_resolve_references()  # a copy: the caller's stays as it was
  config.model.update(**model)
  config.num_steps = step
  runs.write_json(os.path.join(workdir, 'converted_from.json'), {
      'source': source, 'arch': found, 'width_multiplier': width, 'method': config.method, 'step': step, 'note': note,
      'tensors': tensors})
  runs.save_config(workdir, config)  # before the checkpoint: a job that finds the config waits for it
  mngr = checkpoints.manager(checkpoint_dir, keep=1)
  item = {'step': np.asarray(step, np.int32), 'params': {'backbone': variables['params']}}
  if variables['batch_stats']:  # a ViT has none
    item['batch_stats'] = {'backbone': variables['batch_stats']}
  checkpoints.save(mngr, step, item)
  mngr.wait_until_finished()
  mngr.close()
  try:  # what the evaluation jobs do first with config.json: count the training split's examples
    runs.schedule_steps(config)
  except errors.UserError as e:
    print(f'warning: the evaluation jobs read config.json\'s data section ({_data(config.data)}), and here it '
          f'cannot be read: {e} Pass the converter the same --config.data.* as the evaluation job.',
          file=sys.stderr, flush=True)
  name = found if width == 1 else f'{found} ×{width:g}'
  return (f'Wrote {workdir}: the {name} backbone of {source}{" (" + note + ")" if note else ""}, '
          f'{_count(variables["params"]):,} parameters, as checkpoint {step} with config.json '
          f'(method {config.method}, whose protocol the evaluation jobs take; data: {_data(config.data)}); '
          f'evaluate it with python -m vicreg_jax.main '
          f'--config=configs/imagenet_linear.py --workdir=EVAL_DIR --config.pretrain_workdir={workdir}')


def _data(data) -> str:
  if data.source == 'tfds':
    return f'TFDS {data.name} in {data.data_dir or "the default TFDS data_dir"}'
  return f'{data.source} {data.data_dir}' if data.source == 'folder' else data.source


def read_backbone(workdir: str, step: Optional[int] = None) -> tuple[dict, object, int]:
  """``(backbone variables as numpy, the run's config, step)`` of checkpoint ``step`` (default: the newest) of the
  pretraining workdir ``workdir``, read as the evaluation jobs read it (only the backbone)."""
  import jax
  from vicreg_jax import checkpoints, parallel, runs

  pre = runs.absolute_workdir(workdir)
  config = runs.read_config(pre)
  if config is None:
    raise errors.WorkdirError(f'{pre} has no config.json: not the --workdir of a vicreg_jax pretraining run.')
  directory = os.path.join(pre, 'checkpoints')
  steps = checkpoints.steps(checkpoints.reader(directory))
  if not steps:
    raise errors.WorkdirError(f'{pre} has no checkpoints.')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise errors.WorkdirError(f'{pre} has no checkpoint {step}; it has {", ".join(map(str, steps))}.')
  target = checkpoints.backbone_target(directory, step, parallel.make_mesh())
  restored = checkpoints.restore_subtrees(directory, step, target)
  return jax.device_get({k: restored[k]['backbone'] for k in target}), config, step


def export(workdir: str, out: str, step: Optional[int] = None) -> str:
  """Writes the backbone of checkpoint ``step`` (default: the newest) of ``workdir`` to ``out`` (.pth, .pt or
  .npz) as a torchvision state dict; returns a one-line summary."""
  _extension(out)
  variables, config, step = read_backbone(workdir, step)
  model = config.model
  if model.arch in timm_weights.ARCHS:
    state_dict = timm_weights.to_timm(variables, model.arch, model.pos_embed, model.pos_embed_size)
    write_state_dict(out, state_dict)
    patch, width, depth, heads = timm_weights.ARCHS[model.arch]
    return (f'Wrote {out}: the {model.arch} backbone of checkpoint {step} of {workdir} as a timm state dict '
            f'({len(state_dict)} entries, no head); load it into timm.models.vision_transformer.VisionTransformer('
            f'img_size={model.pos_embed_size}, patch_size={patch}, embed_dim={width}, depth={depth}, '
            f'num_heads={model.num_heads or heads}, num_classes=0).')
  if model.arch not in torch_weights.ARCHS:
    raise errors.ConfigError(f'{workdir} trained a {model.arch}; only ResNets ({", ".join(torch_weights.ARCHS)}) '
                             'have a torchvision counterpart.')
  if model.stem != 'imagenet':
    raise errors.ConfigError(f"{workdir} trained a ResNet with the {model.stem!r} stem; torchvision's ResNets have "
                             "the 'imagenet' stem only.")
  state_dict = torch_weights.to_torchvision(variables, model.arch, model.width_multiplier)
  write_state_dict(out, state_dict)
  name = model.arch if model.width_multiplier == 1 else f'{model.arch} ×{model.width_multiplier:g}'
  return (f'Wrote {out}: the {name} backbone of checkpoint {step} of {workdir} as a torchvision state dict '
          f'({len(state_dict)} entries, no fc); load it into torchvision.models.{model.arch}() after '
          f'model.fc = torch.nn.Identity().')


# --- command line --------------------------------------------------------------------------------------------

def main(argv: list) -> int:
  """The command (``argv[0]`` the program's name); returns the exit status: 0, 1 for a user's mistake (one line
  on stderr), 2 for a bad command line. Its flags live in a private ``FlagValues``, so this runs in a process that
  also defines absl's global flags (tests)."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  torch_path = flags.DEFINE_string('torch', None, 'A .pth/.pt/.npz torchvision ResNet state dict to convert.',
                                   flag_values=fv)
  workdir = flags.DEFINE_string('workdir', None, 'The pretraining workdir to write (with --torch).', flag_values=fv)
  from_workdir = flags.DEFINE_string('from_workdir', None, 'A pretraining workdir to export (with --to_torch).',
                                     flag_values=fv)
  to_torch = flags.DEFINE_string('to_torch', None, 'The .pth/.pt/.npz file to write (with --from_workdir).',
                                 flag_values=fv)
  step = flags.DEFINE_integer('step', None, f'--torch: the checkpoint step to write (default {DEFAULT_STEP}); '
                              '--from_workdir: the checkpoint to export (default: the newest).', flag_values=fv)
  arch = flags.DEFINE_string('arch', None, '--torch: fail unless the weights are this architecture.',
                             flag_values=fv)
  try:
    config = config_flags.DEFINE_config_dict('config', base_config(), 'The pretraining config written as '
                                             'config.json (--torch); override keys as --config.data.data_dir=….',
                                             flag_values=fv, sys_argv=list(argv))
    rest = fv(list(argv))
  except (AttributeError, KeyError) as e:
    return _fail(f'unknown config key {str(e).strip(chr(34) + chr(39))}: see vicreg_jax/config.py for the keys', 2)
  except (flags.Error, TypeError, ValueError) as e:
    return _fail(f'bad command line: {e}', 2)
  if len(rest) > 1:
    return _fail(f'unexpected arguments: {" ".join(rest[1:])}', 2)
  forward, backward = bool(torch_path.value or workdir.value), bool(from_workdir.value or to_torch.value)
  if forward == backward or (forward and not (torch_path.value and workdir.value)) or (
      backward and not (from_workdir.value and to_torch.value)):
    return _fail('pass either --torch=FILE --workdir=DIR (into a workdir) or --from_workdir=DIR --to_torch=FILE '
                 '(out of one)', 2)
  try:
    if forward:
      summary = convert(torch_path.value, workdir.value, config.value,
                        DEFAULT_STEP if step.value is None else step.value, arch.value)
    else:
      summary = export(from_workdir.value, to_torch.value, step.value)
  except errors.UserError as e:
    return _fail(str(e))
  print(summary, flush=True)
  return 0


def _fail(msg: str, status: int = 1) -> int:
  print(f'error: {msg}', file=sys.stderr, flush=True)
  return status


class _QuietOrbax:
  """Drops orbax's warnings about a read-only manager and per-item metadata (the evaluation jobs read
  checkpoints the same way); errors still show."""

  def filter(self, record):
    return record.levelno >= 40 or 'orbax' not in record.pathname


if __name__ == '__main__':
  from vicreg_jax.main import import_tensorflow_quietly  # its stderr-closed import, before anything else
  import_tensorflow_quietly()
  import logging
  logging.getLogger('absl').addFilter(_QuietOrbax())
  sys.exit(main(sys.argv))
