"""The self-supervised methods the trainer runs: one small record per method, chosen by ``config.method``.

Four families on one train step (:mod:`vicreg_jax.train`): information maximisation (``vicreg``,
``barlow_twins``, ``wmse``), contrastive (``simclr``; ``moco_v3`` and ``moco_v2``: momentum encoders, v2's
with a queue of negatives), distillation (``byol``: predictor and EMA target;
``simsiam``: predictor and stop-gradient) and clustering (``swav``: prototypes, Sinkhorn-Knopp, a queue).

The step embeds both views with the backbone and projector (and the method's heads: a predictor, prototypes),
runs the EMA target network where the method has one, and hands everything to the method's ``objective`` as a
:class:`Views`, with the keys of the method's config section (``config[config.method]``, minus its
``trainer_keys``) as keyword arguments. Adding a method means its pure loss in :mod:`vicreg_jax.losses`, its
:class:`Method` record in :data:`METHODS` (whose ``defaults`` and ``rules`` become the method's config section
and its checks in :mod:`vicreg_jax.config`), and its configs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vicreg_jax import errors, losses, optim
from vicreg_jax.config import BOOL, COUNT, FRACTION, NONNEG, NONNEG_INT, POSITIVE, TEXT, Rule
from vicreg_jax.models import heads


class Views(NamedTuple):
  """What an objective sees of one step: this replica's rows of every crop, each field a tuple with one entry per
  crop: view 1, view 2, then the ``augment.small_crops`` small crops (multi-crop; only methods with
  ``multi_crop`` get any, so the others always see pairs).

  z: the online projector's embeddings; p: the predictor's outputs (None without a predictor); scores: the
  prototype scores (None without prototypes); target: the EMA target network's embeddings of the two views
  (None without one); key: a random key of this step, the same on every replica; extra: the method's state
  (SwAV's queue); params: the online parameters (stop-gradient), for objectives that score the queue against the
  prototypes.
  """
  z: tuple
  p: Optional[tuple] = None
  scores: Optional[tuple] = None
  target: Optional[tuple] = None
  key: Any = None
  extra: Any = None
  params: Any = None


def _no_heads(config, axis_name, dtype) -> dict:
  return {}


def _no_extra(config) -> dict:
  return {}


def _keep_extra(extra, views: Views, step, *, axis_name, **section):
  return extra


@dataclasses.dataclass(frozen=True)
class Method:
  """What the train step needs from a method.

  objective: ``objective(views, *, axis_name, **kwargs) -> (loss, metrics)``, global over ``axis_name`` (the
    gradient convention of :mod:`vicreg_jax.losses`); ``metrics`` holds ``loss`` and the method's terms.
  terms: the metrics shown in the progress line beside the loss.
  trainer_keys: keys of the method's section read by the trainer rather than the objective: the model's heads
    (``predictor``: hidden sizes; ``num_prototypes``; ``projector``: the method's own projector sizes), the EMA
    target's ``tau_base``, the queue's ``queue_length`` and ``queue_start_step``, and the optimiser treatment:
    ``bias_lr_factor`` (biases and norm parameters, ndim 1), ``fixed_predictor_lr`` (the predictor's learning
    rate stays at its peak), ``freeze_prototypes_steps``.
  heads: ``heads(config, axis_name, dtype) -> {'predictor': module, 'prototypes': module}`` (those it has).
  ema_target: the step runs an EMA copy of the online network (its decay from the section's ``ema_key``, by
    default ``tau_base``; it rises to 1 by cosine): BYOL's target, initialised from its own key and updated after
    the step from the updated online weights.
  momentum_encoder: with ``ema_target``, MoCo's order instead: the copy starts equal to the online backbone and
    projector (no predictor) and is updated inside the step, before it computes the keys, from the online weights
    before this step's update, at the decay of this step (facebookresearch/moco-v3@c349e6e:moco/builder.py:L32-L34,
    L57-L61, L89-L94; main_moco.py:L344-L345; facebookresearch/moco@132aea9:moco/builder.py:L53-L57, L152-L153).
  ema_cosine: the decay rises from the section's value to 1 by cosine over the run (:func:`ema_decay`); False:
    it stays at that value (MoCo v2's m).
  one_way: one query view and one key view (MoCo v2): the online network runs on view 1 only and the momentum
    encoder on view 2 only, so :class:`Views` holds ``z = (z1,)`` and ``target = (k2,)``; with the section's
    ``shuffle_keys``, the key view's rows are permuted across the devices first (:func:`vicreg_jax.step`'s
    ``_shuffled``).
  init_extra / update_extra: the method's state (e.g. SwAV's queue), created at init and updated after every
    step from the step's :class:`Views` (``update_extra(extra, views, step, *, axis_name, **section)``).
  prepare_params: applied to the parameters before every step (SwAV: unit-norm prototypes).
  multi_crop: the objective takes any number of crops (``augment.small_crops`` > 0 is refused otherwise).
  defaults: the method's config section (``config.NAME``), key by key, with its default values.
  rules: a :class:`vicreg_jax.config.Rule` for every key of ``defaults`` (checked at start).
  """
  objective: Callable
  terms: tuple[str, ...]
  trainer_keys: tuple[str, ...] = ()
  heads: Callable = _no_heads
  ema_target: bool = False
  momentum_encoder: bool = False
  ema_key: str = 'tau_base'
  ema_cosine: bool = True
  one_way: bool = False
  init_extra: Callable = _no_extra
  update_extra: Callable = _keep_extra
  prepare_params: Callable = lambda params: params
  multi_crop: bool = False
  defaults: dict = dataclasses.field(default_factory=dict)
  rules: dict = dataclasses.field(default_factory=dict)


# --- objectives: each method's loss on the step's views -------------------------------------------------------

def _vicreg(v: Views, *, axis_name, **kw):
  return losses.vicreg_loss(*v.z, axis_name=axis_name, **kw)


def _barlow_twins(v: Views, *, axis_name, **kw):
  return losses.barlow_twins_loss(*v.z, axis_name=axis_name, **kw)


def _simclr(v: Views, *, axis_name, **kw):
  return losses.simclr_loss(*v.z, axis_name=axis_name, **kw)


def _wmse(v: Views, *, axis_name, **kw):
  return losses.wmse_loss(*v.z, key=v.key, axis_name=axis_name, **kw)


def _regularised(loss, metrics, v: Views, std_coeff: float, cov_coeff: float, axis_name):
  """``loss + std_coeff·variance + cov_coeff·covariance`` of the online embeddings (VICReg's terms added to
  BYOL and SimSiam, the VICReg paper's Table 4); both terms are reported either way."""
  variance, covariance = losses.variance_covariance(*v.z, axis_name=axis_name)
  loss = loss + std_coeff * variance + cov_coeff * covariance
  return loss, dict(metrics, loss=loss, variance=variance, covariance=covariance)


def _byol(v: Views, *, axis_name, std_coeff=0.0, cov_coeff=0.0):
  loss, metrics = losses.byol_loss(*v.p, *v.target, axis_name=axis_name)
  return _regularised(loss, metrics, v, std_coeff, cov_coeff, axis_name)


def _simsiam(v: Views, *, axis_name, std_coeff=0.0, cov_coeff=0.0):
  loss, metrics = losses.simsiam_loss(*(v.p if v.p is not None else v.z), *v.z, axis_name=axis_name)
  return _regularised(loss, metrics, v, std_coeff, cov_coeff, axis_name)


def _moco_v3(v: Views, *, axis_name, **kw):
  return losses.moco_v3_loss(*v.p, *v.target, axis_name=axis_name, **kw)


def _moco_v2(v: Views, *, axis_name, **kw):
  return losses.moco_v2_loss(v.z[0], v.target[0], v.extra['queue'], axis_name=axis_name, **kw)


def _swav(v: Views, *, axis_name, **kw):
  """:func:`losses.swav_loss` of every crop's scores (the two views', then the small crops'), with the queue's
  scores against the current prototypes once the queue is full."""
  extra = v.extra or {}
  if 'queue' not in extra:
    return losses.swav_loss(*v.scores, axis_name=axis_name, **kw)
  kernel = jax.lax.stop_gradient(v.params['prototypes']['dense']['kernel'])
  queue_scores = extra['queue'] @ kernel  # [2, Q, K]: queued (unit) embeddings against the current prototypes
  full = extra['queue_count'] >= extra['queue'].shape[1]
  # The official queue takes part once it is full (its last row non-zero).
  return jax.lax.cond(full, lambda: losses.swav_loss(*v.scores, queue_scores=queue_scores, axis_name=axis_name, **kw),
                      lambda: losses.swav_loss(*v.scores, axis_name=axis_name, **kw))


# --- heads and state ------------------------------------------------------------------------------------------

def projector_spec(config: ml_collections.ConfigDict) -> str:
  """The projector's sizes: the method's own ``projector`` where its section has one (W-MSE's head, whose small
  output the whitening needs), else ``config.model.projector``."""
  return config[config.method].get('projector') or config.model.projector


def projector(config: ml_collections.ConfigDict, axis_name, dtype) -> heads.Projector:
  """The projector ``config.model`` describes (sizes: :func:`projector_spec`): hidden biases, BatchNorms, the
  output BatchNorm (with a scale for SimCLR v1) and the output Linear's bias."""
  m = config.model
  return heads.Projector(projector_spec(config), axis_name=axis_name, dtype=dtype,
                         hidden_bias=m.projector_hidden_bias, batchnorm=m.projector_bn,
                         output_bn=m.projector_output_bn, output_scale=m.projector_output_scale,
                         output_bias=m.projector_output_bias)


def _predictor(hidden_bias: Optional[bool]):
  """The ``predictor`` head: an MLP with the hidden sizes of the section's ``predictor`` ('' = none) and the
  projector's output size; biases before its BatchNorms as ``hidden_bias`` says (None: as the projector's), a
  bias on its output Linear where the section's ``predictor_output_bias`` says so (SimSiam's), an affine-free
  BatchNorm after it where ``predictor_output_bn`` says so (MoCo v3's on a ViT)."""
  def make(config, axis_name, dtype) -> dict:
    sec = config[config.method]
    if not sec.predictor:
      return {}
    spec = f'{sec.predictor}-{heads.parse_mlp_spec(projector_spec(config))[-1]}'
    bias = config.model.projector_hidden_bias if hidden_bias is None else hidden_bias
    output_bias = 'predictor_output_bias' in sec and sec.predictor_output_bias
    output_bn = 'predictor_output_bn' in sec and sec.predictor_output_bn
    return {'predictor': heads.Projector(spec, axis_name=axis_name, dtype=dtype, hidden_bias=bias,
                                         batchnorm=config.model.projector_bn, output_bias=output_bias,
                                         output_bn=output_bn)}
  return make


def _prototypes(config, axis_name, dtype) -> dict:
  return {'prototypes': heads.Prototypes(config.swav.num_prototypes)}


def _swav_queue(config) -> dict:
  length = config.swav.queue_length
  if not length:
    return {}
  if length < config.batch_size:
    raise errors.ConfigError(f'swav.queue_length ({length}) must be 0 or at least the global batch '
                             f'({config.batch_size}).')
  dim = heads.parse_mlp_spec(projector_spec(config))[-1]
  return {'queue': jnp.zeros((2, length, dim), jnp.float32), 'queue_count': jnp.zeros((), jnp.int32)}


def _swav_enqueue(extra, v: Views, step, *, axis_name, queue_start_step=0, **section):
  """The global batch's unit embeddings of each crop of ``crops_for_assign`` (the two views; small crops are
  never queued) pushed to the front of its queue (from ``queue_start_step``; the oldest drop off the end), as
  the official code does per GPU (facebookresearch/swav@06b1b7c:main_swav.py:L303-L304)."""
  if 'queue' not in extra:
    return extra
  new = jnp.stack([heads.l2_normalize(losses.gather_batch(z.astype(jnp.float32), axis_name))
                   for z in v.z[:len(losses.CROPS_FOR_ASSIGN)]])
  new = jax.lax.stop_gradient(new)
  pushed = jnp.concatenate([new, extra['queue'][:, :-new.shape[1]]], axis=1)
  start = step >= queue_start_step
  return {'queue': jnp.where(start, pushed, extra['queue']),
          'queue_count': extra['queue_count'] + jnp.where(start, new.shape[1], 0)}


def _moco_queue(config) -> dict:
  """MoCo v2's queue of ``queue_length`` keys [K, dim] (the official buffer is its transpose, [dim, K]), random
  unit vectors to start with (``normalize(randn(dim, K), dim=0)``: facebookresearch/moco@132aea9:
  moco/builder.py:L59-L63, from the run's seed here), and the write position ``queue_ptr``. ``queue_length``
  must be a multiple of the global batch (the official assertion, L83)."""
  length = config.moco_v2.queue_length
  if length % config.batch_size:
    raise errors.ConfigError(f'moco_v2.queue_length ({length}) must be a multiple of the global batch '
                             f'({config.batch_size}): the queue is written a whole batch at a time.')
  dim = heads.parse_mlp_spec(projector_spec(config))[-1]
  keys = jax.random.normal(jax.random.fold_in(jax.random.key(config.seed), 0x717565), (length, dim), jnp.float32)
  return {'queue': heads.l2_normalize(keys), 'queue_ptr': jnp.zeros((), jnp.int32)}


def _moco_enqueue(extra, v: Views, step, *, axis_name, **section):
  """The global batch's unit keys written over the queue's oldest, at ``queue_ptr`` (which moves on by the batch,
  modulo the length): the official ``_dequeue_and_enqueue`` (facebookresearch/moco@132aea9:moco/builder.py:
  L75-L89), after the loss."""
  keys = jax.lax.stop_gradient(heads.l2_normalize(losses.gather_batch(v.target[0].astype(jnp.float32), axis_name)))
  ptr = extra['queue_ptr']
  return {'queue': jax.lax.dynamic_update_slice_in_dim(extra['queue'], keys, ptr, axis=0),
          'queue_ptr': (ptr + keys.shape[0]) % extra['queue'].shape[0]}


_VARIANCE_COVARIANCE = {'std_coeff': NONNEG, 'cov_coeff': NONNEG}

METHODS: dict[str, Method] = {
    # gather_dtype: the embeddings' dtype in the loss's all-gather over the devices ('float32', or 'bfloat16':
    # half the traffic, the statistics still in float32; losses.vicreg_loss says what it rounds).
    'vicreg': Method(
        _vicreg, ('invariance', 'variance', 'covariance'),
        defaults=dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, gather_dtype='float32'),
        rules=dict(sim_coeff=NONNEG, std_coeff=NONNEG, cov_coeff=NONNEG, eps=POSITIVE,
                   gather_dtype=Rule('str', choices=('float32', 'bfloat16')))),
    # Official Barlow Twins: λ 0.0051; biases and BatchNorm at lr-biases 0.0048 against lr-weights 0.2;
    # official_gradient_world_size W > 0: the official code's gradient, 1/W of the exact one (make_optimizer).
    'barlow_twins': Method(
        _barlow_twins, ('on_diagonal', 'off_diagonal'),
        trainer_keys=('bias_lr_factor', 'official_gradient_world_size'),
        defaults=dict(lambd=0.0051, eps=1e-5, bias_lr_factor=0.024, official_gradient_world_size=0),
        rules=dict(lambd=NONNEG, eps=POSITIVE, bias_lr_factor=NONNEG, official_gradient_world_size=NONNEG_INT)),
    # W-MSE (htdt/self-supervised): its own head (official Linear-BN-ReLU-Linear to 64-d, used instead of
    # model.projector: the whitening needs D < w_size), whitening of random sub-batches of w_size, w_iter draws,
    # shrinkage eps (official 0).
    'wmse': Method(
        _wmse, ('cosine',), trainer_keys=('projector',),
        defaults=dict(projector='1024-64', w_size=128, w_iter=1, eps=0.0),
        rules=dict(projector=TEXT, w_size=COUNT, w_iter=COUNT, eps=NONNEG)),
    # SimCLR: NT-Xent temperature (official ImageNet 0.1, CIFAR 0.5).
    'simclr': Method(_simclr, ('top1',), defaults=dict(temperature=0.1), rules=dict(temperature=POSITIVE)),
    # BYOL (deepmind-research/byol, 1000 epochs): the predictor MLP's hidden sizes (its output is the
    # projector's), EMA base decay τ (cosine to 1); std_coeff / cov_coeff add VICReg's variance / covariance
    # terms (the VICReg paper's Table 4: 1 and 0.01).
    'byol': Method(
        _byol, ('cosine', 'variance', 'covariance'), trainer_keys=('predictor', 'tau_base'),
        heads=_predictor(hidden_bias=None), ema_target=True,
        defaults=dict(predictor='4096', tau_base=0.996, std_coeff=0.0, cov_coeff=0.0),
        rules=dict(predictor=TEXT, tau_base=FRACTION, **_VARIANCE_COVARIANCE)),
    # SimSiam (facebookresearch/simsiam): the predictor's hidden sizes ('' = none, the collapsing ablation), a
    # bias on its output Linear (official: nn.Linear(pred_dim, dim), with bias), the predictor's learning rate held
    # at its peak (--fix-pred-lr), and the same optional VICReg terms.
    'simsiam': Method(
        _simsiam, ('cosine', 'variance', 'covariance'),
        trainer_keys=('predictor', 'predictor_output_bias', 'fixed_predictor_lr'),
        heads=_predictor(hidden_bias=False),
        defaults=dict(predictor='512', predictor_output_bias=False, fixed_predictor_lr=True, std_coeff=0.0,
                      cov_coeff=0.0),
        rules=dict(predictor=TEXT, predictor_output_bias=BOOL, fixed_predictor_lr=BOOL, **_VARIANCE_COVARIANCE)),
    # MoCo v3 (facebookresearch/moco-v3): the predictor's hidden sizes (4096, output the projector's), an
    # affine-free BatchNorm after it (official: on a ViT, not on a ResNet), the momentum encoder's base momentum
    # m (cosine to 1 over the run), the InfoNCE temperature, and the ViT's patch projection kept at its random
    # initialisation (--stop-grad-conv1: no gradient, no weight decay; ResNets have no patch projection).
    'moco_v3': Method(
        _moco_v3, ('top1',), trainer_keys=('predictor', 'predictor_output_bn', 'momentum', 'freeze_patch_embed'),
        heads=_predictor(hidden_bias=False), ema_target=True, momentum_encoder=True, ema_key='momentum',
        defaults=dict(predictor='4096', predictor_output_bn=False, momentum=0.99, temperature=1.0,
                      freeze_patch_embed=True),
        rules=dict(predictor=TEXT, predictor_output_bn=BOOL, momentum=FRACTION, temperature=POSITIVE,
                   freeze_patch_embed=BOOL)),
    # MoCo v2 (facebookresearch/moco, --mlp --aug-plus --cos --moco-t 0.2): no predictor; the momentum encoder's m
    # (constant), the InfoNCE temperature, the queue's length (a multiple of the global batch), and the key view
    # shuffled across devices before the key encoder (its BatchNorm then cannot see the queries' batch: it
    # matters under per-group BatchNorm, model.ghost_batch_size; with SyncBN the keys are the same either way).
    'moco_v2': Method(
        _moco_v2, ('top1',), trainer_keys=('momentum', 'queue_length', 'shuffle_keys'), ema_target=True,
        momentum_encoder=True, ema_key='momentum', ema_cosine=False, one_way=True, init_extra=_moco_queue,
        update_extra=_moco_enqueue,
        defaults=dict(momentum=0.999, temperature=0.2, queue_length=65536, shuffle_keys=True),
        rules=dict(momentum=FRACTION, temperature=POSITIVE, queue_length=COUNT, shuffle_keys=BOOL)),
    # SwAV (facebookresearch/swav): prototypes, softmax temperature, Sinkhorn-Knopp ε and iterations, prototypes
    # frozen for the first steps, and a queue of the last queue_length embeddings per crop (0: none; official
    # 3840 for batch 256) filled from queue_start_step.
    'swav': Method(
        _swav, ('entropy',), trainer_keys=('num_prototypes', 'freeze_prototypes_steps', 'queue_length',
                                           'queue_start_step'),
        heads=_prototypes, init_extra=_swav_queue, update_extra=_swav_enqueue,
        prepare_params=heads.normalize_prototypes, multi_crop=True,
        defaults=dict(num_prototypes=3000, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
                      freeze_prototypes_steps=313, queue_length=0, queue_start_step=0),
        rules=dict(num_prototypes=COUNT, temperature=POSITIVE, epsilon=POSITIVE, sinkhorn_iterations=COUNT,
                   freeze_prototypes_steps=NONNEG_INT, queue_length=NONNEG_INT, queue_start_step=NONNEG_INT)),
}


def get(config: ml_collections.ConfigDict) -> Method:
  """The :class:`Method` named by ``config.method``."""
  if config.method not in METHODS:
    raise errors.ConfigError(f'Unknown method {config.method!r}: use one of {sorted(METHODS)}.')
  return METHODS[config.method]


def section(config: ml_collections.ConfigDict) -> dict:
  """The method's config section as a dict."""
  get(config)
  return dict(config[config.method])


def loss_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The keyword arguments of the method's objective: its config section without its ``trainer_keys``."""
  method = get(config)
  return {k: v for k, v in section(config).items() if k not in method.trainer_keys}


def ema_decay(tau_base: float, step, total_steps: int, cosine: bool = True):
  """BYOL's target decay at ``step``: ``1 - (1 - tau_base)·(cos(π·step/total) + 1)/2``, from tau_base to 1
  (without ``cosine``: ``tau_base`` throughout)."""
  if not cosine:
    return jnp.asarray(tau_base, jnp.float32)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
  return 1 - (1 - tau_base) * (jnp.cos(math.pi * frac) + 1) / 2


_OPTIMIZERS = {
    'lars': lambda o, lr: optim.lars(lr, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.eta),
    'lars_classic': lambda o, lr: optim.lars(lr, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.eta,
                                             lr_in_momentum=True),
    'larc': lambda o, lr: optim.larc(lr, weight_decay=o.weight_decay, momentum=o.momentum, trust=o.eta),
    'sgd': lambda o, lr: optim.sgd(lr, weight_decay=o.weight_decay, momentum=o.momentum),
    'adam': lambda o, lr: optim.adam(lr, weight_decay=o.weight_decay),
    'adamw': lambda o, lr: optim.adamw(lr, weight_decay=o.weight_decay),
    'adamw_all': lambda o, lr: optim.adamw_all(lr, weight_decay=o.weight_decay),
}


def _base_optimizer(o, learning_rate):
  """The optimiser ``o.name`` names (:data:`_OPTIMIZERS`) on ``learning_rate``."""
  if o.name not in _OPTIMIZERS:
    raise errors.ConfigError(f"Unknown optim.name {o.name!r}: use one of {sorted(_OPTIMIZERS)}.")
  return _OPTIMIZERS[o.name](o, learning_rate)


def warmup_steps_of(config: ml_collections.ConfigDict, warmup_steps: int, total_steps: int) -> int:
  """The warmup's length in steps: ``optim.warmup_steps`` where > 0 (W-MSE's 500 iterations), else
  ``warmup_steps`` (from ``optim.warmup_epochs``); at most the run's length."""
  return min(config.optim.warmup_steps or warmup_steps, total_steps)


def lr_schedule(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int,
                steps_per_epoch: Optional[int] = None) -> optax.Schedule:
  """The learning-rate schedule of ``config.optim`` (:func:`vicreg_jax.optim.lr_schedule`), ``decay_epochs``
  and the epochs of 'cosine_epochs' in steps of ``steps_per_epoch`` (None: ``total_steps / epochs``, exact for a
  run in epochs; a run of ``num_steps`` should pass its own, :func:`vicreg_jax.runs.schedule_steps`'s)."""
  o = config.optim
  per_epoch = steps_per_epoch or total_steps / max(config.epochs, 1)
  milestones = tuple(int(round(e * per_epoch)) for e in o.decay_epochs) if o.schedule == 'step' else ()
  warmup = warmup_steps_of(config, warmup_steps, total_steps)
  return optim.lr_schedule(o.base_lr, config.batch_size, total_steps, warmup, o.end_lr_factor, kind=o.schedule,
                           start_factor=o.warmup_start_factor, warmup_linspace=o.warmup_linspace,
                           milestones=milestones, decay_factor=o.decay_factor, steps_per_epoch=per_epoch)


def _group(params, name: str, inside: str, outside: str) -> dict:
  """Labels for ``optax.multi_transform``: ``inside`` for the top-level subtree ``name``, ``outside`` elsewhere."""
  return {k: jax.tree.map(lambda _, k=k: inside if k == name else outside, v) for k, v in params.items()}


def _method_optimizer(config, sec: dict, schedule) -> optax.GradientTransformation:
  """``config.optim``'s optimiser on ``schedule`` with the method's treatment of its predictor
  (``fixed_predictor_lr``: the peak learning rate) and of biases and norm parameters (``bias_lr_factor``)."""
  o = config.optim
  tx = _base_optimizer(o, schedule)
  if sec.get('fixed_predictor_lr') and sec.get('predictor'):
    fixed = _base_optimizer(o, o.base_lr * config.batch_size / 256)
    tx = optax.multi_transform({'scheduled': tx, 'fixed': fixed},
                               lambda params: _group(params, 'predictor', 'fixed', 'scheduled'))
  if sec.get('bias_lr_factor', 1.0) != 1.0:
    tx = optax.chain(tx, optim.scale_bias_and_norm(sec['bias_lr_factor']))
  return tx


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int,
                   steps_per_epoch: Optional[int] = None):
  """``(optimizer, schedule)``: ``config.optim.name`` ('lars', the official VICReg / Barlow Twins / BYOL
  optimiser; 'lars_classic', SimCLR's; 'larc', SwAV's; 'sgd', SimSiam's; 'adam', W-MSE's; 'adamw'; or
  'adamw_all', MoCo v3's) on :func:`lr_schedule`, with the method's treatment of its predictor and of biases and
  norm parameters (:func:`_method_optimizer`), of a ViT's patch projection (``freeze_patch_embed``: MoCo v3's, no
  update at all), of its prototypes (``freeze_prototypes_steps``: SwAV's get no gradient, decay, momentum or
  update for that many first steps, as the official ``p.grad = None``; their schedule still follows
  the step count) and Barlow Twins' ``official_gradient_world_size`` W: the official code all-reduces the
  cross-correlation without a gradient, so each of W GPUs back-propagates only its own share and DDP averages,
  giving 1/W of the exact gradient; the gradients are scaled so. Under LARS that is the same as a W× larger weight
  decay on the weights (the trust ratio of ``g/W + wd·p`` is that of ``g + W·wd·p``, for any non-zero ‖p‖) and a
  W× smaller learning rate for biases and BatchNorm (no trust ratio: their update is linear in the gradient)."""
  sec = section(config)
  schedule = lr_schedule(config, total_steps, warmup_steps, steps_per_epoch)
  tx = _method_optimizer(config, sec, schedule)
  if sec.get('freeze_patch_embed') and config.model.arch.startswith('vit'):
    # As requires_grad=False: no update, no decay, no optimiser state that changes.
    tx = optax.multi_transform({'trained': tx, 'fixed': optax.set_to_zero()},
                               lambda params: {k: _group(v, 'patch_embed', 'fixed', 'trained') if k == 'backbone'
                                               else jax.tree.map(lambda _: 'trained', v)
                                               for k, v in params.items()})
  frozen = sec.get('freeze_prototypes_steps')
  if frozen:
    late = _method_optimizer(config, sec, lambda count: schedule(count + frozen))
    tx = optax.multi_transform({'trained': tx, 'frozen': optim.frozen_for(late, frozen)},
                               lambda params: _group(params, 'prototypes', 'frozen', 'trained'))
  if sec.get('official_gradient_world_size'):
    tx = optax.chain(optax.scale(1.0 / sec['official_gradient_world_size']), tx)
  return tx, schedule
