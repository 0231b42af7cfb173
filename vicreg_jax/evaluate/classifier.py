"""Supervised training of a linear head on a pretrained backbone, shared by the linear-evaluation job (frozen
backbone, BatchNorm in inference mode) and semi-supervised fine-tuning (whole network, BatchNorm in train mode:
ghost, synchronised or per device).

What it trains with is the resolved evaluation protocol (:mod:`vicreg_jax.evaluate.protocols`): the head's
initialisation (N(0, std) as VICReg's evaluate.py, zeros, hk.Linear's or nn.Linear's), one optimiser per
parameter group ('head', 'backbone') with its own learning rate (SGD with momentum and weight decay added to the
gradient as torch.optim.SGD, Nesterov's, apex's LARC around it, or Adam with L2 decay), and a schedule per epoch
(cosine, as CosineAnnealingLR; steps, as MultiStepLR; exponential, as ExponentialLR) or per step (TF's cosine
decay). The backbone computes in ``classifier.backbone_dtype`` (float32 unless asked).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from jax.sharding import PartitionSpec as P

from vicreg_jax import checkpoints, collectives, compilation, distributed, errors, loop, optim, parallel, runs
from vicreg_jax.data import pipeline, sources
from vicreg_jax.evaluate import probe
from vicreg_jax.metrics import all_finite, keep_if_finite
from vicreg_jax.models import backbones, heads, norm


@flax.struct.dataclass
class ClassifierState:
  step: jax.Array
  params: Any        # {'head': ...} (+ 'backbone' when fine-tuning)
  batch_stats: Any   # the backbone's BatchNorm statistics when fine-tuning, else {}
  opt_state: Any


# --- the pretrained backbone --------------------------------------------------------------------------------

def init_backbone(pre_config: ml_collections.ConfigDict, seed: int, mesh) -> dict:
  """``{'params', 'batch_stats'}`` of a freshly initialised backbone of the pretraining run's architecture,
  replicated over ``mesh`` (the baseline a pretrained checkpoint is compared with)."""
  size = pre_config.data.image_size
  x = jnp.zeros((1, size, size, pre_config.data.channels), jnp.float32)
  variables = backbones.from_config(pre_config.model).init(jax.random.key(seed), x, train=False)
  return parallel.replicate({k: variables[k] for k in ('params', 'batch_stats')}, mesh)


def backbone_model(pre_config: ml_collections.ConfigDict, cl: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pretraining run's ``model`` section computing in ``cl.backbone_dtype`` (float32 by default, as the
  official evaluations, whatever dtype pretraining used)."""
  model = ml_collections.ConfigDict(pre_config.model.to_dict())
  model.dtype = cl.backbone_dtype
  return model


def init_head(cl: ml_collections.ConfigDict, num_classes: int, key: jax.Array, feat_dim: int) -> dict:
  """The head's parameters by ``cl.head_init``: 'normal' (N(0, head_init_std) weights, zero bias: VICReg's; std 0
  gives SimCLR's zeros), 'haiku' (hk.Linear's: 1/√fan_in times a normal truncated to [-2, 2], zero bias)
  or 'torch' (nn.Linear's: weights and bias U(±1/√fan_in))."""
  params = heads.Head(num_classes, cl.head_init_std).init(key, jnp.zeros((1, feat_dim)))['params']
  if cl.head_init == 'normal':
    return params
  shape, bound = params['fc']['kernel'].shape, 1.0 / math.sqrt(feat_dim)
  k1, k2 = jax.random.split(key)
  if cl.head_init == 'haiku':
    kernel = jax.random.truncated_normal(k1, -2.0, 2.0, shape) * bound
    return {'fc': {'kernel': kernel, 'bias': jnp.zeros(shape[1])}}
  return {'fc': {'kernel': jax.random.uniform(k1, shape, minval=-bound, maxval=bound),
                 'bias': jax.random.uniform(k2, (shape[1],), minval=-bound, maxval=bound)}}


# --- optimiser and steps ------------------------------------------------------------------------------------

def epoch_cosine(base_lr: float, steps_per_epoch: int, epochs: int) -> Callable:
  """``base_lr·(1 + cos(π·epoch/epochs))/2`` with epoch = step // steps_per_epoch (CosineAnnealingLR)."""
  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def lr_schedule(cl: ml_collections.ConfigDict, base_lr: float, steps_per_epoch: int, epochs: int) -> Callable:
  """The learning rate at each step, from ``base_lr``, by ``cl.lr_schedule``: 'cosine' (:func:`epoch_cosine`),
  'cosine_steps' (``base_lr·(1 + cos(π·min(step, total)/total))/2``, TF's cosine_decay), 'step' (``base_lr ×
  lr_decay_factor^(milestones passed)`` with the milestones ``lr_decay_epochs``, MultiStepLR), 'exponential'
  (``base_lr × γ^epoch``, γ = lr_decay_factor^(1/epochs), ExponentialLR: lr_decay_factor × base_lr after the last
  epoch)."""
  total = steps_per_epoch * epochs
  if cl.lr_schedule == 'cosine':
    return epoch_cosine(base_lr, steps_per_epoch, epochs)
  if cl.lr_schedule == 'cosine_steps':
    return lambda step: base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(step, total) / total))
  epoch = lambda step: step // steps_per_epoch  # noqa: E731
  if cl.lr_schedule == 'step':
    milestones = jnp.asarray(tuple(cl.lr_decay_epochs) or (epochs + 1,), jnp.int32)
    return lambda step: base_lr * cl.lr_decay_factor ** jnp.sum(epoch(step) >= milestones)
  if cl.lr_schedule == 'exponential':
    gamma = cl.lr_decay_factor ** (1.0 / epochs)
    return lambda step: base_lr * gamma ** jnp.minimum(epoch(step), epochs).astype(jnp.float32)
  raise errors.ConfigError(f'classifier.lr_schedule {cl.lr_schedule!r} is not one of cosine, cosine_steps, step, '
                           'exponential')


def group_optimizer(cl: ml_collections.ConfigDict, schedule: Callable) -> optax.GradientTransformation:
  """One parameter group's optimiser, as PyTorch's (``cl.optimizer``; :mod:`vicreg_jax.optim`): 'sgd' /
  'nesterov' (``g + wd·p``, momentum buffer ``m·buf + g``, Nesterov's step ``g + m·buf``, then the learning
  rate), 'larc' (apex's LARC, trust 0.001, before SGD: SimSiam's linear classifier), 'adam' (``g + wd·p``, then
  Adam, β 0.9 / 0.999, ε 1e-8)."""
  if cl.optimizer == 'adam':
    return optim.adam(schedule, weight_decay=cl.weight_decay)
  if cl.optimizer == 'larc':
    return optim.larc(schedule, weight_decay=cl.weight_decay, momentum=cl.momentum)
  return optim.sgd(schedule, weight_decay=cl.weight_decay, momentum=cl.momentum,
                   nesterov=cl.optimizer == 'nesterov')


def make_optimizer(cl: ml_collections.ConfigDict, params: dict, steps_per_epoch: int, epochs: int,
                   batch_size: int):
  """The classifier's optimiser (:func:`group_optimizer`), with its own learning rate and schedule per top-level
  group ('head', 'backbone'); ``cl.scale_lr``: the learning rates multiplied by ``batch_size / 256``."""
  scale = batch_size / 256 if cl.scale_lr else 1.0
  lrs = {'head': cl.head_lr * scale, 'backbone': cl.backbone_lr * scale}
  return optax.multi_transform({k: group_optimizer(cl, lr_schedule(cl, lrs[k], steps_per_epoch, epochs))
                                for k in params}, {k: k for k in params})


def ghost_forward(backbone: nn.Module, variables: dict, x: jax.Array, size: int, axis: str):
  """``(h, batch_stats)`` of the backbone in train mode on this device's rows ``x`` with ghost BatchNorm over
  groups of ``size`` rows by global position (:func:`vicreg_jax.models.norm.ghost_apply`); ``batch_stats``: the
  first group's (DDP broadcasts rank 0's buffers)."""
  def apply(rows):
    h, upd = backbone.apply(variables, rows, train=True, mutable=['batch_stats'])
    return h, upd['batch_stats']
  return norm.ghost_apply(apply, x, size, axis)


def _features_of(backbone: Optional[nn.Module], finetune: bool, batchnorm: str, ghost_size: int, params: dict,
                 batch_stats, frozen, x) -> tuple[jax.Array, Any]:
  """``(representations of x, the backbone's new batch_stats)`` for :func:`make_train_step`: ``x`` itself
  (cached features), the frozen backbone in inference mode, or the fine-tuned one in train mode with its
  ``batchnorm``."""
  if backbone is None:
    return x, batch_stats
  if not finetune:
    return jax.lax.stop_gradient(backbone.apply(frozen, x, train=False)), batch_stats
  variables = {'params': params['backbone'], 'batch_stats': batch_stats}
  if batchnorm == 'ghost':
    return ghost_forward(backbone, variables, x, ghost_size, parallel.AXIS)
  h, upd = backbone.apply(variables, x, train=True, mutable=['batch_stats'])
  if batchnorm == 'per_device':
    return h, jax.tree.map(lambda v: jax.lax.all_gather(v, parallel.AXIS)[0], upd['batch_stats'])
  return h, upd['batch_stats']


def make_train_step(head: nn.Module, backbone: Optional[nn.Module], tx, mesh, finetune: bool,
                    batchnorm: str = 'sync', reductions: str = 'native', ghost_size: int = 32):
  """The jit-compiled global step ``(state, frozen, batch) -> (state, metrics)``, ``shard_map``'d over ``'data'``.
  A non-finite loss or gradient moves only the step counter (``metrics['finite']``, read by the loop's guard).

  ``backbone=None``: the batch holds features (cached extraction). Frozen backbone: ``frozen`` holds its
  variables and it runs in inference mode. Fine-tuning: its params are in ``state`` and BatchNorm runs in train
  mode: ``batchnorm='sync'``, the global batch's statistics (``backbone`` built with the ``'data'`` axis);
  'ghost', those of fixed groups of ``ghost_size`` rows (:func:`ghost_forward`); 'per_device', each device's
  own; the running statistics then the first group's or device 0's (DDP broadcasts rank 0's buffers). Each
  replica's loss is the global mean cross-entropy, so the averaged gradients are those of one device on the whole
  batch. ``reductions``: how sums over devices add them (:mod:`vicreg_jax.collectives`).
  """
  axis = parallel.AXIS
  collectives.check(reductions)

  def per_device(state: ClassifierState, frozen, batch):
    with collectives.mode(reductions):
      return train_one_step(state, frozen, batch)

  def train_one_step(state: ClassifierState, frozen, batch):
    def loss_fn(params):
      h, batch_stats = _features_of(backbone, finetune, batchnorm, ghost_size, params, state.batch_stats, frozen,
                                    batch['image'])
      logits = head.apply({'params': params['head']}, h)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      return collectives.pmean(ce, axis), (batch_stats, logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = collectives.pmean(grads, axis)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = all_finite(loss, grads)
    state = keep_if_finite(finite, ClassifierState(step=state.step + 1, params=optax.apply_updates(
        state.params, updates), batch_stats=batch_stats, opt_state=opt_state), state)
    top1 = collectives.pmean(jnp.mean(jnp.argmax(logits, -1) == batch['label']), axis)
    return state, {'loss': loss, 'train_top1': top1, 'finite': finite}

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=(P(), P()),
                          check_vma=False)
  return compilation.jit(sharded, donate_argnums=0)


def make_eval_step(head: nn.Module, backbone: Optional[nn.Module], mesh):
  """Jitted ``(state, frozen, batch) -> (top-1 hits, top-5 hits, count)`` summed over the global batch
  (replicated, so every process reads them)."""
  def step(state, frozen, batch):
    h = batch['image']
    if backbone is not None:
      variables = frozen if 'backbone' not in state.params else {
          'params': state.params['backbone'], 'batch_stats': state.batch_stats}
      h = backbone.apply(variables, h, train=False)
    logits = head.apply({'params': state.params['head']}, h)
    k = min(5, logits.shape[-1])
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == batch['label'][:, None], axis=-1)
    top1 = jnp.argmax(logits, -1) == batch['label']
    m = batch['mask']
    return jnp.sum(top1 * m), jnp.sum(top5 * m), jnp.sum(m)
  return compilation.jit(step, out_shardings=parallel.replicated(mesh))


def evaluate(eval_step, state, frozen, batches) -> dict:
  """Top-1 and top-5 accuracy (in [0, 1]) over ``batches`` of ``{'image', 'label', 'mask'}`` (the counts summed
  on the devices, one copy to the host at the end)."""
  totals = None
  for batch in batches:
    counts = eval_step(state, frozen, batch)
    totals = counts if totals is None else _add_counts(totals, counts)
  hits1, hits5, count = jax.device_get(totals) if totals is not None else (0.0, 0.0, 0.0)
  return {'top1': float(hits1 / max(count, 1)), 'top5': float(hits5 / max(count, 1))}


@jax.jit
def _add_counts(a, b):
  return jax.tree.map(jnp.add, a, b)


# --- features for the cached path ---------------------------------------------------------------------------

def feature_batches(h: np.ndarray, y: np.ndarray, batch_size: int, seed: int, start_step: int, sharding):
  """Infinite global batches of cached features (the same arrays on every process), reshuffled each epoch by
  (seed, epoch); resumable at a step."""
  n = len(y)
  per_epoch = max(n // batch_size, 1)
  step = start_step
  while True:
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[(i * batch_size + np.arange(batch_size)) % n]
    yield {'image': parallel.global_array(h[idx], sharding), 'label': parallel.global_array(y[idx], sharding)}
    step += 1


def padded_feature_batches(h: np.ndarray, y: np.ndarray, batch_size: int, sharding):
  """One pass over cached features in full global batches with a mask (the last one padded)."""
  for i in range(0, len(y), batch_size):
    hb, yb = h[i:i + batch_size], y[i:i + batch_size]
    pad = batch_size - len(yb)
    mask = np.concatenate([np.ones(len(yb), np.float32), np.zeros(pad, np.float32)])
    hb = np.concatenate([hb, np.zeros((pad,) + hb.shape[1:], hb.dtype)])
    yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
    yield {k: parallel.global_array(v, sharding) for k, v in (('image', hb), ('label', yb), ('mask', mask))}


# --- the training loop --------------------------------------------------------------------------------------

def _features(config, pre_config, pretrained: dict, eval_backbone, mesh, finetune: bool):
  """``(train features or None, test features or None, feature dim)``: with ``features.cache`` (linear job only)
  the frozen features of the un-augmented train and test images, extracted once (each process its share,
  gathered to all) and optionally standardised; else Nones and the backbone's output width."""
  tr = config.transforms.eval
  if not (config.features.cache and not finetune):
    if config.features.standardize:
      raise errors.ConfigError('features.standardize needs features.cache=True (statistics of fixed features).')
    size = tr.crop or config.data.image_size  # file-backed sources: the crop; in-memory: as stored
    shape = jax.ShapeDtypeStruct((1, size, size, pre_config.data.channels), jnp.float32)
    return None, None, jax.eval_shape(functools.partial(eval_backbone.apply, train=False), pretrained,
                                      shape).shape[-1]
  apply = compilation.jit(functools.partial(eval_backbone.apply, train=False))
  h_tr, y_tr = probe.extract(apply, pretrained, _eval_batches(config, config.data.train_split, mesh))
  h_te, y_te = probe.extract(apply, pretrained, _eval_batches(config, config.data.test_split, mesh))
  if config.features.standardize:  # BatchNorm without affine, statistics of the training features
    mu, sd = h_tr.mean(0), h_tr.std(0) + 1e-6
    h_tr, h_te = (h_tr - mu) / sd, (h_te - mu) / sd
  return (h_tr, y_tr), (h_te, y_te), h_tr.shape[1]


def _eval_batches(config, split: str, mesh):
  """One pass over ``split`` with the evaluation transform, as global batches."""
  tr = config.transforms.eval
  ds = pipeline.eval_dataset(config.data, split, config.batch_size, crop=tr.crop, resize=tr.resize, mean=tr.mean,
                             std=tr.std, process_index=jax.process_index(), process_count=jax.process_count(),
                             method=tr.method)
  return pipeline.global_batches(ds, parallel.data_sharding(mesh))


def _train_batches(config, train_feats, indices, start: int, sharding):
  """The training batches from step ``start`` on: of the cached features, or of the augmented images (the
  subset ``indices`` of the split, or all of it)."""
  if train_feats is not None:
    return feature_batches(*train_feats, config.batch_size, config.seed, start, sharding)
  ds = pipeline.labelled_dataset(config.data, dict(config.transforms.train), config.batch_size, config.seed,
                                 start, jax.process_index(), jax.process_count(), indices)
  return pipeline.global_batches(ds, sharding)


def _train_subset(config) -> tuple[Optional[np.ndarray], int]:
  """The indices of ``classifier.labels_per_class`` examples per class (None: the whole split) and the number of
  training examples."""
  data = config.data
  source = sources.get(data)
  per_class = config.classifier.labels_per_class
  if not per_class:
    return None, source.num_examples(data, data.train_split)
  in_memory = source.in_memory(data, data.train_split)
  if in_memory is None:
    raise errors.ConfigError('classifier.labels_per_class needs an in-memory source (digits or folder); for TFDS name a '
                     "subset split instead (e.g. 'imagenet2012_subset/1pct').")
  indices = sources.per_class_subset(in_memory[1], per_class, config.seed)
  return indices, len(indices)


def _initial_state(config, head, feat_dim: int, pretrained: dict, finetune: bool, tx_of, mngr, mesh, tag: str,
                   workdir: str):
  """The replicated classifier state (head, and the backbone when fine-tuning), or that of its newest checkpoint
  (:func:`checkpoints.restore_newest`: a damaged one set aside to ``workdir/damaged_checkpoints``)."""
  params = {'head': init_head(config.classifier, head.num_classes, jax.random.key(config.seed), feat_dim)}
  batch_stats = {}
  if finetune:
    params['backbone'], batch_stats = pretrained['params'], pretrained['batch_stats']
  tx = tx_of(params)
  state = parallel.replicate(ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                                             batch_stats=batch_stats, opt_state=tx.init(params)), mesh)
  restored = checkpoints.restore_newest(mngr, state, workdir, config.restore_retry_seconds,
                                        what=f'{tag} head checkpoint', prefix=f'heads-{tag}-')
  if restored is not None:
    logging.info('%s: resumed head training at step %d.', tag, int(restored.step))
  return (state if restored is None else restored), tx


def train_classifier(config: ml_collections.ConfigDict, pre_config: ml_collections.ConfigDict,
                     pretrained: dict, workdir: str, step: int, writer, finetune: bool,
                     preemption: loop.Preemption) -> Optional[dict]:
  """Trains the head (and the backbone when ``finetune``) on ``config.data.train_split`` for
  ``config.epochs``, checkpointed in and resumed from ``workdir/heads/STEP`` (pretraining checkpoint ``step``);
  returns top-1/top-5 on ``config.data.test_split``: of the last epoch, or with ``classifier.report='best'``
  (official) of the epoch with the best top-1, tested after each. None when ``preemption`` stopped it (its state
  saved at the step reached: the same command continues).
  The test figures of every ``classifier.test_every_epochs``-th epoch go to the writer as ``TAG/test_top1`` and
  ``TAG/test_top5``, the means of the head's train loss and top-1 as ``TAG/loss`` and ``TAG/train_top1``."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  sharding = parallel.data_sharding(mesh)
  cl = config.classifier
  indices, n_train = _train_subset(config)
  steps_per_epoch = max(math.ceil(n_train / config.batch_size), 1)
  model = backbone_model(pre_config, cl)
  eval_backbone = backbones.from_config(model)
  train_feats, test_feats, feat_dim = _features(config, pre_config, pretrained, eval_backbone, mesh, finetune)
  head = heads.Head(sources.get(config.data).num_classes(config.data), cl.head_init_std)
  tag, ckpt_dir = f'ckpt{step}', os.path.join(workdir, 'heads', str(step))
  mngr = checkpoints.manager(ckpt_dir, keep=1)
  state, tx = _initial_state(config, head, feat_dim, pretrained, finetune,
                             lambda p: make_optimizer(cl, p, steps_per_epoch, config.epochs, config.batch_size),
                             mngr, mesh, tag, workdir)
  start = int(state.step)
  batches = _train_batches(config, train_feats, indices, start, sharding)
  if finetune and cl.batchnorm == 'ghost':
    norm.check_ghost(config.batch_size, mesh.size, cl.ghost_batch_size)
  train_backbone = None if train_feats is not None else backbones.from_config(
      model, parallel.AXIS if finetune and cl.batchnorm == 'sync' else None)
  train_step = make_train_step(head, train_backbone, tx, mesh, finetune, cl.batchnorm, config.reductions,
                               cl.ghost_batch_size)
  eval_step = make_eval_step(head, None if train_feats is not None else eval_backbone, mesh)

  # Cached features: the test batches are placed on the devices once and reused by every test.
  cached_test = (list(padded_feature_batches(*test_feats, config.batch_size, sharding)) if test_feats is not None
                 else None)

  def test(state):
    batches = cached_test if cached_test is not None else _eval_batches(config, config.data.test_split, mesh)
    return evaluate(eval_step, state, pretrained, batches)

  epoch_test = EpochTest(config, tag, writer, steps_per_epoch, test, ckpt_dir + '_best.json')
  state, preempted = _run(config, tag, writer, mngr, steps_per_epoch, epoch_test, preemption,
                          lambda s, b: (*train_step(s, pretrained, b), None), state, batches, start)
  if preempted:
    return None
  result = test(state)
  if cl.report == 'best':
    result = dict(epoch_test.best, last_top1=result['top1'], last_top5=result['top5'])
  result['epochs'] = config.epochs
  return result


def _run(config, tag: str, writer, mngr, steps_per_epoch: int, epoch_test, preemption, step_fn, state, batches,
         start: int):
  """The classifier's steps through :func:`loop.run` with their actions: the mean train loss and top-1 over
  every ``metrics_every_steps`` steps to the writer as ``TAG/loss`` and ``TAG/train_top1``, a progress line every
  ``log_every_steps``, the epoch tests, a checkpoint every ``checkpoint_every_steps`` (and of the step reached
  on SIGTERM), the non-finite guard. Returns the state and whether it was preempted."""
  total = config.epochs * steps_per_epoch
  for key in ('metrics_every_steps', 'log_every_steps', 'checkpoint_every_steps'):
    if config[key] < 1:
      raise errors.ConfigError(f'{key} must be at least 1, not {config[key]}')
  guard = loop.NonFiniteGuard(config.nonfinite, (), writer, what=tag)
  metrics = loop.StepMetrics(writer, config.metrics_every_steps, config.log_every_steps, total, prefix=f'{tag}/')
  actions = [metrics, _Progress(tag, config.log_every_steps, total, steps_per_epoch, config.epochs, metrics, start),
             epoch_test]
  try:
    state, preempted = loop.run(step_fn, state, batches, actions, start, total, guard=guard, preemption=preemption,
                                checkpoint=loop.Checkpoint(mngr, config.checkpoint_every_steps, total, guard,
                                                           at_stop=False))
  except jax.errors.JaxRuntimeError as e:  # XLA's out of memory: one line with the advice
    raise compilation.out_of_memory(e, config.batch_size // jax.device_count()) or e
  if preempted:
    message = (f'Stopped at step {int(state.step)} of {total} of the head of checkpoint {tag[len("ckpt"):]} '
               f'(preempted (SIGTERM)); its state saved in {mngr.directory}; the same command continues from there.')
    logging.info(message)
    print(message, flush=True)
  return state, preempted


class _Progress:
  """Every ``every`` steps and at the last: a progress line with the interval means of the loss and train top-1
  (from ``metrics``, which runs before), steps/s and the time left."""

  def __init__(self, tag: str, every: int, total: int, steps_per_epoch: int, epochs: int, metrics, start: int):
    self.tag, self.every, self.total, self.steps_per_epoch, self.epochs = tag, every, total, steps_per_epoch, epochs
    self.metrics, self.t0, self.last = metrics, time.time(), start

  def __call__(self, step: int, out):
    if not loop.due(step, self.every, self.total):
      return
    rate = (step - self.last) / max(time.time() - self.t0, 1e-9)
    m = self.metrics.last
    logging.info('%s: step %d/%d (epoch %d/%d)  loss %.4f  train_top1 %.3f  %.1f steps/s  ETA %.0f s', self.tag, step,
                 self.total, math.ceil(step / self.steps_per_epoch), self.epochs, m['loss'], m['train_top1'], rate,
                 (self.total - step) / max(rate, 1e-9))
    self.t0, self.last = time.time(), step


class EpochTest:
  """Every ``classifier.test_every_epochs`` epochs (0: never): the test top-1 and top-5 to the writer as
  ``TAG/test_top1`` and ``TAG/test_top5``; the best epoch kept in :attr:`best` (and, across a restart, in
  ``best_path``) for ``classifier.report='best'``."""

  def __init__(self, config, tag: str, writer, steps_per_epoch: int, test, best_path: str):
    self.tag, self.writer, self.test, self.steps_per_epoch = tag, writer, test, steps_per_epoch
    self.best_path, self.report = best_path, config.classifier.report
    if self.report not in ('best', 'last'):
      raise errors.ConfigError(f"classifier.report must be 'best' or 'last', not {self.report!r}")
    if self.report == 'best' and config.classifier.test_every_epochs != 1:
      raise errors.ConfigError("classifier.report='best' tests after every epoch: set classifier.test_every_epochs=1")
    self.every = config.classifier.test_every_epochs * steps_per_epoch
    self.best = self._load_best() if self.report == 'best' else None

  def _load_best(self) -> dict:
    found = distributed.share_from_process_0(
        lambda: json.loads(tf.io.gfile.GFile(self.best_path).read()) if tf.io.gfile.exists(self.best_path) else {})
    return found or {'top1': -1.0, 'top5': -1.0, 'epoch': 0}

  def __call__(self, step: int, out):
    if not self.every or step % self.every:
      return
    result = self.test(out.state)
    self.writer.write_scalars(step, {f'{self.tag}/test_top1': result['top1'], f'{self.tag}/test_top5': result['top5']})
    if self.report == 'best' and result['top1'] > self.best['top1']:
      self.best = dict(result, epoch=step // self.steps_per_epoch)
      runs.write_json(self.best_path, self.best)
