"""Pretraining: the loop and its periodic actions (the step itself is in :mod:`vicreg_jax.step`), the final
probe."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from clu import metric_writers, periodic_actions

from vicreg_jax import checkpoints, compilation, distributed, loop, methods, parallel, runs
from vicreg_jax import config as config_checks
from vicreg_jax.data import pipeline, sources
from vicreg_jax.evaluate import classifier, diagnostics, knn, probe
from vicreg_jax.loop import due
from vicreg_jax.metrics import IntervalMean
from vicreg_jax.step import TrainState, build_model, init_state, make_diagnostics, make_train_step  # noqa: F401


def make_probe(config, num_classes: int):
  """The online probe's head and optimiser (SGD with momentum, constant lr), or (None, None) when disabled."""
  if not config.online_probe.enabled:
    return None, None
  return (classifier.Head(num_classes),
          optax.sgd(config.online_probe.lr, momentum=config.online_probe.momentum))


# --- the loop's periodic actions ------------------------------------------------------------------------------

class OnlineProbeEpoch:
  """At the end of every epoch: the online probe's mean train top-1 over the epoch (an early collapse
  warning), summed on the device meanwhile and copied one step later (when that step has finished anyway)."""

  def __init__(self, writer, epoch_steps: int, total_steps: int):
    self.writer, self.epoch_steps, self.total_steps = writer, epoch_steps, total_steps
    self.mean = IntervalMean()

  def __call__(self, step: int, out: loop.StepOutput):
    self.flush(step)
    self.mean.add({k: out.metrics[k] for k in ('online_probe_top1', 'finite')})
    if due(step, self.epoch_steps, self.total_steps):
      self.mean.end(step)

  def flush(self, step: int) -> None:
    """Reports the epoch that ended before ``step``, if any."""
    del step
    if (done := self.mean.pending()) is not None:
      end, means = done
      self.writer.write_scalars(end, {'online_probe/epoch_top1': means['online_probe_top1']})
      logging.info('epoch %d: online linear probe train top-1 %.3f', math.ceil(end / self.epoch_steps),
                   means['online_probe_top1'])


class LogMetrics:
  """Every ``every`` steps: the collapse diagnostics to the writer and one progress line with the step metrics'
  latest means (loss, the method's terms, embedding std, learning rate; from :class:`loop.StepMetrics`, which runs
  before), RankMe of the embeddings, and the share of the time since the last line spent waiting for input, when
  ``input_wait`` is an :class:`InputWait`."""

  def __init__(self, writer, every: int, total_steps: int, terms, step_metrics: loop.StepMetrics, input_wait=None):
    self.writer, self.every, self.total_steps, self.terms = writer, every, total_steps, terms
    self.step_metrics, self.input_wait = step_metrics, input_wait

  def __call__(self, step: int, out: loop.StepOutput):
    if not due(step, self.every, self.total_steps):
      return
    m = jax.device_get(out.derived()[0])
    if self.input_wait is not None:
      m['input_wait_share'] = self.input_wait.share()
    self.writer.write_scalars(step, m)  # the writer may be asynchronous: m is not changed after this
    m = {**m, **self.step_metrics.last}
    wait = f'  input_wait {m["input_wait_share"]:.0%}' if self.input_wait is not None else ''
    terms = '  '.join(f'{t} {m[t]:.4f}' for t in self.terms)
    logging.info(f'step {step}/{self.total_steps}  loss {m["loss"]:.4f}  {terms}  emb_std {m["embedding_std"]:.3f}  '
                 f'emb_rankme {m["emb/rankme"]:.1f}  lr {m["learning_rate"]:.4g}{wait}')


class SpectrumImage:
  """Every ``every`` steps: the singular-value spectra of the batch's representations and embeddings as a
  TensorBoard image."""

  def __init__(self, writer, every: int, total_steps: int):
    self.writer, self.every, self.total_steps = writer, every, total_steps

  def __call__(self, step: int, out: loop.StepOutput):
    if due(step, self.every, self.total_steps):
      s_h, s_z = jax.device_get(out.derived()[1])
      image = diagnostics.spectrum_plot({'representations': s_h, 'embeddings': s_z}, title=f'step {step}')
      self.writer.write_images(step, {'spectrum': image[None]})


# --- the run --------------------------------------------------------------------------------------------------

def _initial_state(config, tx, online, mesh, mngr, workdir: str) -> TrainState:
  """A fresh replicated state, or that of the newest checkpoint in ``mngr`` (:func:`checkpoints.restore_newest`:
  a damaged one set aside, any other reading error retried for ``restore_retry_seconds`` and then the end of
  the run, the checkpoints left where they are). A checkpoint of another model is :class:`errors.WorkdirError`."""
  init = functools.partial(init_state, config, build_model(config, None), tx, online_probe=online)
  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
  restored = checkpoints.restore_newest(
      mngr, state, workdir, config.get('restore_retry_seconds', 600.0),
      check=lambda step: checkpoints.check_same_model(str(mngr.directory), step, state, workdir))
  return state if restored is None else restored


def _reporting_actions(config, writer, total_steps: int, epoch_steps: int, online_probe: bool,
                       input_wait: loop.InputWait) -> list:
  """The loop's reporting actions, in the order they run after a step: steps/s, the online probe's epoch top-1,
  the step metrics' interval means, the progress line with the collapse diagnostics, the spectrum. Those with a
  ``flush(step)`` hold something back until a later step: the loop flushes them where it stops."""
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  actions = [lambda step, out: progress(step)]
  if online_probe:
    actions.append(OnlineProbeEpoch(writer, epoch_steps, total_steps))
  step_metrics = loop.StepMetrics(writer, config.metrics_every_steps, config.log_every_steps, total_steps,
                                  latest=('learning_rate', 'ema_decay'))
  actions += [step_metrics,
              LogMetrics(writer, config.log_every_steps, total_steps, methods.get(config).terms, step_metrics,
                         input_wait),
              SpectrumImage(writer, config.spectrum_every_steps or config.checkpoint_every_steps, total_steps)]
  return actions


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains (resuming from the latest checkpoint in ``workdir``), then probes; returns the summary."""
  start_time = time.time()
  config_checks.validate(config)  # a wrong value fails in one line before anything is written
  workdir = runs.make_workdir(workdir)
  compilation.configure_cache(config, workdir)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  runs.check_splits(config.data, [config.data.train_split] + ([config.eval.test_split] if config.eval.final_probe
                                                              else []))
  total_steps, warmup_steps, epoch_steps = runs.schedule_steps(config)
  tx, schedule = methods.make_optimizer(config, total_steps, warmup_steps)
  online = make_probe(config, sources.get(config.data).num_classes(config.data))
  mngr = checkpoints.manager(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  state = _initial_state(config, tx, online, mesh, mngr, workdir)
  runs.save_config(workdir, config)
  start_step = int(state.step)
  stop_step = min(total_steps, start_step + config.max_steps_per_run) if config.max_steps_per_run else total_steps

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  batches = loop.InputWait(parallel.prefetch_to_device(pipeline.global_batches(
      pipeline.pretrain_dataset(config, start_step, jax.process_index(), jax.process_count()),
      parallel.data_sharding(mesh)), config.get('prefetch_to_device', 0)))
  guard = loop.NonFiniteGuard(config.get('nonfinite', 'stop'), methods.get(config).terms, writer)
  checkpoint = loop.Checkpoint(mngr, config.checkpoint_every_steps, stop_step, guard)
  actions = _reporting_actions(config, writer, total_steps, epoch_steps, online[0] is not None, batches)
  logging.info('Training %s for %d steps (%d warmup) of global batch %d on %d devices of %d process(es).',
               config.method, total_steps, warmup_steps, config.batch_size, mesh.devices.size, jax.process_count())
  preemption = loop.Preemption()
  try:
    train_step = make_train_step(config, build_model(config), tx, schedule, mesh, online, total_steps)
    diagnose = make_diagnostics(mesh, config.get('diagnostics_max_rows', 1024))
    state, preempted = loop.run(train_step, state, batches, actions, start_step, stop_step,
                                guard=guard, preemption=preemption, checkpoint=checkpoint,
                                derive=lambda hz: diagnose(*hz), profile=loop.Profile(config.get('profile_steps', ''),
                                                                                      workdir))
  finally:
    preemption.close()
    writer.flush()
  if jax.config.jax_compilation_cache_dir:
    logging.info('%d program(s) loaded from the compilation cache.', compilation.cache_hits())
  if preempted or stop_step < total_steps:
    step = int(state.step)
    why = 'preempted (SIGTERM)' if preempted else 'max_steps_per_run'
    logging.info('Stopped at step %d of %d (%s), checkpoint saved in %s; the same command continues from there.',
                 step, total_steps, why, mngr.directory)
    print(f'Stopped at step {step} of {total_steps} ({why}); checkpoint {step} saved in {mngr.directory}; the same '
          'command continues from there.', flush=True)
    writer.close()
    return {'steps': step, 'preempted': preempted}
  return _summarise(config, state, mesh, workdir, writer, start_time)


def _summarise(config, state: TrainState, mesh, workdir: str, writer, start_time: float) -> dict:
  """The final probe's figures (if enabled) and the wall time: to the writer, ``summary.json`` and stdout."""
  summary = {'steps': int(state.step)}
  if config.eval.final_probe:
    summary.update(final_probe(config, state, mesh, workdir))
    writer.write_scalars(int(state.step), {f'final/{k}': v for k, v in summary.items() if k != 'steps'})
  summary['wall_seconds'] = round(time.time() - start_time, 1)
  runs.write_json(os.path.join(workdir, 'summary.json'), summary)
  logging.info('Summary: %s', json.dumps(summary))
  print(json.dumps(summary), flush=True)
  writer.close()
  return summary


def final_probe(config, state: TrainState, mesh, workdir: str) -> dict:
  """Linear probes on frozen representations (all labels; k labels per class over several draws), weighted
  k-NN (k = 20, 200), RankMe of representations and embeddings, the std of the embeddings and of the embeddings
  scaled to unit norm (:func:`diagnostics.unit_std`), on the
  train/test splits named in ``config.eval``. Writes the singular values of the training set's
  representations and embeddings to ``workdir/spectra.npz`` (for ``python -m vicreg_jax.evaluate.diagnostics``).

  Each process extracts the features of its share of the images; k-NN runs on all devices; the host-side work
  (scikit-learn probes, spectra) runs on process 0, which hands the figures to the others."""
  model = build_model(config, axis_name=None)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = compilation.jit(functools.partial(model.apply, train=False))
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
        'embedding_std_unit': diagnostics.unit_std(z_tr),
    }
    return {k: float(f'{float(v):.4g}') for k, v in result.items()}  # 4 significant digits: a collapsed std stays visible

  return distributed.share_from_process_0(host_side)
