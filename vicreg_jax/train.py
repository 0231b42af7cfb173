"""VICReg pretraining: state, the sharded jit step, the loop with metrics and checkpoints, the final probe."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import PartitionSpec as P

from vicreg_jax import losses, optim, parallel
from vicreg_jax.data import device_augment, pipeline, sources
from vicreg_jax.evaluate import classifier, diagnostics, knn, probe
from vicreg_jax.models import heads, resnet



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  probe_params: Any = None     # the online linear probe ({} when disabled)
  probe_opt_state: Any = None


def build_model(config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS) -> nn.Module:
  """Backbone + projector from ``config.model``; BatchNorm statistics synchronised over ``axis_name``."""
  projector = heads.Projector(config.model.projector, axis_name=axis_name,
                              dtype=resnet.DTYPES[config.model.dtype])
  return heads.SSLModel(resnet.from_config(config.model, axis_name), projector)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  size = config.data.image_size
  return (1, size, size, config.data.channels)


def train_examples(config: ml_collections.ConfigDict) -> int:
  return sources.split_examples(config.data, config.data.train_split)


def steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
  return max(num_examples // config.batch_size, 1)


def schedule_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """(total steps, warmup steps) from epochs over ``num_examples``, unless ``config.num_steps`` is set."""
  per_epoch = steps_per_epoch(config, num_examples)
  total = config.num_steps or int(config.epochs * per_epoch)
  warmup = int(config.optim.warmup_epochs * per_epoch)
  return total, min(warmup, total)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int):
  o = config.optim
  schedule = optim.lr_schedule(o.base_lr, config.batch_size, total_steps, warmup_steps, o.end_lr_factor)
  return optim.lars(schedule, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.eta), schedule


def make_probe(config, num_classes: int):
  """The online probe's head and optimiser (SGD with momentum, constant lr), or (None, None) when disabled."""
  if not config.online_probe.enabled:
    return None, None
  return (classifier.Head(num_classes),
          optax.sgd(config.online_probe.lr, momentum=config.online_probe.momentum))


def init_state(config, model, tx, rng, online_probe=(None, None)) -> TrainState:
  (h, _), variables = model.init_with_output(rng, jnp.zeros(input_shape(config), jnp.float32), train=False)
  params = variables['params']
  head, probe_tx = online_probe
  probe_params, probe_opt_state = {}, {}
  if head is not None:
    probe_params = head.init(jax.random.fold_in(rng, 1), h)['params']
    probe_opt_state = probe_tx.init(probe_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables['batch_stats'],
                    opt_state=tx.init(params), probe_params=probe_params, probe_opt_state=probe_opt_state)


def make_train_step(config, model, tx, schedule, mesh, online_probe=(None, None)):
  """The jit-compiled global step ``(state, batch) -> (state, metrics, (h1, z1))``: ``shard_map`` over
  ``'data'``, each device one shard of the batch.

  Each device runs the model on its shard (BatchNorm statistics averaged over all devices, as SyncBN), the
  loss gathers the embeddings of all devices, and gradients are averaged; the state stays replicated. The
  online probe (if any) trains on the stop-gradient representations of view 1 and the labels. The first view's
  representations and embeddings come back sharded, for the collapse diagnostics.

  With ``config.augment.on_device`` the batch's views are the host's geometric part only (uint8) and each device
  first applies the colour part of the view recipes (:func:`device_augment.apply_colour_ops_per_example`), with
  example keys from (seed, step, view, the example's row in the global batch): the same augmentations whatever
  the number of devices, and a resumed run repeats them.
  """
  coeffs = dict(config.loss)
  axis = parallel.AXIS
  head, probe_tx = online_probe
  on_device = bool(config.augment.get('on_device', False))
  recipes = (dict(config.augment.view1), dict(config.augment.view2))

  def colour_ops(batch, step):
    """The views after the device colour ops; keys per example from its global row ``device·local_b + i``."""
    local_b = batch['view1'].shape[0]
    rows = jax.lax.axis_index(axis) * local_b + jnp.arange(local_b)
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x636f6c), step)
    out = dict(batch)
    for v, (name, recipe) in enumerate(zip(('view1', 'view2'), recipes)):
      view_key = jax.random.fold_in(step_key, v)
      keys = jax.vmap(lambda i, k=view_key: jax.random.fold_in(k, i))(rows)
      out[name] = device_augment.apply_colour_ops_per_example(batch[name], keys, recipe)
    return out

  def per_device(state: TrainState, batch):
    if on_device:
      batch = colour_ops(batch, state.step)

    def loss_fn(params):
      (h1, z1), upd = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['view1'],
                                  train=True, mutable=['batch_stats'])
      (_, z2), upd = model.apply({'params': params, 'batch_stats': upd['batch_stats']}, batch['view2'],
                                 train=True, mutable=['batch_stats'])
      loss, metrics = losses.vicreg_loss(z1, z2, axis_name=axis, **coeffs)
      return loss, (metrics, upd['batch_stats'], h1, z1)

    grads, (metrics, batch_stats, h1, z1) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, embedding_std=losses.embedding_std(z1, axis), learning_rate=schedule(state.step))
    probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
    if head is not None:
      def probe_loss(p):
        logits = head.apply({'params': p}, jax.lax.stop_gradient(h1))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
        return ce, jnp.mean(jnp.argmax(logits, -1) == batch['label'])
      (_, top1), g = jax.value_and_grad(probe_loss, has_aux=True)(probe_params)
      upd, probe_opt_state = probe_tx.update(jax.lax.pmean(g, axis), probe_opt_state, probe_params)
      probe_params = optax.apply_updates(probe_params, upd)
      metrics['online_probe_top1'] = jax.lax.pmean(top1, axis)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                           probe_params=probe_params, probe_opt_state=probe_opt_state)
    return new_state, metrics, (h1, z1)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P(), P(axis)),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), options=options)


def save_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))


def collapse_metrics(h, z) -> tuple[dict, tuple]:
  """Collapse diagnostics of a batch's representations (``repr/…``) and embeddings (``emb/…``), and the two
  singular-value spectra they were computed from."""
  spectra = (diagnostics.spectrum(h), diagnostics.spectrum(z))
  scalars = {f'{name}/{k}': v for name, x, s in (('repr', h, spectra[0]), ('emb', z, spectra[1]))
             for k, v in diagnostics.collapse_stats(x, s=s).items()}
  return scalars, spectra


def _format_metrics(step: int, total: int, m: dict) -> str:
  return (f'step {step}/{total}  loss {m["loss"]:.4f}  inv {m["invariance"]:.4f}  var {m["variance"]:.4f}  '
          f'cov {m["covariance"]:.4f}  emb_std {m["embedding_std"]:.3f}  emb_rankme {m["emb/rankme"]:.1f}  '
          f'lr {m["learning_rate"]:.4g}')


def absolute_workdir(path: str) -> str:
  """A local ``path`` made absolute (orbax refuses relative checkpoint paths, and only when a save is already
  in flight); URLs such as gs://… unchanged."""
  return path if '://' in path else os.path.abspath(path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains (resuming from the latest checkpoint in ``workdir``), then probes; returns the summary."""
  start_time = time.time()
  workdir = absolute_workdir(workdir)
  if not jax.process_index():
    tf.io.gfile.makedirs(workdir)  # local path or gs://
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  n_train = train_examples(config)
  total_steps, warmup_steps = schedule_steps(config, n_train)
  epoch_steps = steps_per_epoch(config, n_train)
  model = build_model(config)
  tx, schedule = make_optimizer(config, total_steps, warmup_steps)
  online = make_probe(config, sources.num_classes(config.data))

  rng = jax.random.key(config.seed)
  state = jax.jit(functools.partial(init_state, config, build_model(config, None), tx, online_probe=online),
                  out_shardings=parallel.replicated(mesh))(rng)
  mngr = checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info('Resumed from %s at step %d.', mngr.directory, int(state.step))
  save_config(workdir, config)
  start_step = int(state.step)

  train_step = make_train_step(config, model, tx, schedule, mesh, online)
  diagnose = jax.jit(collapse_metrics, out_shardings=parallel.replicated(mesh))
  spectrum_every = config.spectrum_every_steps or config.checkpoint_every_steps
  probe_sum, probe_n = 0.0, 0
  metrics = None
  ds = pipeline.pretrain_dataset(config, start_step, jax.process_index(), jax.process_count())
  batches = pipeline.global_batches(ds, parallel.data_sharding(mesh))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)]
  stop_step = min(total_steps, start_step + config.max_steps_per_run) if config.max_steps_per_run else total_steps
  logging.info('Training %d steps (%d warmup) of global batch %d on %d devices of %d process(es).', total_steps,
               warmup_steps, config.batch_size, mesh.devices.size, jax.process_count())
  try:
    for step in range(start_step + 1, stop_step + 1):
      previous = metrics
      state, metrics, (h1, z1) = train_step(state, next(batches))
      # At most two steps in flight: the host prepares the next batch while the devices run, without an
      # unbounded dispatch queue (which can also starve XLA:CPU's collective threads on small machines).
      jax.block_until_ready(previous)
      for h in hooks:
        h(step)
      if online[0] is not None:  # mean train top-1 of the online probe over each epoch (summed on device)
        probe_sum, probe_n = probe_sum + metrics['online_probe_top1'], probe_n + 1
        if step % epoch_steps == 0 or step == total_steps:
          top1 = float(probe_sum) / probe_n
          writer.write_scalars(step, {'online_probe/epoch_top1': top1})
          logging.info('epoch %d: online linear probe train top-1 %.3f', math.ceil(step / epoch_steps), top1)
          probe_sum, probe_n = 0.0, 0
      log_now = step % config.log_every_steps == 0 or step == total_steps
      spectrum_now = step % spectrum_every == 0 or step == total_steps
      if log_now or spectrum_now:
        collapse, (s_h, s_z) = diagnose(h1, z1)
      if log_now:
        m = jax.device_get(metrics)
        if not math.isfinite(float(m['loss'])):
          raise FloatingPointError(f'loss became {m["loss"]} at step {step}; lower optim.base_lr or check the data')
        m.update(jax.device_get(collapse))
        writer.write_scalars(step, m)
        logging.info(_format_metrics(step, total_steps, m))
      if spectrum_now:
        s_h, s_z = jax.device_get((s_h, s_z))
        image = diagnostics.spectrum_plot({'representations': s_h, 'embeddings': s_z}, title=f'step {step}')
        writer.write_images(step, {'spectrum': image[None]})
      if step % config.checkpoint_every_steps == 0 or step == stop_step:
        mngr.save(step, args=ocp.args.StandardSave(state))
  finally:  # also on interruption: let the checkpoint in flight land
    mngr.wait_until_finished()
    writer.flush()
  if stop_step < total_steps:
    logging.info('Stopped at step %d of %d (max_steps_per_run); the same command continues from there.',
                 stop_step, total_steps)
    writer.close()
    return {'steps': stop_step}

  summary = {'steps': int(state.step)}
  if config.eval.final_probe:
    summary.update(final_probe(config, state, mesh, workdir))
    writer.write_scalars(int(state.step), {f'final/{k}': v for k, v in summary.items() if k != 'steps'})
  summary['wall_seconds'] = round(time.time() - start_time, 1)
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  logging.info('Summary: %s', json.dumps(summary))
  print(json.dumps(summary), flush=True)
  writer.close()
  return summary


def final_probe(config, state: TrainState, mesh, workdir: str) -> dict:
  """Linear probes on frozen representations (all labels; k labels per class over several draws), weighted
  k-NN (k = 20, 200), RankMe of representations and embeddings and the std of the embeddings, on the
  train/test splits named in ``config.eval``. Writes the singular values of the training set's
  representations and embeddings to ``workdir/spectra.npz`` (for ``python -m vicreg_jax.evaluate.diagnostics``).

  Each process extracts the features of its share of the images; k-NN runs on all devices; the host-side work
  (scikit-learn probes, spectra) runs on process 0, which hands the figures to the others."""
  model = build_model(config, axis_name=None)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = jax.jit(functools.partial(model.apply, train=False))
  recipe = dict(config.augment.view1)
  n_dev = mesh.devices.size
  batch = max(n_dev, config.eval.batch_size // n_dev * n_dev)

  def features(split: str, max_examples: int):
    ds = pipeline.eval_dataset(config.data, split, batch, crop=config.data.image_size, mean=recipe.get('mean'),
                               std=recipe.get('std'), process_index=jax.process_index(),
                               process_count=jax.process_count(), max_examples=max_examples)
    return probe.extract(apply, variables, pipeline.global_batches(ds, parallel.data_sharding(mesh)))

  (h_tr, z_tr), y_tr = features(config.data.train_split, config.eval.max_train_examples)
  (h_te, _), y_te = features(config.eval.test_split, config.eval.max_test_examples)
  knn_acc = knn.knn_accuracy(h_tr, y_tr, h_te, y_te, ks=(20, 200), mesh=mesh)

  def host_side() -> dict:
    s_h, s_z = diagnostics.singular_values(h_tr), diagnostics.singular_values(z_tr)
    buffer = io.BytesIO()  # np.savez seeks, which GFile (gs://) does not support for writing
    np.savez(buffer, representations=s_h, embeddings=s_z)
    with tf.io.gfile.GFile(os.path.join(workdir, 'spectra.npz'), 'wb') as f:
      f.write(buffer.getvalue())
    result = {
        'linear_top1': probe.linear_probe(h_tr, y_tr, h_te, y_te),
        f'linear_top1_{config.eval.labels_per_class}_per_class': probe.few_label_probe(
            h_tr, y_tr, h_te, y_te, config.eval.labels_per_class, config.eval.draws, config.seed),
        'knn_top1_20': knn_acc[20],
        'knn_top1_200': knn_acc[200],
        'rankme': diagnostics.rankme_from_spectrum(s_h),
        'rankme_embeddings': diagnostics.rankme_from_spectrum(s_z),
        'embedding_std': float(np.mean(np.std(z_tr, axis=0))),
    }
    return {k: float(f'{float(v):.4g}') for k, v in result.items()}  # 4 significant digits: a collapsed std stays visible

  return parallel.share_from_process_0(host_side)
