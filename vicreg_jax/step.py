"""The pretraining step, written once for every method: the train state, the model a config names, and the
sharded jit step (``shard_map`` over ``'data'``). No TensorFlow here, so benchmarks run it on accelerator hosts
that have none."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from vicreg_jax import collapse, collectives, compilation, errors, losses, methods, parallel
from vicreg_jax.data import device_augment
from vicreg_jax.metrics import all_finite, keep_if_finite
from vicreg_jax.models import backbones, heads, norm, resnet

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  probe_params: Any = None     # the online linear probe ({} when disabled)
  probe_opt_state: Any = None
  extra: Any = None            # the method's state: 'target' (BYOL's EMA network, MoCo's momentum encoder:
                               # params, batch_stats), SwAV's 'queue' and 'queue_count', MoCo v2's 'queue' and
                               # 'queue_ptr'; {} for methods without


def make_probe(config, num_classes: int):
  """The online probe's head and optimiser (SGD with momentum, constant lr), or (None, None) when disabled."""
  if not config.online_probe.enabled:
    return None, None
  return heads.Head(num_classes), optax.sgd(config.online_probe.lr, momentum=config.online_probe.momentum)


def build_model(config: ml_collections.ConfigDict, axis_name: Optional[str] = parallel.AXIS) -> nn.Module:
  """Backbone + projector from ``config.model``, with the method's heads (predictor, prototypes); BatchNorm
  statistics synchronised over ``axis_name``, or none (per call) with ``model.ghost_batch_size`` > 0: the step
  then applies the model group by group (:func:`vicreg_jax.models.norm.ghost_apply`)."""
  dtype = backbones.DTYPES[config.model.dtype]
  if config.model.ghost_batch_size:
    axis_name = None
  return heads.SSLModel(backbones.from_config(config.model, axis_name), methods.projector(config, axis_name, dtype),
                        **methods.get(config).heads(config, axis_name, dtype))


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  size = config.data.image_size
  return (1, size, size, config.data.channels)


def init_state(config, model, tx, rng, online_probe=(None, None)) -> TrainState:
  """The initial state: the model from ``rng``, its optimiser state, the online probe's, and the method's state
  (BYOL's target network initialised from its own key, as the official code does; MoCo's momentum encoder a
  copy of the online backbone and projector, as the official ``param_m.data.copy_(param_b.data)``)."""
  x = jnp.zeros(input_shape(config), jnp.float32)
  (h, _, _), variables = model.init_with_output(rng, x, train=False, heads=True)
  params = variables['params']
  head, probe_tx = online_probe
  probe_params, probe_opt_state = {}, {}
  if head is not None:
    probe_params = head.init(jax.random.fold_in(rng, 1), h)['params']
    probe_opt_state = probe_tx.init(probe_params)
  method = methods.get(config)
  extra = dict(method.init_extra(config))
  if method.momentum_encoder:
    extra['target'] = jax.tree.map(jnp.copy, {'params': _encoder(params),
                                              'batch_stats': _encoder(variables.get('batch_stats', {}))})
  elif method.ema_target:
    target = model.init(jax.random.fold_in(rng, 2), x, train=False, heads=True)
    extra['target'] = {'params': target['params'], 'batch_stats': target.get('batch_stats', {})}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), probe_params=probe_params, probe_opt_state=probe_opt_state,
                    extra=extra)


def _encoder(tree: dict) -> dict:
  """The backbone's and projector's entries of a variables tree (a momentum encoder has no predictor)."""
  return {k: v for k, v in tree.items() if k in ('backbone', 'projector')}


def _colour_ops(config):
  """``(batch, step) -> batch`` applying the colour part of the view recipes on the device (``augment.on_device``),
  with keys per example from (seed, step, crop, the example's row ``device·local_b + i`` in the global batch):
  crop 0 and 1 the two views, crop 2 + j the small crop j of ``batch['small']`` (``augment.small_view``'s
  recipe). The same keys for any number of devices."""
  recipes = (dict(config.augment.view1), dict(config.augment.view2))
  small_recipe = dict(config.augment.small_view)

  def apply(batch, step):
    local_b = batch['view1'].shape[0]
    rows = jax.lax.axis_index(parallel.AXIS) * local_b + jnp.arange(local_b)
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x636f6c), step)

    def colour(images, crop: int, recipe):
      view_key = jax.random.fold_in(step_key, crop)
      keys = jax.vmap(lambda i, k=view_key: jax.random.fold_in(k, i))(rows)
      return device_augment.apply_colour_ops_per_example(images, keys, recipe)

    out = dict(batch)
    for v, (name, recipe) in enumerate(zip(('view1', 'view2'), recipes)):
      out[name] = colour(batch[name], v, recipe)
    if 'small' in batch:
      out['small'] = jnp.stack([colour(batch['small'][:, j], 2 + j, small_recipe)
                                for j in range(batch['small'].shape[1])], axis=1)
    return out

  return apply


# The crops of a batch: the two views [n, H, W, C] and, with multi-crop, the small crops [n, crops, h, w, C].
CROP_KEYS = ('view1', 'view2', 'small')


def batch_crops(batch) -> list:
  """The crops of ``batch`` in order: view 1, view 2, then each small crop of ``batch['small']`` (if any)."""
  crops = [batch['view1'], batch['view2']]
  if 'small' in batch:
    crops += [batch['small'][:, j] for j in range(batch['small'].shape[1])]
  return crops


def resolution_groups(crops) -> tuple:
  """``crops`` (each [n, H, W, C]) as groups of consecutive crops of the same shape, each group's crops
  concatenated along the batch (crop by crop): the official SwAV's ``torch.unique_consecutive`` of the crop
  sizes and ``torch.cat`` of each group (facebookresearch/swav@06b1b7c:src/resnet50.py:L311-L317)."""
  groups = [[crops[0]]]
  for crop in crops[1:]:
    if crop.shape == groups[-1][-1].shape:
      groups[-1].append(crop)
    else:
      groups.append([crop])
  return tuple(jnp.concatenate(g, axis=0) for g in groups)


def _per_crop(tree, crops: int, n: int) -> tuple:
  """``tree``'s arrays (rows crop by crop, ``crops`` blocks of ``n``) as one tree per crop."""
  return tuple(jax.tree.map(lambda x, i=i: x[i * n:(i + 1) * n], tree) for i in range(crops))


def _probe_update(head, probe_tx, params, opt_state, h, labels):
  """One SGD step of the online probe on stop-gradient representations ``h``; (params, opt_state, top-1)."""
  def probe_loss(p):
    logits = head.apply({'params': p}, jax.lax.stop_gradient(h))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce, jnp.mean(jnp.argmax(logits, -1) == labels)
  (_, top1), g = jax.value_and_grad(probe_loss, has_aux=True)(params)
  upd, opt_state = probe_tx.update(collectives.pmean(g, parallel.AXIS), opt_state, params)
  return optax.apply_updates(params, upd), opt_state, collectives.pmean(top1, parallel.AXIS)


def _in_groups(apply: Callable, ghost: int) -> Callable:
  """``apply(params, batch_stats, x) -> (outputs, batch_stats)`` of a model in train mode, with ``ghost`` > 0
  under ghost BatchNorm (groups of ``ghost`` rows by global position: :func:`norm.ghost_apply`; the statistics
  kept are the first group's), else as it is (the model's own BatchNorm, synchronised over the devices)."""
  if not ghost:
    return apply
  return lambda params, batch_stats, x: norm.ghost_apply(lambda rows: apply(params, batch_stats, rows), x, ghost,
                                                         parallel.AXIS)


def _shuffled(apply: Callable, x, key):
  """``apply(rows) -> (outputs, batch_stats)`` on the rows of this device after a permutation of the global batch,
  its outputs put back in the original order: MoCo's shuffling BatchNorm (facebookresearch/moco@132aea9:
  moco/builder.py:L91-L136, L155-L162). The permutation is ``random.permutation(key, B)`` of the global batch
  (the same for any device count: ``key`` depends on the seed and the step); device d runs the permuted batch's
  rows ``d·n … d·n + n - 1`` (gathered from every device, as the official ``concat_all_gather``), and each
  device takes back its own rows of the outputs."""
  n, me = x.shape[0], jax.lax.axis_index(parallel.AXIS)
  rows = jax.lax.all_gather(x, parallel.AXIS, tiled=True)
  perm = jax.random.permutation(key, rows.shape[0])
  out, stats = apply(rows[jax.lax.dynamic_slice_in_dim(perm, me * n, n)])
  unshuffle = jax.lax.dynamic_slice_in_dim(jnp.argsort(perm), me * n, n)
  return jax.tree.map(lambda o: jax.lax.all_gather(o, parallel.AXIS, tiled=True)[unshuffle], out), stats


def _target_embeddings(model, target, batch, together: bool = False, names=('view1', 'view2'), ghost: int = 0,
                       shuffle_key=None):
  """The EMA target network's embeddings of the views ``names`` (training-mode BatchNorm with its own statistics,
  as the official BYOL and MoCo; with ``together`` over both views at once, as the online network; with ``ghost``
  by groups of rows) and its updated statistics; no gradient. With ``shuffle_key`` each view's rows are shuffled
  across the devices first (:func:`_shuffled`)."""
  stats = target['batch_stats']
  if together:
    (_, z), upd = model.apply({'params': target['params'], 'batch_stats': stats},
                              resolution_groups([batch['view1'], batch['view2']]), train=True,
                              mutable=['batch_stats'])
    return _per_crop(jax.lax.stop_gradient(z), 2, batch['view1'].shape[0]), upd.get('batch_stats', {})

  def embed(params, batch_stats, x):
    (_, z), upd = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
    return z, upd.get('batch_stats', {})

  embed = _in_groups(embed, ghost)
  out = []
  for i, name in enumerate(names):
    if shuffle_key is None:
      z, stats = embed(target['params'], stats, batch[name])
    else:
      z, stats = _shuffled(functools.partial(embed, target['params'], stats), batch[name],
                           jax.random.fold_in(shuffle_key, i))
    out.append(jax.lax.stop_gradient(z))
  return tuple(out), stats


def _online_views(model, params, batch_stats, batch, remat: bool = False, together: bool = False,
                  names=('view1', 'view2'), ghost: int = 0):
  """The online network on every crop: ``((h1, h2, …), (z1, z2, …), (heads1, heads2, …), batch_stats)``, one
  entry per crop of :func:`batch_crops`. Without ``together`` one pass per view of ``names`` (BatchNorm
  statistics per view, with ``ghost`` per group of rows; no small crops); with it one pass over every crop
  (:func:`resolution_groups`: the backbone once per resolution, the projector and heads once over all crops).
  With ``remat`` the backward pass keeps only the backbone's block outputs (:data:`resnet.REMAT_NAME`) and
  recomputes the rest, one block at a time."""
  def apply(params, batch_stats, x):
    (h, z, extra), upd = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True, heads=True,
                                     mutable=['batch_stats'])
    return (h, z, extra), upd.get('batch_stats', {})

  apply = _in_groups(apply, ghost)
  if remat:
    apply = jax.checkpoint(apply, policy=jax.checkpoint_policies.save_only_these_names(resnet.REMAT_NAME))
  if together:
    crops = batch_crops(batch)
    (h, z, extra), batch_stats = apply(params, batch_stats, resolution_groups(crops))
    k, n = len(crops), batch['view1'].shape[0]
    return _per_crop(h, k, n), _per_crop(z, k, n), _per_crop(extra, k, n), batch_stats
  hs, zs, extras = [], [], []
  for name in names:
    (h, z, extra), batch_stats = apply(params, batch_stats, batch[name])
    hs.append(h), zs.append(z), extras.append(extra)
  return tuple(hs), tuple(zs), tuple(extras), batch_stats


def _views(z, out, params, *, target, key, extra) -> methods.Views:
  """What the method's objective sees: embeddings and the heads' outputs of every crop, the EMA target's."""
  return methods.Views(z=z, p=tuple(o['p'] for o in out) if 'p' in out[0] else None,
                       scores=tuple(o['scores'] for o in out) if 'scores' in out[0] else None,
                       target=target, key=key, extra=extra, params=jax.lax.stop_gradient(params))


def _gradients(objective, model, params, batch_stats, batch, make_views, remat: bool, together: bool = False,
               names=('view1', 'view2'), ghost: int = 0):
  """``(grads, (metrics, batch_stats, h1, views))`` of ``objective(views) -> (loss, metrics)`` on the whole local
  batch in one pass (the online network on the views ``names``); ``h1``: view 1's representations."""
  def loss_fn(params):
    h, z, out, new_stats = _online_views(model, params, batch_stats, batch, remat, together, names, ghost)
    h1 = h[0]
    views = make_views(z, out, params)
    loss, metrics = objective(views)
    return loss, (metrics, new_stats, h1, views)

  return jax.grad(loss_fn, has_aux=True)(params)


def _micro_slice(tree, i, micro: int):
  """Rows ``i, i + micro, i + 2·micro, …`` of every array of ``tree`` (micro-batch ``i``)."""
  def rows(x):
    return jax.lax.dynamic_index_in_dim(x.reshape((x.shape[0] // micro, micro) + x.shape[1:]), i, axis=1,
                                        keepdims=False)
  return jax.tree.map(rows, tree)


def _micro_outputs(model, views, remat: bool, micro: int, together: bool, params, stats, i):
  """``((z, heads' outputs), (h1, batch_stats))`` of the online network on micro-batch ``i`` of ``views`` (every
  crop; ``h1`` view 1's representations): the first pair differentiable."""
  h, z, out, stats = _online_views(model, params, stats, _micro_slice(views, i, micro), remat, together)
  return (z, out), (h[0], stats)


def _accumulated_gradients(objective, model, params, batch_stats, batch, make_views, remat: bool, micro: int,
                           together: bool = False):
  """The same as :func:`_gradients` with the backbone run on ``micro`` micro-batches at a time (memory: the
  activations of one micro-batch), the loss still on the whole global batch. Micro-batch k holds the rows
  ``k, k + micro, k + 2·micro, …`` of every device's shard, i.e. the global rows ≡ k (mod ``micro``): the same
  examples whatever the number of devices, so a run resumes on another device count with the same steps.

  Two passes over the micro-batches (the gradient-cache scheme): the first runs the network without keeping
  activations and collects the embeddings and heads' outputs of the whole batch; the loss and its gradient with
  respect to those outputs are computed on the whole global batch (the variance and covariance statistics are
  those of the full batch, exactly); the second pass recomputes each micro-batch and back-propagates its share
  of that gradient into the parameters, summed. What differs from one pass over the batch: BatchNorm normalises
  each micro-batch by its own statistics (over every device's share of that micro-batch: global batch / micro
  examples), and its running averages take ``micro`` updates per step. Costs one extra forward pass. Multi-crop:
  a micro-batch holds the same rows of every crop (``batch['small']`` is sliced along its examples too), and
  SwAV's Sinkhorn codes are still computed on the whole global batch."""
  n = batch['view1'].shape[0]
  if n % micro:
    raise errors.ConfigError(f'grad_accum_steps {micro} must divide the per-device batch {n}')
  views_only = {k: batch[k] for k in CROP_KEYS if k in batch}
  outputs = functools.partial(_micro_outputs, model, views_only, remat, micro, together)

  def first_pass(stats, i):
    outs, (h1, stats) = outputs(params, stats, i)
    return stats, (outs, h1)

  new_stats, (outs, h1) = jax.lax.scan(first_pass, batch_stats, jnp.arange(micro))
  joined = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((n,) + x.shape[2:]), (outs, h1))  # row order
  outs, h1 = joined

  def loss_of(outs):
    views = make_views(outs[0], outs[1], params)
    loss, metrics = objective(views)
    return loss, (metrics, views)

  d_outs, (metrics, views) = jax.grad(loss_of, has_aux=True)(outs)

  def second_pass(grads, i):
    _, pullback = jax.vjp(lambda p: outputs(p, batch_stats, i)[0], params)
    (g,) = pullback(_micro_slice(d_outs, i, micro))
    return jax.tree.map(jnp.add, grads, g), None

  grads, _ = jax.lax.scan(second_pass, jax.tree.map(jnp.zeros_like, params), jnp.arange(micro))
  return grads, (metrics, new_stats, h1, views)


def _ema_update(target, params, batch_stats, tau_base: float, step, total_steps: int, cosine: bool = True):
  """The EMA target after a decay at step ``step``, and the decay τ (:func:`methods.ema_decay`, rising by cosine
  or constant): parameters ``τ·target + (1 - τ)·online`` (BYOL: the updated online ones, after the step; MoCo:
  this step's, before its update, and only the target's entries), BatchNorm statistics ``batch_stats``."""
  tau = methods.ema_decay(tau_base, step, total_steps, cosine)
  params = {k: params[k] for k in target['params']}
  return {'params': jax.tree.map(lambda t, o: t + (1 - tau) * (o - t), target['params'], params),
          'batch_stats': batch_stats}, tau


def _poisoned(loss, metrics, step, nan_at_step: int):
  """Tests (``debug_nan_at_step``): the loss, and with it every gradient, NaN at that step."""
  if not nan_at_step:
    return loss, metrics
  loss = loss * jnp.where(step == nan_at_step, jnp.nan, 1.0)
  return loss, dict(metrics, loss=loss)


# --- the optimiser update, replicated or sharded (``optim.shard_state``, ZeRO-1) ------------------------------

def shard_dim(shape: tuple, devices: int) -> Optional[int]:
  """The dimension along which the sharded optimiser splits an array of ``shape`` over ``devices``: the largest
  that ``devices`` divides (the first of equals: the major one, whose blocks keep the minor dimensions' layout),
  or None when none does or there is one device (the array stays whole on every device)."""
  best = None
  for d, size in enumerate(shape):
    if size and size % devices == 0 and (best is None or size > shape[best]):
      best = d
  return best if devices > 1 else None


def _leaf_spec(x, devices: int) -> P:
  """``P()``, or ``'data'`` at :func:`shard_dim`'s dimension of ``x``."""
  d = shard_dim(x.shape, devices)
  return P() if d is None else P(*([None] * d), parallel.AXIS)


def state_specs(config, state, devices: int):
  """The :class:`TrainState` of PartitionSpecs the train step takes and returns ``state`` (arrays or
  ShapeDtypeStructs) in on ``devices`` devices: replicated, but with ``optim.shard_state`` every array of the
  optimiser state split along :func:`shard_dim` (its parameter's shape: the state's arrays have their parameter's
  shape, so a checkpoint does not depend on the device count or the key)."""
  specs = jax.tree.map(lambda _: P(), state)
  if config.optim.shard_state:
    specs = specs.replace(opt_state=jax.tree.map(lambda x: _leaf_spec(x, devices), state.opt_state))
  return specs


def state_shardings(config, mesh, abstract_state):
  """The NamedSharding of every leaf of the trainer's :class:`TrainState` (:func:`state_specs` on ``mesh``):
  the layout of the initial state, of a restored one and of the train step's."""
  return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec),
                      state_specs(config, abstract_state, mesh.devices.size),
                      is_leaf=lambda x: isinstance(x, P))


def _apply_gradients(tx, grads, opt_state, params, loss, axis: str, shard: bool, kept=None):
  """``(params, opt_state, finite)`` after one optimiser step on this device's gradients ``grads``: averaged
  over the devices (:func:`collectives.pmean`) and applied to the whole state, or with ``shard`` (ZeRO-1)
  reduce-scattered (:func:`collectives.pmean_scatter`) along :func:`shard_dim`, this device's block of the
  optimiser state and of the parameters updated (norms of whole parameters: :func:`collectives.sharded_leaves`),
  and the parameters all-gathered; arrays :func:`shard_dim` cannot split are averaged and updated whole on every
  device. ``finite``: the loss and every averaged gradient entry finite (on every device); when it is False the
  optimiser state comes back unchanged and the parameters are ``kept`` (None: ``params``; chosen on the blocks,
  before the all-gather, so the choice reads and writes 1/devices of them)."""
  kept = params if kept is None else kept
  if not shard:
    grads = collectives.pmean(grads, axis)
    finite = all_finite(loss, grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    return (_if_finite(finite, optax.apply_updates(params, updates), kept),
            _if_finite(finite, new_opt_state, opt_state), finite)
  n, index = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  dims = [shard_dim(p.shape, n) for _, p in leaves]

  def block(x, d):
    return x if d is None else jax.lax.dynamic_slice_in_dim(x, index * (x.shape[d] // n), x.shape[d] // n, axis=d)

  local_grads = treedef.unflatten([collectives.pmean(g, axis) if d is None else collectives.pmean_scatter(g, axis, d)
                                   for g, d in zip(treedef.flatten_up_to(grads), dims)])
  local_params = treedef.unflatten([block(p, d) for (_, p), d in zip(leaves, dims)])
  finite = jax.lax.pmin(all_finite(loss, local_grads).astype(jnp.int32), axis) > 0
  with collectives.sharded_leaves(axis, {path: d is not None for (path, _), d in zip(leaves, dims)}):
    updates, new_opt_state = tx.update(local_grads, opt_state, local_params)
  kept = treedef.unflatten([block(p, d) for p, d in zip(treedef.flatten_up_to(kept), dims)])
  new = treedef.flatten_up_to(_if_finite(finite, optax.apply_updates(local_params, updates), kept))
  params = treedef.unflatten([x if d is None else jax.lax.all_gather(x, axis, axis=d, tiled=True)
                              for x, d in zip(new, dims)])
  return params, _if_finite(finite, new_opt_state, opt_state), finite


def _if_finite(finite, new, old):
  """``new`` where the step is finite, else ``old`` (leaf by leaf)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def _over_devices(per_device, config, mesh):
  """``(state, batch) -> per_device(state, batch)`` under ``shard_map``: the state laid out by
  :func:`state_specs`, the batch split over ``'data'``; returns the state, replicated metrics and the sharded
  rows of view 1's representations and embeddings."""
  def sharded(state: TrainState, batch):
    specs = state_specs(config, state, mesh.devices.size)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(specs, P(parallel.AXIS)),
                         out_specs=(specs, P(), P(parallel.AXIS)), check_vma=False)(state, batch)

  return sharded


def _view_plan(config, method, section: dict, devices: int) -> tuple:
  """``(online views, target views, ghost, shuffle)`` of the step, its view keys checked: the views each network
  runs on (MoCo v2: the queries of view 1, the keys of view 2; else both), ``model.ghost_batch_size`` (checked
  against the batch on ``devices``) and whether the target's views are shuffled across the devices (MoCo v2
  under ghost BatchNorm; SyncBN sees the whole batch, so there is nothing to shuffle)."""
  if config.augment.small_crops and not config.model.views_together:  # config.validate says so first
    raise errors.ConfigError('augment.small_crops > 0 needs model.views_together=True')
  ghost = config.model.ghost_batch_size
  if ghost:
    norm.check_ghost(config.batch_size, devices, ghost, 'model.ghost_batch_size')
    if config.model.views_together or config.grad_accum_steps > 1:
      raise errors.ConfigError('model.ghost_batch_size > 0 (BatchNorm per group of rows) runs one view at a time '
                               'on the whole batch: it needs model.views_together=False and grad_accum_steps=1')
  online = ('view1',) if method.one_way else ('view1', 'view2')
  target = ('view2',) if method.one_way else ('view1', 'view2')
  return online, target, ghost, bool(section.get('shuffle_keys')) and ghost > 0


def make_train_step(config, model, tx, schedule, mesh, online_probe=(None, None), total_steps: Optional[int] = None):
  """The jit-compiled global step ``(state, batch) -> (state, metrics, (h1, z1))``: ``shard_map`` over
  ``'data'``, each device one shard of the batch.

  Each device runs the model (and heads) on its shard of every crop (SyncBN): the two views, and with multi-crop
  (``augment.small_crops``) the small crops of ``batch['small']`` [n, crops, h, w, C]; one pass per view, or
  with ``model.views_together`` the backbone once per resolution group and the heads once over all crops
  (:func:`_online_views`). The EMA target runs where the method has one; the objective (``config.method``)
  gathers what it needs from all devices; gradients are averaged and applied (:func:`_apply_gradients`); the
  state stays replicated but for the optimiser state's blocks with ``optim.shard_state`` (:func:`state_specs`).
  Then the method's state moves on (EMA target, SwAV's queue of the two views) and the online probe (if any)
  trains on view 1's stop-gradient representations. A non-finite loss or gradient moves only the step counter
  (``metrics['finite']``). View 1's representations and embeddings come back sharded, for the collapse
  diagnostics (and ``embedding_std`` is view 1's): the small crops enter only the loss. With
  ``config.augment.on_device`` the crops are the host's geometric part only (uint8) and each device applies
  the colour part first (:func:`_colour_ops`; the same for any device count).
  ``config.reductions`` says how sums over devices add them (:mod:`vicreg_jax.collectives`); with 'ordered' the
  parameters are the same, bit for bit, on any split of the devices into processes.
  """
  axis = parallel.AXIS
  method, kwargs, section = methods.get(config), methods.loss_kwargs(config), methods.section(config)
  if method.ema_target and method.ema_cosine and total_steps is None:
    raise ValueError(f'{config.method}: the EMA decay\'s cosine needs the run\'s length (total_steps)')
  head, probe_tx = online_probe
  colour_ops = _colour_ops(config) if config.augment.on_device else None
  reductions, nan_at_step = collectives.check(config.reductions), config.debug_nan_at_step
  remat, micro, together = config.model.remat, config.grad_accum_steps, config.model.views_together
  online_names, target_names, ghost, shuffle = _view_plan(config, method, section, mesh.devices.size)
  if micro > 1 and method.ema_target:
    raise errors.ConfigError(f'grad_accum_steps > 1 is not supported with {config.method} (its EMA target network '
                             'runs on the whole batch); use model.remat to save memory instead')

  def per_device(state: TrainState, batch):
    with collectives.mode(reductions):
      return train_one_step(state, batch)

  def train_one_step(state: TrainState, batch):
    if colour_ops is not None:
      batch = colour_ops(batch, state.step)
    params = method.prepare_params(state.params)
    extra = {k: v for k, v in state.extra.items() if k != 'target'}
    target, target_stats, ema = None, None, state.extra.get('target')
    if method.momentum_encoder:  # MoCo: the momentum update first, from this step's online weights
      ema, ema_decay = _ema_update(ema, params, ema['batch_stats'], section[method.ema_key], state.step,
                                   total_steps, method.ema_cosine)
    if method.ema_target:
      shuffle_key = (jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x736875), state.step)
                     if shuffle else None)
      target, target_stats = _target_embeddings(model, ema, batch, together, target_names, ghost, shuffle_key)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x6d6574), state.step)

    def objective(views):
      return _poisoned(*method.objective(views, axis_name=axis, **kwargs), state.step + 1, nan_at_step)

    make_views = functools.partial(_views, target=target, key=key, extra=extra)
    if micro > 1:
      grads, (metrics, batch_stats, h1, views) = _accumulated_gradients(
          objective, model, params, state.batch_stats, batch, make_views, remat, micro, together)
    else:
      grads, (metrics, batch_stats, h1, views) = _gradients(objective, model, params, state.batch_stats, batch,
                                                            make_views, remat, together, online_names, ghost)
    params, opt_state, finite = _apply_gradients(tx, grads, state.opt_state, params, metrics['loss'], axis,
                                                 config.optim.shard_state, kept=state.params)
    metrics = dict(metrics, embedding_std=losses.embedding_std(views.z[0], axis), learning_rate=schedule(state.step))
    extra = dict(method.update_extra(extra, views, state.step, axis_name=axis, **section))
    if method.momentum_encoder:
      extra['target'], metrics['ema_decay'] = dict(ema, batch_stats=target_stats), ema_decay
    elif method.ema_target:
      extra['target'], metrics['ema_decay'] = _ema_update(ema, params, target_stats, section[method.ema_key],
                                                          state.step, total_steps, method.ema_cosine)
    probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
    if head is not None:
      probe_params, probe_opt_state, metrics['online_probe_top1'] = _probe_update(
          head, probe_tx, probe_params, probe_opt_state, h1, batch['label'])
    new_state = keep_if_finite(finite, TrainState(step=state.step + 1, params=state.params, batch_stats=batch_stats,
                                              opt_state=state.opt_state, probe_params=probe_params,
                                              probe_opt_state=probe_opt_state, extra=extra), state)
    new_state = new_state.replace(params=params, opt_state=opt_state)  # _apply_gradients kept them if not finite
    return new_state, dict(metrics, finite=finite), (h1, views.z[0])

  return compilation.jit(_over_devices(per_device, config, mesh), donate_argnums=0)


def collapse_metrics(h, z) -> tuple[dict, tuple]:
  """Collapse diagnostics of a batch's representations (``repr/…``) and embeddings (``emb/…``), and the two
  singular-value spectra they were computed from."""
  spectra = (collapse.spectrum(h), collapse.spectrum(z))
  scalars = {f'{name}/{k}': v for name, x, s in (('repr', h, spectra[0]), ('emb', z, spectra[1]))
             for k, v in collapse.collapse_stats(x, s=s).items()}
  return scalars, spectra


def make_diagnostics(mesh, max_rows: int):
  """The jit-compiled ``(h, z) -> (scalars, spectra)`` of :func:`collapse_metrics` for view 1's sharded
  representations and embeddings: on a subsample of at most ``max_rows`` rows (the first rows of every device's
  shard, so every device's examples are in it), computed by the first device alone (the others skip the SVD and
  the D×D correlations) and then shared with every device, so that every process can read them."""
  axis, n_dev = parallel.AXIS, mesh.devices.size

  def per_device(h, z):
    rows = max(1, min(h.shape[0], max_rows // n_dev))
    h, z = (jax.lax.all_gather(x[:rows], axis, axis=0, tiled=True) for x in (h, z))
    shapes = jax.eval_shape(collapse_metrics, h, z)
    first = jax.lax.axis_index(axis) == 0
    out = jax.lax.cond(first, collapse_metrics, lambda h, z: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                                            shapes), h, z)
    return jax.lax.psum(out, axis)

  return compilation.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(axis), P(axis)), out_specs=P(),
                                       check_vma=False))
