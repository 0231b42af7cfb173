"""Supervised training of a linear head on a pretrained backbone, shared by the linear-evaluation job (frozen
backbone, BatchNorm in inference mode) and semi-supervised fine-tuning (whole network, SyncBN in train mode).

The protocol is the official VICReg evaluate.py: head N(0, 0.01) weights and zero bias; SGD with momentum,
weight decay added to the gradient (as torch.optim.SGD), one learning rate for the head and one for the
backbone, each annealed by a cosine over epochs (stepped once per epoch, as CosineAnnealingLR).
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
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from jax.sharding import PartitionSpec as P

from vicreg_jax import collectives, errors, parallel, runs
from vicreg_jax.data import pipeline, sources
from vicreg_jax.evaluate import probe
from vicreg_jax.metrics import IntervalMean
from vicreg_jax.models import backbones


@flax.struct.dataclass
class ClassifierState:
  step: jax.Array
  params: Any        # {'head': ...} (+ 'backbone' when fine-tuning)
  batch_stats: Any   # the backbone's BatchNorm statistics when fine-tuning, else {}
  opt_state: Any


class Head(nn.Module):
  """The linear classifier: weights N(0, 0.01), bias 0 (official evaluate.py)."""
  num_classes: int
  init_std: float = 0.01

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.init_std),
                    bias_init=nn.initializers.zeros, name='fc')(h.astype(jnp.float32))


# --- the pretrained backbone --------------------------------------------------------------------------------

def backbone_target(mngr: ocp.CheckpointManager, step: int, mesh) -> tuple[str, dict]:
  """The path of pretraining checkpoint ``step`` and the shapes of its ``params`` and ``batch_stats``, replicated
  over ``mesh``, from the checkpoint's metadata: raises if the checkpoint is gone or unreadable. This process
  only (no collective), so that all processes can agree that they can read it before restoring together."""
  path = os.path.join(str(mngr.directory), str(step), 'default')
  meta = ocp.StandardCheckpointer().metadata(path).item_metadata
  sharding = parallel.replicated(mesh)
  return path, {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta[k])
                for k in ('params', 'batch_stats')}


def restore_backbone(path: str, target: dict) -> dict:
  """``{'params', 'batch_stats'}`` of the backbone in the checkpoint at ``path`` (see :func:`backbone_target`).

  Reads only those two subtrees (not the optimiser state), laid out for this job's devices, which may differ
  in number from the pretraining run's. Every process takes part (orbax synchronises them).
  """
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return {k: restored[k]['backbone'] for k in ('params', 'batch_stats')}


def init_backbone(pre_config: ml_collections.ConfigDict, seed: int, mesh) -> dict:
  """``{'params', 'batch_stats'}`` of a freshly initialised backbone of the pretraining run's architecture,
  replicated over ``mesh`` (the baseline a pretrained checkpoint is compared with)."""
  size = pre_config.data.image_size
  x = jnp.zeros((1, size, size, pre_config.data.channels), jnp.float32)
  variables = backbones.from_config(pre_config.model).init(jax.random.key(seed), x, train=False)
  return parallel.replicate({k: variables[k] for k in ('params', 'batch_stats')}, mesh)


# --- optimiser and steps ------------------------------------------------------------------------------------

def epoch_cosine(base_lr: float, steps_per_epoch: int, epochs: int) -> Callable:
  """``base_lr·(1 + cos(π·epoch/epochs))/2`` with epoch = step // steps_per_epoch (CosineAnnealingLR)."""
  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def make_optimizer(optim: ml_collections.ConfigDict, params: dict, steps_per_epoch: int, epochs: int):
  """SGD (momentum, weight decay on the gradient) with its own cosine learning rate per top-level group."""
  def sgd(lr):
    return optax.chain(optax.add_decayed_weights(optim.weight_decay),
                       optax.sgd(epoch_cosine(lr, steps_per_epoch, epochs), momentum=optim.momentum))
  lrs = {'head': optim.head_lr, 'backbone': optim.backbone_lr}
  return optax.multi_transform({k: sgd(lrs[k]) for k in params}, {k: k for k in params})


def make_train_step(head: nn.Module, backbone: Optional[nn.Module], tx, mesh, finetune: bool,
                    sync_bn: bool = True, reductions: str = 'native'):
  """The jit-compiled global step ``(state, frozen, batch) -> (state, metrics)``, ``shard_map``'d over ``'data'``.

  ``backbone=None``: the batch holds features (cached extraction). Frozen backbone: ``frozen`` holds its
  variables and it runs in inference mode. Fine-tuning: its params are in ``state`` and BatchNorm runs in train
  mode, with the global batch statistics when ``sync_bn`` (``backbone`` built with the ``'data'`` axis), else each
  device's own (the official evaluate.py: DDP without SyncBN), the running statistics then device 0's (DDP
  broadcasts rank 0's buffers). Each replica's loss is the global mean cross-entropy, so the averaged gradients
  are those of one device on the whole batch. ``reductions``: how sums over devices add them
  (:mod:`vicreg_jax.collectives`).
  """
  axis = parallel.AXIS
  collectives.check(reductions)

  def per_device(state: ClassifierState, frozen, batch):
    with collectives.mode(reductions):
      return train_one_step(state, frozen, batch)

  def train_one_step(state: ClassifierState, frozen, batch):
    def loss_fn(params):
      x, batch_stats = batch['image'], state.batch_stats
      if backbone is None:
        h = x
      elif finetune:
        h, upd = backbone.apply({'params': params['backbone'], 'batch_stats': batch_stats}, x, train=True,
                                mutable=['batch_stats'])
        batch_stats = upd['batch_stats']
      else:
        h = jax.lax.stop_gradient(backbone.apply(frozen, x, train=False))
      logits = head.apply({'params': params['head']}, h)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      return collectives.pmean(ce, axis), (batch_stats, logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if finetune and not sync_bn:
      batch_stats = jax.tree.map(lambda x: jax.lax.all_gather(x, axis)[0], batch_stats)
    grads = collectives.pmean(grads, axis)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = ClassifierState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
    top1 = collectives.pmean(jnp.mean(jnp.argmax(logits, -1) == batch['label']), axis)
    return state, {'loss': loss, 'train_top1': top1}

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=(P(), P()),
                          check_vma=False)
  return parallel.jit(sharded, donate_argnums=0)


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
  return parallel.jit(step, out_shardings=parallel.replicated(mesh))


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
  apply = parallel.jit(functools.partial(eval_backbone.apply, train=False))
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
                             std=tr.std, process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.global_batches(ds, parallel.data_sharding(mesh))


def _train_subset(config) -> tuple[Optional[np.ndarray], int]:
  """The indices of ``data.labels_per_class`` examples per class (None: the whole split) and the number of
  training examples."""
  data = config.data
  source = sources.get(data)
  if not data.labels_per_class:
    return None, source.num_examples(data, data.train_split)
  in_memory = source.in_memory(data, data.train_split)
  if in_memory is None:
    raise errors.ConfigError('data.labels_per_class needs an in-memory source (digits or folder); for TFDS name a '
                     "subset split instead (e.g. 'imagenet2012_subset/1pct').")
  indices = sources.per_class_subset(in_memory[1], data.labels_per_class, config.seed)
  return indices, len(indices)


def _initial_state(config, head, feat_dim: int, pretrained: dict, finetune: bool, tx_of, mngr, mesh, tag: str):
  """The replicated classifier state (head, and the backbone when fine-tuning), or its checkpoint's."""
  params = {'head': head.init(jax.random.key(config.seed), jnp.zeros((1, feat_dim)))['params']}
  batch_stats = {}
  if finetune:
    params['backbone'], batch_stats = pretrained['params'], pretrained['batch_stats']
  tx = tx_of(params)
  state = parallel.replicate(ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                                             batch_stats=batch_stats, opt_state=tx.init(params)), mesh)
  if mngr.latest_step() is not None:
    state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info('%s: resumed head training at step %d.', tag, int(state.step))
  return state, tx


def train_classifier(config: ml_collections.ConfigDict, pre_config: ml_collections.ConfigDict,
                     pretrained: dict, ckpt_dir: str, writer, tag: str, finetune: bool) -> dict:
  """Trains the head (and the backbone when ``finetune``) on ``config.data.train_split`` for
  ``config.epochs``, resuming from ``ckpt_dir``; returns top-1/top-5 on ``config.data.test_split``: of the last
  epoch, or with ``classifier.report='best'`` (official) of the epoch with the best top-1, tested after each.
  The test figures of every ``classifier.test_every_epochs``-th epoch go to the writer as ``TAG/test_top1`` and
  ``TAG/test_top5``, the means of the head's train loss and top-1 as ``TAG/loss`` and ``TAG/train_top1``."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  sharding = parallel.data_sharding(mesh)
  cl = config.classifier
  indices, n_train = _train_subset(config)
  steps_per_epoch = max(math.ceil(n_train / config.batch_size), 1)
  eval_backbone = backbones.from_config(pre_config.model)
  train_feats, test_feats, feat_dim = _features(config, pre_config, pretrained, eval_backbone, mesh, finetune)
  head = Head(sources.get(config.data).num_classes(config.data), cl.head_init_std)
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  state, tx = _initial_state(config, head, feat_dim, pretrained, finetune,
                             lambda p: make_optimizer(cl, p, steps_per_epoch, config.epochs), mngr, mesh, tag)
  start = int(state.step)
  if train_feats is not None:
    batches = feature_batches(*train_feats, config.batch_size, config.seed, start, sharding)
  else:
    ds = pipeline.labelled_dataset(config.data, dict(config.transforms.train), config.batch_size, config.seed,
                                   start, jax.process_index(), jax.process_count(), indices)
    batches = pipeline.global_batches(ds, sharding)
  sync_bn = not finetune or cl.batchnorm == 'sync'
  train_backbone = None if train_feats is not None else backbones.from_config(
      pre_config.model, parallel.AXIS if finetune and sync_bn else None)
  train_step = make_train_step(head, train_backbone, tx, mesh, finetune, sync_bn, config.reductions)
  eval_step = make_eval_step(head, None if train_feats is not None else eval_backbone, mesh)

  # Cached features: the test batches are placed on the devices once and reused by every test.
  cached_test = (list(padded_feature_batches(*test_feats, config.batch_size, sharding)) if test_feats is not None
                 else None)

  def test(state):
    batches = cached_test if cached_test is not None else _eval_batches(config, config.data.test_split, mesh)
    return evaluate(eval_step, state, pretrained, batches)

  if cl.report not in ('best', 'last'):
    raise errors.ConfigError(f"classifier.report must be 'best' or 'last', not {cl.report!r}")
  if cl.report == 'best' and cl.test_every_epochs != 1:
    raise errors.ConfigError("classifier.report='best' tests after every epoch: set classifier.test_every_epochs=1")
  loop = _TrainLoop(config, tag, writer, mngr, steps_per_epoch, test, ckpt_dir.rstrip('/') + '_best.json')
  state, best = loop.run(train_step, state, pretrained, batches, start)
  result = test(state)
  if cl.report == 'best':
    result = dict(best, last_top1=result['top1'], last_top5=result['top5'])
  result['epochs'] = config.epochs
  return result


class _TrainLoop:
  """The classifier's steps with their periodic actions: the mean train loss and top-1 over every
  ``metrics_every_steps`` steps to the writer (summed on the devices meanwhile) and a progress line every
  ``log_every_steps``; the test top-1 and top-5 every ``classifier.test_every_epochs`` epochs to the writer (0:
  none), the best epoch kept (across a restart, in ``best_path``) for ``classifier.report='best'``; a
  checkpoint every ``checkpoint_every_steps``. The writer's tags start with ``tag`` (one checkpoint's head)."""

  def __init__(self, config, tag: str, writer, mngr, steps_per_epoch: int, test, best_path: str):
    self.config, self.tag, self.writer, self.mngr, self.test = config, tag, writer, mngr, test
    self.steps_per_epoch, self.total = steps_per_epoch, config.epochs * steps_per_epoch
    self.best_path, self.report = best_path, config.classifier.report
    self.test_every = config.classifier.test_every_epochs * steps_per_epoch
    for key in ('metrics_every_steps', 'log_every_steps', 'checkpoint_every_steps'):
      if config[key] < 1:
        raise errors.ConfigError(f'{key} must be at least 1, not {config[key]}')

  def _load_best(self) -> dict:
    found = parallel.share_from_process_0(
        lambda: json.loads(tf.io.gfile.GFile(self.best_path).read()) if tf.io.gfile.exists(self.best_path) else {})
    return found or {'top1': -1.0, 'top5': -1.0, 'epoch': 0}

  def _write_means(self, step, means):
    self.writer.write_scalars(step, {f'{self.tag}/{k}': v for k, v in means.items()})

  def _log(self, step, means, rate):
    logging.info('%s: step %d/%d (epoch %d/%d)  loss %.4f  train_top1 %.3f  %.1f steps/s  ETA %.0f s', self.tag, step,
                 self.total, math.ceil(step / self.steps_per_epoch), self.config.epochs, means['loss'],
                 means['train_top1'], rate, (self.total - step) / max(rate, 1e-9))

  def _test(self, step, state, best):
    result = self.test(state)
    self.writer.write_scalars(step, {f'{self.tag}/test_top1': result['top1'], f'{self.tag}/test_top5': result['top5']})
    if self.report == 'best' and result['top1'] > best['top1']:
      best = dict(result, epoch=step // self.steps_per_epoch)
      runs.write_json(self.best_path, best)
    return best

  def run(self, train_step, state, frozen, batches, start: int):
    best = self._load_best() if self.report == 'best' else None
    mean, means, metrics = IntervalMean(), {}, None
    t0, last = time.time(), start
    try:
      for step in range(start + 1, self.total + 1):
        previous = metrics
        state, metrics = train_step(state, frozen, next(batches))
        jax.block_until_ready(previous)  # at most two steps in flight (see train.py)
        mean.add(metrics)
        log = step % self.config.log_every_steps == 0 or step == self.total
        if log or step % self.config.metrics_every_steps == 0:
          means = mean.take()
          self._write_means(step, means)
        if log:
          self._log(step, means, (step - last) / max(time.time() - t0, 1e-9))
          t0, last = time.time(), step
        if self.test_every and step % self.test_every == 0:
          best = self._test(step, state, best)
        if step % self.config.checkpoint_every_steps == 0:
          self.mngr.save(step, args=ocp.args.StandardSave(state))
    finally:
      self.mngr.wait_until_finished()
    return state, best
