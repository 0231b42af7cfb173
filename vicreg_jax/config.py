"""The value of every configuration key, checked before a job starts (the keys and their defaults are in
:mod:`vicreg_jax.defaults`): its type, its range (a count ≥ 1 where it divides or counts steps, a probability in
[0, 1], a rate > 0, …) or its choices. A wrong value ends the job with one line naming the key
(:class:`errors.ConfigError`), instead of a traceback from deep inside, or, worse, a run that silently trains 0
steps. Every numeric and enumerated key of every config in ``configs/`` has a rule here (a test checks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from vicreg_jax import errors


@dataclasses.dataclass(frozen=True)
class Rule:
  """``kind`` 'int', 'float', 'str' or 'bool'; numbers within [lo, hi] (``lo_open``: lo excluded; None: no
  bound); ``choices``: the allowed values (a callable returning them, for registries); ``none``: None allowed."""
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


def _methods():
  from vicreg_jax import methods
  return methods.METHODS


def _archs():
  from vicreg_jax.models import resnet
  return {'convnet', *resnet.ARCHS}


def _sources():
  from vicreg_jax.data import sources
  return sources.SOURCES


_RECIPE = {  # an augmentation recipe (augment.view1/view2, transforms.train)
    'crop_size': NONNEG_INT,
    'crop_method': Rule('str', choices=('bilinear', 'bicubic', 'nearest', 'area', 'lanczos3', 'lanczos5', 'gaussian',
                                        'mitchellcubic')),
    'translate': NONNEG_INT, 'affine_degrees': NONNEG, 'affine_shear': NONNEG, 'flip_p': PROBABILITY,
    'jitter_p': PROBABILITY, 'gray_p': PROBABILITY, 'blur_p': PROBABILITY, 'blur_kernel_fraction': POSITIVE,
    'solarize_p': PROBABILITY, 'noise_std': NONNEG, 'cutout_p': PROBABILITY, 'cutout_size': NONNEG_INT,
}
_SHARED = {  # keys of both jobs
    'job': Rule('str', choices=('pretrain', 'linear', 'finetune')), 'seed': NONNEG_INT, 'batch_size': COUNT,
    'log_every_steps': COUNT, 'metrics_every_steps': COUNT, 'checkpoint_every_steps': COUNT,
    'nonfinite': Rule('str', choices=('stop', 'skip')), 'restore_retry_seconds': NONNEG,
    'reductions': Rule('str', choices=('native', 'ordered', 'reversed')),
    'data.source': Rule('str', choices=_sources), 'data.name': TEXT, 'data.train_split': TEXT,
    'data.val_fraction': Rule('float', 0, 1), 'data.channels': Rule('int', 1, 4), 'data.image_size': NONNEG_INT,
    'data.shuffle_buffer': NONNEG_INT, 'data.threadpool_size': NONNEG_INT, 'data.prefetch': NONNEG_INT,
    'data.cache': BOOL, 'data.data_dir': Rule('str', none=True),
    'data.path': TEXT,
}
_PRETRAIN = {
    'epochs': NONNEG_INT, 'num_steps': NONNEG_INT, 'max_steps_per_run': NONNEG_INT, 'keep_checkpoints': COUNT,
    'debug_nan_at_step': NONNEG_INT, 'spectrum_every_steps': NONNEG_INT, 'diagnostics_max_rows': COUNT,
    'compilation_cache': TEXT, 'compilation_cache_min_seconds': NONNEG, 'profile_steps': TEXT,
    'prefetch_to_device': NONNEG_INT, 'grad_accum_steps': COUNT,
    'online_probe.enabled': BOOL, 'online_probe.lr': POSITIVE, 'online_probe.momentum': FRACTION,
    'model.arch': Rule('str', choices=_archs), 'model.width_multiplier': POSITIVE,
    'model.stem': Rule('str', choices=('imagenet', 'small')), 'model.projector': TEXT,
    'model.dtype': Rule('str', choices=('float32', 'bfloat16')), 'model.projector_hidden_bias': BOOL,
    'model.projector_bn': BOOL, 'model.projector_output_bn': BOOL, 'model.remat': BOOL,
    'method': Rule('str', choices=_methods),
    'vicreg.sim_coeff': NONNEG, 'vicreg.std_coeff': NONNEG, 'vicreg.cov_coeff': NONNEG, 'vicreg.eps': POSITIVE,
    'vicreg.gather_dtype': Rule('str', choices=('float32', 'bfloat16')),
    'barlow_twins.lambd': NONNEG, 'barlow_twins.eps': POSITIVE, 'barlow_twins.bias_lr_factor': NONNEG,
    'wmse.projector': TEXT, 'wmse.w_size': COUNT, 'wmse.w_iter': COUNT, 'wmse.eps': NONNEG,
    'simclr.temperature': POSITIVE,
    'byol.predictor': TEXT, 'byol.tau_base': FRACTION, 'byol.std_coeff': NONNEG, 'byol.cov_coeff': NONNEG,
    'simsiam.predictor': TEXT, 'simsiam.fixed_predictor_lr': BOOL, 'simsiam.std_coeff': NONNEG,
    'simsiam.cov_coeff': NONNEG,
    'swav.num_prototypes': COUNT, 'swav.temperature': POSITIVE, 'swav.epsilon': POSITIVE,
    'swav.sinkhorn_iterations': COUNT, 'swav.freeze_prototypes_steps': NONNEG_INT, 'swav.queue_length': NONNEG_INT,
    'swav.queue_start_step': NONNEG_INT,
    'optim.name': Rule('str', choices=('lars', 'sgd', 'adamw')), 'optim.base_lr': POSITIVE,
    'optim.weight_decay': NONNEG, 'optim.momentum': FRACTION, 'optim.eta': NONNEG, 'optim.warmup_epochs': NONNEG,
    'optim.end_lr_factor': FRACTION, 'augment.on_device': BOOL,
    'eval.final_probe': BOOL, 'eval.test_split': TEXT, 'eval.labels_per_class': COUNT, 'eval.draws': COUNT,
    'eval.batch_size': COUNT, 'eval.max_train_examples': NONNEG_INT, 'eval.max_test_examples': NONNEG_INT,
    **{f'augment.{v}.{k}': r for v in ('view1', 'view2') for k, r in _RECIPE.items()},
}
_EVAL = {
    'epochs': COUNT, 'pretrain_workdir': TEXT, 'checkpoints': Rule('str', choices=('all', 'latest', 'final')),
    'from_scratch': BOOL,
    'poll_seconds': POSITIVE, 'timeout_seconds': NONNEG, 'start_timeout_seconds': NONNEG,
    'classifier.head_lr': NONNEG, 'classifier.backbone_lr': NONNEG, 'classifier.weight_decay': NONNEG,
    'classifier.momentum': FRACTION, 'classifier.head_init_std': NONNEG,
    'classifier.batchnorm': Rule('str', choices=('per_device', 'sync')),
    'classifier.report': Rule('str', choices=('best', 'last')), 'classifier.test_every_epochs': NONNEG_INT,
    'features.cache': BOOL, 'features.standardize': BOOL, 'data.test_split': TEXT,
    'data.labels_per_class': NONNEG_INT, 'transforms.eval.resize': NONNEG_INT, 'transforms.eval.crop': NONNEG_INT,
    **{f'transforms.train.{k}': r for k, r in _RECIPE.items()},
}


def rules(job: str) -> dict[str, Rule]:
  """The rules of a job's keys ('pretrain', or 'linear'/'finetune'), by dotted key."""
  return {**_SHARED, **(_PRETRAIN if job == 'pretrain' else _EVAL)}


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
  job_rules = rules(values.get('job', 'pretrain'))
  for key, rule in job_rules.items():
    if key in values and (problem := rule.problem(values[key])) is not None:
      raise errors.ConfigError(f'config.{key} {problem}')
  if values.get('job', 'pretrain') == 'pretrain' and not (values.get('num_steps') or values.get('epochs')):
    raise errors.ConfigError('config.epochs and config.num_steps are both 0: set one of them to train for any steps')
