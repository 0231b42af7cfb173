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

from vicreg_jax import parallel
from vicreg_jax.data import pipeline, sources
from vicreg_jax.evaluate import probe
from vicreg_jax.models import resnet


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

def read_pretrain_config(pretrain_workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The pretraining run's ``config.json`` as a ConfigDict, or None if the run has not written it yet."""
  path = os.path.join(pretrain_workdir, 'config.json')
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def pretrain_checkpoints(pretrain_workdir: str) -> ocp.CheckpointManager:
  """A reader of the pretraining run's checkpoints (it never writes or deletes there)."""
  return ocp.CheckpointManager(os.path.join(pretrain_workdir, 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))


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
  variables = resnet.from_config(pre_config.model).init(jax.random.key(seed), x, train=False)
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


def make_train_step(head: nn.Module, backbone: Optional[nn.Module], tx, mesh, finetune: bool):
  """The jit-compiled global step ``(state, frozen, batch) -> (state, metrics)``, ``shard_map``'d over ``'data'``.

  ``backbone=None``: the batch holds features (cached extraction). Frozen backbone: ``frozen`` holds its
  variables and it runs in inference mode. Fine-tuning: its params are in ``state`` and BatchNorm uses the
  global batch statistics. Each replica's loss is the global mean cross-entropy, so the averaged gradients
  are those of one device on the whole batch.
  """
  axis = parallel.AXIS

  def per_device(state: ClassifierState, frozen, batch):
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
      return jax.lax.pmean(ce, axis), (batch_stats, logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = ClassifierState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
    top1 = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == batch['label']), axis)
    return state, {'loss': loss, 'train_top1': top1}

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


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
  return jax.jit(step, out_shardings=parallel.replicated(mesh))


def evaluate(eval_step, state, frozen, batches) -> dict:
  """Top-1 and top-5 accuracy (in [0, 1]) over ``batches`` of ``{'image', 'label', 'mask'}``."""
  hits1 = hits5 = count = 0.0
  for batch in batches:
    a, b, c = jax.device_get(eval_step(state, frozen, batch))
    hits1, hits5, count = hits1 + a, hits5 + b, count + c
  return {'top1': float(hits1 / max(count, 1)), 'top5': float(hits5 / max(count, 1))}


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

def train_labels(data: ml_collections.ConfigDict):
  """Labels of an in-memory training split (digits, image folder), to draw ``labels_per_class`` subsets."""
  if data.source == 'digits':
    return sources.digits(data.train_split).labels
  if data.source == 'folder':
    return sources.folder_split(data.data_dir, data.train_split, data.get('val_fraction', 0.0)).labels
  raise ValueError('data.labels_per_class needs an in-memory source (digits or folder); for TFDS name a '
                   "subset split instead (e.g. 'imagenet2012_subset/1pct').")


def train_classifier(config: ml_collections.ConfigDict, pre_config: ml_collections.ConfigDict,
                     pretrained: dict, ckpt_dir: str, writer, tag: str, finetune: bool) -> dict:
  """Trains the head (and the backbone when ``finetune``) on ``config.data.train_split`` for
  ``config.epochs``, resuming from ``ckpt_dir``; returns top-1/top-5 on ``config.data.test_split``."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  sharding = parallel.data_sharding(mesh)
  pi, pc = jax.process_index(), jax.process_count()
  indices = None
  if config.data.labels_per_class:
    indices = sources.per_class_subset(train_labels(config.data), config.data.labels_per_class, config.seed)
  n_train = len(indices) if indices is not None else sources.split_examples(config.data, config.data.train_split)
  steps_per_epoch = max(math.ceil(n_train / config.batch_size), 1)
  total_steps = config.epochs * steps_per_epoch
  cached = config.features.cache and not finetune
  eval_backbone = resnet.from_config(pre_config.model)
  ev = config.augment.eval

  def eval_batches():
    ds = pipeline.eval_dataset(config.data, config.data.test_split, config.batch_size, crop=ev.crop,
                               resize=ev.resize, mean=ev.mean, std=ev.std, process_index=pi, process_count=pc)
    return pipeline.global_batches(ds, sharding)

  frozen = pretrained
  if cached:  # features of un-augmented images, extracted once: each process its share, gathered to all
    ds = pipeline.eval_dataset(config.data, config.data.train_split, config.batch_size, crop=ev.crop,
                               resize=ev.resize, mean=ev.mean, std=ev.std, process_index=pi, process_count=pc)
    apply = jax.jit(functools.partial(eval_backbone.apply, train=False))
    h_tr, y_tr = probe.extract(apply, frozen, pipeline.global_batches(ds, sharding))
    h_te, y_te = probe.extract(apply, frozen, eval_batches())
    if config.features.standardize:  # BatchNorm without affine, statistics of the training features
      mu, sd = h_tr.mean(0), h_tr.std(0) + 1e-6
      h_tr, h_te = (h_tr - mu) / sd, (h_te - mu) / sd
    feat_dim = h_tr.shape[1]
    train_backbone = None
  else:
    if config.features.standardize:
      raise ValueError('features.standardize needs features.cache=True (statistics of fixed features).')
    feat_dim = jax.eval_shape(functools.partial(eval_backbone.apply, train=False), pretrained,
                              jax.ShapeDtypeStruct((1, ev.crop, ev.crop, pre_config.data.channels),
                                                   jnp.float32)).shape[-1]
    train_backbone = resnet.from_config(pre_config.model, parallel.AXIS if finetune else None)

  head = Head(sources.num_classes(config.data), config.head_init_std)
  params = {'head': head.init(jax.random.key(config.seed), jnp.zeros((1, feat_dim)))['params']}
  batch_stats = {}
  if finetune:
    params['backbone'], batch_stats = pretrained['params'], pretrained['batch_stats']
  tx = make_optimizer(config.optim, params, steps_per_epoch, config.epochs)
  state = ClassifierState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params))
  state = parallel.replicate(state, mesh)
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  if mngr.latest_step() is not None:
    state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info('%s: resumed head training at step %d.', tag, int(state.step))
  start = int(state.step)

  if cached:
    batches = feature_batches(h_tr, y_tr, config.batch_size, config.seed, start, sharding)
  else:
    ds = pipeline.labelled_dataset(config.data, dict(config.augment.train), config.batch_size, config.seed,
                                   start, pi, pc, indices)
    batches = pipeline.global_batches(ds, sharding)
  train_step = make_train_step(head, train_backbone, tx, mesh, finetune)
  t0, last = time.time(), start
  try:
    metrics = None
    for step in range(start + 1, total_steps + 1):
      previous = metrics
      state, metrics = train_step(state, frozen, next(batches))
      jax.block_until_ready(previous)  # at most two steps in flight (see train.py)
      if step % config.log_every_steps == 0 or step == total_steps:
        m = jax.device_get(metrics)
        rate = (step - last) / max(time.time() - t0, 1e-9)
        t0, last = time.time(), step
        writer.write_scalars(step, {f'{tag}/{k}': v for k, v in m.items()})
        logging.info('%s: step %d/%d (epoch %d/%d)  loss %.4f  train_top1 %.3f  %.1f steps/s  ETA %.0f s', tag,
                     step, total_steps, math.ceil(step / steps_per_epoch), config.epochs, m['loss'],
                     m['train_top1'], rate, (total_steps - step) / max(rate, 1e-9))
      if step % config.checkpoint_every_steps == 0:
        mngr.save(step, args=ocp.args.StandardSave(state))
  finally:
    mngr.wait_until_finished()

  eval_step = make_eval_step(head, None if cached else eval_backbone, mesh)
  if cached:
    result = evaluate(eval_step, state, frozen, padded_feature_batches(h_te, y_te, config.batch_size, sharding))
  else:
    result = evaluate(eval_step, state, frozen, eval_batches())
  result['epochs'] = config.epochs
  return result
