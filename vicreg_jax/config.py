"""The one configuration schema of every job: each key, its default and its rule, checked before a job starts.

A config holds the **shared keys** (``job``, ``seed``, ``batch_size``, ``epochs``, the logging, checkpoint and
failure-handling periods, ``reductions``) and the shared ``data`` section, each meaning the same in every job,
plus the keys of its job:

- ``job='pretrain'``: the run's length and periods, ``model``, ``method`` and one section per method (generated
  from each :class:`vicreg_jax.methods.Method` record's ``defaults`` and ``rules``), ``optim``, ``augment``,
  ``online_probe`` and ``final_probe`` (the end-of-run probe);
- ``job='linear'`` / ``'finetune'`` (the evaluation jobs; ``finetune`` with ``from_scratch=True`` is the
  supervised reference): ``pretrain_workdir``, the checkpoint follower's keys, ``classifier``, ``features`` and
  ``transforms``; the backbone comes from the pretraining run's ``config.json``, read by :func:`from_saved`.

The files in ``configs/`` start from a preset (:func:`base_config`, :func:`imagenet_config`,
:func:`digits_config`, :func:`eval_job_config`) and are locked, so a misspelt key fails at start. Every value is
checked by :func:`validate`: its type, its range (a count >= 1 where it divides or counts steps, a probability in
[0, 1], a rate > 0, ...) or its choices; a wrong value ends the job with one line naming the key
(:class:`errors.ConfigError`). Keys that were renamed (:data:`RENAMED`) are mapped when an old ``config.json``
is read and named in one line when given on the command line.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import ml_collections

from vicreg_jax import errors
from vicreg_jax.data.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPE_DEFAULTS, full_recipe


@dataclasses.dataclass(frozen=True)
class Rule:
  """``kind`` 'int', 'float', 'str', 'bool' or 'ints' (a tuple of integers, each checked as 'int'); numbers within
  [lo, hi] (``lo_open``: lo excluded; None: no bound); ``choices``: the allowed values (a callable returning them,
  for registries); ``none``: None allowed."""
  kind: str
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  choices: Any = None
  none: bool = False

  def problem(self, value) -> Optional[str]:
    """What is wrong with ``value`` (None: nothing)."""
    if value is None:
      return None if self.none else 'must be set'
    if self.kind == 'bool':
      return None if isinstance(value, bool) else f'must be True or False, not {value!r}'
    if self.kind == 'ints':
      if not isinstance(value, (tuple, list)):
        return f'must be a tuple of integers, not {value!r}'
      each = dataclasses.replace(self, kind='int')
      return next((f'{problem} (in {value!r})' for v in value if (problem := each.problem(v))), None)
    if self.kind == 'str':
      if not isinstance(value, str):
        return f'must be a string, not {value!r}'
      choices = self.choices() if callable(self.choices) else self.choices
      if choices is not None and value not in choices:
        return f'must be one of {sorted(choices)}, not {value!r}'
      return None
    ok_type = (int,) if self.kind == 'int' else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
      return f'must be {"an integer" if self.kind == "int" else "a number"}, not {value!r}'
    if not math.isfinite(value):
      return f'must be finite, not {value!r}'
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return f'must be {">" if self.lo_open else ">="} {self.lo:g}, not {value!r}'
    if self.hi is not None and value > self.hi:
      return f'must be <= {self.hi:g}, not {value!r}'
    return None


COUNT = Rule('int', 1)             # divides or counts: at least 1
NONNEG_INT = Rule('int', 0)        # 0 means "none" or "off"
POSITIVE = Rule('float', 0, lo_open=True)
NONNEG = Rule('float', 0)
PROBABILITY = Rule('float', 0, 1)
FRACTION = Rule('float', 0, 1)     # e.g. a momentum, a factor of the peak
BOOL = Rule('bool')
TEXT = Rule('str')


def _methods() -> dict:
  from vicreg_jax import methods  # the registry imports this module's rules
  return methods.METHODS


def _archs():
  from vicreg_jax.models import resnet, vit
  return {'convnet', *resnet.ARCHS, *vit.ARCHS}


def _sources():
  from vicreg_jax.data import sources
  return sources.SOURCES


JOBS = ('pretrain', 'linear', 'finetune')

_RECIPE = {  # an augmentation recipe (augment.view1/view2, transforms.train)
    'crop_size': NONNEG_INT,
    'crop_method': Rule('str', choices=('bilinear', 'bicubic', 'nearest', 'area', 'lanczos3', 'lanczos5', 'gaussian',
                                        'mitchellcubic')),
    'translate': NONNEG_INT, 'affine_degrees': NONNEG, 'affine_shear': NONNEG, 'flip_p': PROBABILITY,
    'colour_first': BOOL, 'jitter_p': PROBABILITY, 'gray_p': PROBABILITY, 'blur_p': PROBABILITY,
    'blur_kernel_fraction': NONNEG,  # 0: kernel radius ceil(3·max σ) pixels (recipes.blur_radius)
    'solarize_p': PROBABILITY, 'noise_std': NONNEG, 'cutout_p': PROBABILITY, 'cutout_size': NONNEG_INT,
}
_SHARED = {  # keys of every job
    'job': Rule('str', choices=JOBS), 'seed': NONNEG_INT, 'batch_size': COUNT,
    'log_every_steps': COUNT, 'metrics_every_steps': COUNT, 'checkpoint_every_steps': COUNT,
    'nonfinite': Rule('str', choices=('stop', 'skip')), 'restore_retry_seconds': NONNEG,
    'reductions': Rule('str', choices=('native', 'ordered', 'reversed')),
    'data.source': Rule('str', choices=_sources), 'data.name': TEXT, 'data.train_split': TEXT,
    'data.test_split': TEXT, 'data.val_fraction': Rule('float', 0, 1), 'data.channels': Rule('int', 1, 4),
    'data.image_size': NONNEG_INT, 'data.shuffle_buffer': NONNEG_INT, 'data.threadpool_size': NONNEG_INT,
    'data.prefetch': NONNEG_INT, 'data.cache': BOOL, 'data.data_dir': Rule('str', none=True),
    'data.path': TEXT,
}
_PRETRAIN = {
    'epochs': NONNEG_INT, 'num_steps': NONNEG_INT, 'max_steps_per_run': NONNEG_INT, 'keep_checkpoints': COUNT,
    'keep_checkpoints_every': NONNEG_INT,
    'debug_nan_at_step': NONNEG_INT, 'spectrum_every_steps': NONNEG_INT, 'diagnostics_max_rows': COUNT,
    'compilation_cache': TEXT, 'compilation_cache_min_seconds': NONNEG, 'profile_steps': TEXT,
    'prefetch_to_device': NONNEG_INT, 'grad_accum_steps': COUNT,
    'online_probe.enabled': BOOL, 'online_probe.lr': POSITIVE, 'online_probe.momentum': FRACTION,
    'model.arch': Rule('str', choices=_archs), 'model.width_multiplier': POSITIVE,
    'model.stem': Rule('str', choices=('imagenet', 'small')), 'model.projector': TEXT,
    'model.dtype': Rule('str', choices=('float32', 'bfloat16')), 'model.projector_hidden_bias': BOOL,
    'model.projector_bn': BOOL, 'model.projector_output_bn': BOOL, 'model.projector_output_scale': BOOL,
    'model.projector_output_bias': BOOL, 'model.zero_init_residual': BOOL, 'model.remat': BOOL,
    'model.views_together': BOOL, 'model.ghost_batch_size': NONNEG_INT, 'augment.small_crops': NONNEG_INT,
    'model.num_heads': NONNEG_INT,
    'model.pos_embed': Rule('str', choices=('sincos', 'learned')), 'model.pos_embed_size': COUNT,
    'method': Rule('str', choices=_methods),
    'optim.name': Rule('str', choices=('lars', 'lars_classic', 'larc', 'sgd', 'adam', 'adamw', 'adamw_all')),
    'optim.base_lr': POSITIVE,
    'optim.weight_decay': NONNEG, 'optim.momentum': FRACTION, 'optim.eta': NONNEG, 'optim.warmup_epochs': NONNEG,
    'optim.warmup_steps': NONNEG_INT, 'optim.warmup_start_factor': FRACTION, 'optim.warmup_linspace': BOOL,
    'optim.schedule': Rule('str', choices=('cosine', 'cosine_epochs', 'step')), 'optim.end_lr_factor': FRACTION,
    'optim.decay_epochs': Rule('ints', 0), 'optim.decay_factor': POSITIVE, 'augment.on_device': BOOL,
    'optim.shard_state': BOOL,
    'final_probe.enabled': BOOL, 'final_probe.labels_per_class': COUNT, 'final_probe.draws': COUNT,
    'final_probe.batch_size': COUNT, 'final_probe.max_train_examples': NONNEG_INT,
    'final_probe.max_test_examples': NONNEG_INT,
    **{f'augment.{v}.{k}': r for v in ('view1', 'view2', 'small_view') for k, r in _RECIPE.items()},
}
def _maybe(rule: Rule) -> Rule:
  """``rule`` with None allowed: a protocol-controlled key (None: the evaluation protocol's value)."""
  return dataclasses.replace(rule, none=True)


_EVAL = {
    'epochs': _maybe(COUNT), 'batch_size': _maybe(COUNT), 'pretrain_workdir': TEXT,
    'checkpoints': Rule('str', choices=('all', 'latest', 'final')),
    'protocol': Rule('str', choices=lambda: ('auto', 'none', *_methods())),
    'from_scratch': BOOL, 'poll_seconds': POSITIVE, 'timeout_seconds': NONNEG, 'start_timeout_seconds': NONNEG,
    'classifier.optimizer': _maybe(Rule('str', choices=('sgd', 'nesterov', 'larc', 'adam'))),
    'classifier.head_lr': _maybe(NONNEG), 'classifier.backbone_lr': _maybe(NONNEG), 'classifier.scale_lr': _maybe(BOOL),
    'classifier.weight_decay': _maybe(NONNEG), 'classifier.momentum': _maybe(FRACTION),
    'classifier.lr_schedule': _maybe(Rule('str', choices=('cosine', 'cosine_steps', 'step', 'exponential'))),
    'classifier.lr_decay_factor': _maybe(Rule('float', 0, 1, lo_open=True)),
    'classifier.head_init': _maybe(Rule('str', choices=('normal', 'haiku', 'torch'))),
    'classifier.head_init_std': _maybe(NONNEG), 'classifier.labels_per_class': NONNEG_INT,
    'classifier.labels_percent': Rule('int', 1, 100),
    'classifier.batchnorm': _maybe(Rule('str', choices=('ghost', 'sync', 'per_device'))),
    'classifier.ghost_batch_size': COUNT, 'classifier.backbone_dtype': Rule('str', choices=('float32', 'bfloat16')),
    'classifier.report': _maybe(Rule('str', choices=('best', 'last'))), 'classifier.test_every_epochs': NONNEG_INT,
    'features.cache': _maybe(BOOL), 'features.standardize': BOOL,
    'transforms.eval.resize': NONNEG_INT, 'transforms.eval.crop': NONNEG_INT,
    'transforms.eval.method': _maybe(Rule('str', choices=('bilinear', 'bicubic'))),
    **{f'transforms.train.{k}': r for k, r in _RECIPE.items()},
    'transforms.train.crop_method': _maybe(_RECIPE['crop_method']),
}

# Keys that were renamed: old dotted name -> new one. A config.json of an older run is read through this table
# (:func:`from_saved`); an old name on the command line ends in one line naming the new one (vicreg_jax.main).
RENAMED = {
    'eval.final_probe': 'final_probe.enabled',
    'eval.test_split': 'data.test_split',
    'eval.labels_per_class': 'final_probe.labels_per_class',
    'eval.draws': 'final_probe.draws',
    'eval.batch_size': 'final_probe.batch_size',
    'eval.max_train_examples': 'final_probe.max_train_examples',
    'eval.max_test_examples': 'final_probe.max_test_examples',
    'data.labels_per_class': 'classifier.labels_per_class',
}


def rules(job: str) -> dict[str, Rule]:
  """The rules of a job's keys ('pretrain', or 'linear'/'finetune'), by dotted key; for pretraining with every
  method's section (``METHOD.KEY``)."""
  if job != 'pretrain':
    return {**_SHARED, **_EVAL}
  methods = {f'{name}.{k}': r for name, m in _methods().items() for k, r in m.rules.items()}
  return {**_SHARED, **_PRETRAIN, **methods}


def leaves(config, prefix: str = '') -> dict[str, Any]:
  """Every leaf value of ``config`` (a ConfigDict or dict) by dotted key."""
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update(leaves(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def validate(config) -> None:
  """:class:`errors.ConfigError` (one line naming the key) for the first value of ``config`` that breaks its
  rule, or for keys that do not fit together (pretraining without steps)."""
  values = leaves(config)
  if (problem := _SHARED['job'].problem(values.get('job'))) is not None:
    raise errors.ConfigError(f'config.job {problem}')
  job = values['job']
  for key, rule in rules(job).items():
    if key in values and (problem := rule.problem(values[key])) is not None:
      raise errors.ConfigError(f'config.{key} {problem}')
  if job == 'pretrain' and not (values['num_steps'] or values['epochs']):
    raise errors.ConfigError('config.epochs and config.num_steps are both 0: set one of them to train for any steps')
  if job == 'pretrain':
    _check_crops(values)
  if job == 'pretrain' and values['keep_checkpoints_every'] % values['checkpoint_every_steps']:
    raise errors.ConfigError('config.keep_checkpoints_every must be a multiple of config.checkpoint_every_steps '
                             f"({values['checkpoint_every_steps']}): only the steps saved can be kept")


def _check_crops(values: dict) -> None:
  """Multi-crop (``augment.small_crops`` > 0) only with a method that uses the small crops and with
  ``model.views_together`` (the backbone per resolution group, the heads over every crop: the official
  multi-crop forward pass)."""
  if not values['augment.small_crops']:
    return
  if not _methods()[values['method']].multi_crop:
    users = sorted(name for name, m in _methods().items() if m.multi_crop)
    raise errors.ConfigError(f"config.augment.small_crops: {values['method']} has no multi-crop loss (only "
                             f"{', '.join(users)}): set --config.augment.small_crops=0")
  if not values['model.views_together']:
    raise errors.ConfigError('config.augment.small_crops > 0 needs --config.model.views_together=True (the '
                             'backbone once per crop resolution, the heads once over all crops)')


def renamed_message(key: str) -> Optional[str]:
  """One line for an old key name (``eval.final_probe``; ``eval``: the section), None for any other key."""
  if key in RENAMED:
    return f'config.{key} is now config.{RENAMED[key]}'
  moved = [f'{old} -> {new}' for old, new in RENAMED.items() if old.startswith(key + '.')]
  if moved and key in _REMOVED_SECTIONS:
    return f'config.{key} was split up: {", ".join(moved)}'
  return None


_REMOVED_SECTIONS = ('eval',)


# --- the schema: shared keys and sections, then each job's ------------------------------------------------------

def view_recipe(**keys) -> dict:
  """A view recipe with every key of :data:`augment.RECIPE_DEFAULTS` (so ``--config.augment.view1.KEY=…`` works
  for any key), ``keys`` overriding the "off" defaults."""
  return full_recipe(keys)


def imagenet_views(size: int = 224) -> tuple[dict, dict]:
  """The official VICReg ImageNet recipe: view 1 always blurred, view 2 rarely blurred and sometimes solarized."""
  common = dict(RECIPE_DEFAULTS, crop_size=size, crop_scale=(0.08, 1.0), crop_method='bicubic', flip_p=0.5, jitter_p=0.8,
                jitter=(0.4, 0.4, 0.2, 0.1), gray_p=0.2, blur_sigma=(0.1, 2.0), blur_kernel_fraction=0.1,
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
  return dict(common, blur_p=1.0, solarize_p=0.0), dict(common, blur_p=0.1, solarize_p=0.2)


def _shared(job: str) -> ml_collections.ConfigDict:
  """The keys every job has (their defaults; the job presets below change some)."""
  c = ml_collections.ConfigDict()
  c.job = job
  c.seed = 0
  c.batch_size = 2048         # global, over all devices and hosts
  c.epochs = 1000
  c.log_every_steps = 50      # a progress line (pretraining: with the collapse diagnostics repr/…, emb/…)
  c.metrics_every_steps = 10  # the step metrics (loss, terms, …) as their means over the steps since the last write
  c.checkpoint_every_steps = 1000
  # A NaN or inf in the loss or the gradients (checked on every step, one step late, without a host sync):
  # 'stop' ends the run with one line naming the step and the term, the checkpoints intact; 'skip' drops the
  # step's update (parameters, optimiser and method state unchanged), counted and logged.
  c.nonfinite = 'stop'
  # A checkpoint that cannot be read but whose files are whole (a storage error, out of memory): retried with
  # backoff for this long, then the job stops with one line, every checkpoint left where it is. Only a checkpoint
  # whose own files show damage (missing, truncated, not decoding) is set aside (vicreg_jax/checkpoints.py).
  c.restore_retry_seconds = 600.0
  # How sums over devices add the devices' values (vicreg_jax/collectives.py): 'native' (jax.lax's collectives),
  # 'ordered' (in device order: bitwise the same on any split of the devices into processes; tests, debugging,
  # slower) or 'reversed' (the reverse order: against 'ordered', what rounding alone changes in a run).
  c.reductions = 'native'
  # source: 'tfds' (``name`` prepared under ``data_dir``), 'digits', 'arrays' (``path``: an .npz of images and
  # labels, '{split}' in it replaced by the split's name) or 'folder' (``data_dir`` holds CLASS/*.jpg|jpeg|png,
  # or train/CLASS/... and val/CLASS/...; without val/, ``val_fraction`` of every class is held out as
  # 'validation'). test_split: the split the end-of-run probe and the evaluation jobs test on.
  # image_size: in-memory images (digits) are resized to it (evaluation jobs: 0 takes the pretraining run's).
  # tf.data: ``threadpool_size`` is the private thread pool per pipeline (0: TF's shared pool),
  # ``shuffle_buffer`` examples (TFDS: the window shuffled at once, two windows of records held), ``prefetch``
  # batches; ``cache`` (TFDS): read this host's share of the files into memory before the first batch (its
  # serialized records: ImageNet's train split is ~140 GB, 140 GB / hosts per host; docs/performance.md).
  c.data = ml_collections.ConfigDict(dict(
      source='tfds', name='imagenet2012', path='', train_split='train', test_split='validation',
      data_dir=ml_collections.FieldReference(None, field_type=str), val_fraction=0.0, image_size=224, channels=3,
      shuffle_buffer=10_000, threadpool_size=0, prefetch=2, cache=False))
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every pretraining key, defaulting to the paper's ImageNet recipe (configs/imagenet.py adds only bfloat16 and
  its logging and checkpoint periods)."""
  c = _shared('pretrain')
  c.num_steps = 0             # > 0 overrides epochs
  c.max_steps_per_run = 0     # > 0: stop this invocation after that many steps, with a checkpoint (jobs with a
                              # time limit); the same command continues from there
  c.keep_checkpoints = 3
  # > 0: also keep every checkpoint whose step is a multiple of this (a multiple of checkpoint_every_steps), for
  # evaluation beside or after the run; keep_checkpoints still trims the others (0: keep only the newest).
  c.keep_checkpoints_every = 0
  c.debug_nan_at_step = 0     # tests: the loss becomes NaN at this step (0: never)
  c.spectrum_every_steps = 0  # singular-value spectra as TensorBoard images (0: with each checkpoint)
  c.diagnostics_max_rows = 1024  # the collapse diagnostics' SVD: on a subsample of this many rows of the batch
  # JAX's persistent compilation cache: 'workdir' (WORKDIR/compilation_cache, unless JAX_COMPILATION_CACHE_DIR
  # names one), a directory (gs:// allowed; one can serve several runs) or '' (JAX's own setting). A restart then
  # loads the compiled step instead of compiling it again; programs compiled in less than
  # compilation_cache_min_seconds are not stored.
  c.compilation_cache = 'workdir'
  c.compilation_cache_min_seconds = 1.0
  c.profile_steps = ''        # 'FIRST-LAST' (e.g. '20-25'): a profiler trace of those steps in WORKDIR/profile
  c.prefetch_to_device = 2    # batches put on the devices ahead of the step (0: each when the step needs it)
  c.grad_accum_steps = 1      # > 1: micro-batches through the backbone per step (memory); see vicreg_jax/step.py
  # A linear classifier on stop-gradient representations, trained alongside (never touches the backbone);
  # its train top-1 per epoch is an early collapse warning.
  c.online_probe = ml_collections.ConfigDict(dict(enabled=True, lr=0.1, momentum=0.9))
  c.model = ml_collections.ConfigDict(dict(
      arch='resnet50', width_multiplier=1.0, stem='imagenet', projector='8192-8192-8192', dtype='float32',
      projector_hidden_bias=True,   # biases before the projector's BatchNorms (official VICReg; redundant)
      projector_bn=True,            # False: no BatchNorm in the projector or predictor (ablations)
      projector_output_bn=False,    # a BatchNorm without affine after the projector's last layer (SimSiam)
      projector_output_scale=False,  # that BatchNorm with a learnt scale, no offset (SimCLR v1's head)
      projector_output_bias=False,  # a bias on the projector's last Linear (SwAV's projector, W-MSE's head)
      zero_init_residual=True,      # the last BatchNorm scale of every residual block starts at 0 (torchvision's
                                    # zero_init_residual: VICReg, Barlow Twins, SimSiam; BYOL, SimCLR alike; not
                                    # SwAV or W-MSE)
      remat=False,                  # recompute each residual (or Transformer) block's activations in the backward
                                    # pass (memory)
      # ViTs (arch vit_*): heads (0: timm's for the arch: ViT-S/16 6, MoCo v3's 12), position embedding ('sincos':
      # MoCo v3's fixed 2-D table; 'learned': timm's, over the patch grid of a pos_embed_size image)
      num_heads=0, pos_embed='sincos', pos_embed_size=224,
      # True: the backbone runs once per resolution group over the crops concatenated (the two views, then the
      # small crops), so its BatchNorm statistics cover every crop of the group, and projector and heads run
      # once over all crops (official SwAV and SimCLR); False: one pass per view (official VICReg)
      views_together=False,
      # > 0: BatchNorm statistics per group of that many rows of the global batch by position (DDP without
      # SyncBN at that many images per GPU: MoCo v2's 32), the same on any device count; 0: over the whole batch
      ghost_batch_size=0))
  # The self-supervised method (vicreg_jax.methods.METHODS) and, in a section named like it, its loss's
  # keyword arguments and optimiser keys (each method's record holds their defaults and what they mean).
  c.method = 'vicreg'
  for name, method in _methods().items():
    c[name] = ml_collections.ConfigDict(dict(method.defaults))
  # name: 'lars' (VICReg, Barlow Twins, BYOL), 'lars_classic' (the learning rate inside the momentum buffer,
  # SimCLR), 'larc' (apex LARC on every parameter, SwAV; eta is its trust coefficient), 'sgd' (SimSiam, MoCo v2; eta
  # unused), 'adam' (PyTorch Adam, weight decay as coupled L2 on every parameter, W-MSE; momentum and eta unused)
  # 'adamw' (weights decayed, not biases, norms or a ViT's embeddings; small demos, ViTs) or 'adamw_all' (every
  # parameter decayed, torch's AdamW: MoCo v3) (AdamW: momentum and eta unused). The learning rate peaks at
  # base_lr·batch_size/256 after a linear warmup of warmup_epochs (warmup_steps > 0: that many steps instead) from
  # warmup_start_factor·peak (warmup_linspace: np.linspace(start, peak, warmup), the peak on its last step, as
  # SwAV); then schedule 'cosine' (to end_lr_factor·peak), 'cosine_epochs' (that cosine held through each epoch
  # at its value on the epoch's first step, SimSiam) or 'step' (×decay_factor from each of decay_epochs).
  c.optim = ml_collections.ConfigDict(dict(
      name='lars', base_lr=0.2, weight_decay=1e-6, momentum=0.9, eta=0.001, warmup_epochs=10, warmup_steps=0,
      warmup_start_factor=0.0, warmup_linspace=False, schedule='cosine', end_lr_factor=0.001, decay_epochs=(),
      decay_factor=0.1))
  # shard_state: ZeRO-1 over the devices: the gradients reduce-scattered, each device holding and updating a block
  # of the optimiser state and of the parameters, the parameters all-gathered after the update (the same update
  # up to the order of the sums in the per-parameter norms; vicreg_jax/step.py). Checkpoints are the same either
  # way.
  c.optim.shard_state = False
  view1, view2 = imagenet_views()
  # on_device: the host does only the geometric part of each view (crop, affine, shift, flip) and sends uint8
  # (a quarter of float32's host-to-device traffic); the colour part (jitter, grayscale, blur, solarize,
  # normalisation) runs in the jit step on the accelerator, same distribution (data/device_augment.py). False:
  # all on the host, float32 sent (needed for recipes with pixel noise, which uint8 would clip).
  # small_crops: that many extra small crops per example (multi-crop, SwAV's 6×96), each by the recipe
  # small_view; they need model.views_together, and only methods that use them accept them (SwAV).
  small_view = dict(view1, crop_size=96, crop_scale=(0.05, 0.14))
  c.augment = ml_collections.ConfigDict(dict(view1=view1, view2=view2, on_device=True, small_crops=0,
                                             small_view=small_view))
  # The end-of-run probe (vicreg_jax/evaluate/summary.py) on data.train_split / data.test_split: linear probes
  # with all labels and with labels_per_class per class (over ``draws`` draws), k-NN, RankMe, embedding std.
  c.final_probe = ml_collections.ConfigDict(dict(
      enabled=False, labels_per_class=5, draws=5, batch_size=256, max_train_examples=0, max_test_examples=0))
  c.lock()
  return c


def imagenet_config() -> ml_collections.ConfigDict:
  """The ImageNet runs (configs/imagenet*.py): the paper's recipe in bfloat16, a progress line every 100 steps,
  a checkpoint every 2500, a shuffle buffer of 50,000 encoded images, the optimiser state sharded over the
  devices (``optim.shard_state``: the same step up to float summation order, 1/devices of the state per chip)."""
  c = base_config()
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.model.dtype = 'bfloat16'
  c.data.shuffle_buffer = 50_000
  c.optim.shard_state = True  # ZeRO-1: each chip keeps 1/chips of the optimiser state (docs/performance.md)
  return c


def digits_config() -> ml_collections.ConfigDict:
  """The digits demo (configs/digits.py, whose docstring says why): what every method's digits config starts
  from. 8×8 digits upsampled to 16×16, a 3-layer ConvNet, projector 512³, AdamW, 150 epochs, shift /
  brightness / noise / cutout views, the end-of-run probe on the test split."""
  c = base_config()
  c.batch_size = 256
  c.epochs = 150
  c.log_every_steps = 100
  c.checkpoint_every_steps = 200
  c.model.update(arch='convnet', projector='512-512-512', projector_hidden_bias=False)  # AdamW: see heads.Projector
  c.optim.update(name='adamw', base_lr=2e-3, weight_decay=1e-4)
  c.data.update(source='digits', name='digits', test_split='test', image_size=16, channels=1)
  view = view_recipe(translate=2, jitter_p=1.0, jitter=(0.4, 0.0, 0.0, 0.0), noise_std=0.1, cutout_p=0.5,
                     cutout_size=3)
  c.augment.update(view1=view, view2=dict(view), on_device=False)  # pixel noise: the host does it all
  c.final_probe.update(enabled=True, batch_size=512)
  return c


def _unset(field_type) -> ml_collections.FieldReference:
  """A protocol-controlled key: None (the protocol's value) until the job resolves it; typed, so the command line
  can set it."""
  return ml_collections.FieldReference(None, field_type=field_type)


def eval_job_config() -> ml_collections.ConfigDict:
  """Keys of the linear-evaluation (``job='linear'``) and fine-tuning (``job='finetune'``) jobs. The backbone comes
  from the pretraining run's own config.json. The keys a method's evaluation protocol sets default to None: the
  job fills them from ``protocol`` (:mod:`vicreg_jax.evaluate.protocols`, whose tables hold every method's
  official values with their sources); a value given in the config or on the command line always wins."""
  c = _shared('linear')
  # 'auto': the pretraining run's method's protocol (its config.json's ``method``); a method's name: that one;
  # 'none': no method's, the config's own values (keys left None take the protocol tables' defaults, VICReg's).
  c.protocol = 'auto'
  c.batch_size = _unset(int)  # protocol: e.g. 256 (VICReg), 4096 (BYOL, SimCLR, SimSiam), 1000 (W-MSE)
  c.epochs = _unset(int)
  c.log_every_steps = 100     # a progress line
  c.data.image_size = 0       # in-memory (digits) images: the pretraining run's size
  c.pretrain_workdir = ''     # the pretraining run's --workdir (required)
  c.checkpoints = 'all'       # 'all': each checkpoint as it lands; 'latest': skip to the newest; 'final' only
  c.from_scratch = False      # instead: the same backbone freshly initialised (baselines; results key '0')
  c.poll_seconds = 60.0
  c.timeout_seconds = 0.0     # give up after this long without a new checkpoint (0: wait for ever)
  c.start_timeout_seconds = 600.0  # give up after this long if pretrain_workdir has no config.json yet (0: at once)
  # The classifier's optimiser and protocol (None: the protocol's; evaluate/protocols.py and docs/evaluation.md).
  c.classifier = ml_collections.ConfigDict(dict(
      optimizer=_unset(str),      # 'sgd' | 'nesterov' (SGD, Nesterov momentum) | 'larc' (apex LARC, trust 0.001,
                                  # around SGD) | 'adam' (Adam, L2 weight decay added to the gradient)
      head_lr=_unset(float), backbone_lr=_unset(float),
      scale_lr=_unset(bool),      # the learning rates are per 256 images: multiplied by batch_size / 256
      weight_decay=_unset(float), momentum=_unset(float),
      # 'cosine' (per epoch, torch's CosineAnnealingLR), 'cosine_steps' (per step, TF's cosine_decay), 'step' (×
      # lr_decay_factor at each of lr_decay_epochs, MultiStepLR), 'exponential' (per epoch down to
      # lr_decay_factor × lr at the end, ExponentialLR)
      lr_schedule=_unset(str), lr_decay_epochs=_unset(tuple), lr_decay_factor=_unset(float),
      # 'normal': N(0, head_init_std) weights (0: zeros, SimCLR) and zero bias; 'haiku': hk.Linear's (truncated
      # normal, std 1/sqrt(fan-in); zero bias); 'torch': nn.Linear's (weights and bias U(±1/sqrt(fan-in)))
      head_init=_unset(str), head_init_std=_unset(float),
      labels_per_class=0,      # > 0: train on that many labels per class (semi-supervised; in-memory sources)
      labels_percent=100,      # the percentage of the labels trained on (ImageNet subsets: 1 or 10), which picks
                               # the protocol's semi-supervised row
      # fine-tuning's BatchNorm: 'ghost' (statistics of fixed groups of ghost_batch_size rows by global position,
      # whatever the device count: DDP without SyncBN at 32 images per GPU), 'sync' (the whole batch), or
      # 'per_device' (each device's rows: depends on the device count)
      batchnorm=_unset(str), ghost_batch_size=32,
      backbone_dtype='float32',  # the backbone's computation (frozen or fine-tuned), whatever pretraining used
      report=_unset(str),      # test top-1 of the 'best' epoch, tested after each, or of the 'last'
      test_every_epochs=1))    # the test top-1/top-5 written every this many epochs (official: 1; 0: at the end)
  c.features = ml_collections.ConfigDict(dict(
      cache=_unset(bool),     # extract frozen features once (no train augmentation): small datasets, W-MSE
      standardize=False))     # scale cached features by the training features' mean/std (BN without affine)
  c.transforms = ml_collections.ConfigDict(dict(
      # Official (VICReg): RandomResizedCrop(224) + flip; validation Resize(256) + CenterCrop(224). The crop's and
      # the resize's interpolation are the protocol's (None): bilinear (torchvision) or bicubic (BYOL, SimCLR).
      train=dict(RECIPE_DEFAULTS, crop_size=224, crop_scale=(0.08, 1.0), crop_method=_unset(str), flip_p=0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD),
      eval=dict(resize=256, crop=224, method=_unset(str), mean=IMAGENET_MEAN, std=IMAGENET_STD)))
  c.lock()
  return c


def _set(config: ml_collections.ConfigDict, key: str, value, origin: str) -> None:
  """``config[key] = value`` for a dotted leaf ``key`` the schema defines; a ConfigError naming it otherwise."""
  *path, last = key.split('.')
  node = config
  for part in path:
    if part not in node or not hasattr(node[part], 'items'):
      raise errors.ConfigError(f'{origin}: unknown config key {key}')
    node = node[part]
  if last not in node or hasattr(node[last], 'items'):
    raise errors.ConfigError(f'{origin}: unknown config key {key}')
  with node.ignore_type():  # JSON has no tuples, and writes 2.0 as 2.0 but 2 as 2
    node[last] = value


# Sections whose keys are a view recipe's (data/recipes.py checks them), not the schema's: read whole.
_RECIPES = (('augment', 'view1'), ('augment', 'view2'), ('augment', 'small_view'), ('transforms', 'train'),
            ('transforms', 'eval'))


def from_saved(values: dict, origin: str = 'config.json') -> ml_collections.ConfigDict:
  """A saved config (a run's ``config.json``, as a dict) read through the schema: the job's preset with every
  saved value set; keys it lacks keep the schema's defaults, renamed keys (:data:`RENAMED`) are mapped to their
  new names, and an unknown key is a :class:`errors.ConfigError` naming it and ``origin``."""
  job = values.get('job', 'pretrain')
  if job not in JOBS:
    raise errors.ConfigError(f'{origin}: unknown job {job!r}')
  config = base_config() if job == 'pretrain' else eval_job_config()
  for section, recipe in _RECIPES:
    if isinstance(values.get(section), dict) and recipe in values[section]:
      saved = values[section][recipe]  # a recipe saved before one of its keys existed reads it at its "off" value
      config[section][recipe] = saved if (section, recipe) == ('transforms', 'eval') else full_recipe(saved)
  recipes = tuple(f'{section}.{recipe}.' for section, recipe in _RECIPES)
  for key, value in leaves(values).items():
    if not key.startswith(recipes):
      _set(config, RENAMED.get(key, key), value, origin)
  return config
