"""The pretraining job's wiring: the state, the input, the loop with its periodic actions and the summary (the step
itself is in :mod:`vicreg_jax.step`, the end-of-run probe in :mod:`vicreg_jax.evaluate.summary`)."""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import ml_collections
from absl import logging
from clu import metric_writers, periodic_actions

from vicreg_jax import checkpoints, compilation, loop, methods, parallel, runs
from vicreg_jax import config as schema
from vicreg_jax.data import pipeline, sources
from vicreg_jax.evaluate import diagnostics
from vicreg_jax.evaluate import summary as end_of_run
from vicreg_jax.loop import due
from vicreg_jax.metrics import IntervalMean
from vicreg_jax.step import (TrainState, build_model, init_state, make_diagnostics, make_probe, make_train_step,
                             state_shardings)


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
    self.writer.write_scalars(step, m)
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
  """A fresh state laid out as the train step takes it (:func:`vicreg_jax.step.state_shardings`: replicated, the
  optimiser state split over the devices with ``optim.shard_state``), or that of the newest checkpoint in
  ``mngr`` in the same layout, whichever layout saved it (:func:`checkpoints.restore_newest`: a damaged one set
  aside, any other reading error retried for ``restore_retry_seconds`` and then the end of the run, the
  checkpoints left where they are). A checkpoint of another model is :class:`errors.WorkdirError`."""
  init = functools.partial(init_state, config, build_model(config, None), tx, online_probe=online)
  key = jax.random.key(config.seed)
  state = jax.jit(init, out_shardings=state_shardings(config, mesh, jax.eval_shape(init, key)))(key)
  restored = checkpoints.restore_newest(
      mngr, state, workdir, config.restore_retry_seconds,
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
  schema.validate(config)  # a wrong value fails in one line before anything is written
  workdir = runs.make_workdir(workdir)
  compilation.configure_cache(config, workdir)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  runs.check_splits(config.data, [config.data.train_split] + ([config.data.test_split] if config.final_probe.enabled
                                                              else []))
  total_steps, warmup_steps, epoch_steps = runs.schedule_steps(config)
  tx, schedule = methods.make_optimizer(config, total_steps, warmup_steps, epoch_steps)
  online = make_probe(config, sources.get(config.data).num_classes(config.data))
  mngr = checkpoints.manager(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints,
                             config.keep_checkpoints_every)
  state = _initial_state(config, tx, online, mesh, mngr, workdir)
  runs.save_config(workdir, config)
  start_step = int(state.step)
  stop_step = min(total_steps, start_step + config.max_steps_per_run) if config.max_steps_per_run else total_steps

  # Synchronous: TensorFlow's summary ops then never run in a thread of their own beside JAX's dispatch (seen
  # here: both threads dying of one segmentation fault, a summary write beside a step's dispatch).
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                asynchronous=False)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  batches = loop.InputWait(parallel.prefetch_to_device(pipeline.global_batches(
      pipeline.pretrain_dataset(config, start_step, jax.process_index(), jax.process_count()),
      parallel.data_sharding(mesh)), config.prefetch_to_device))
  guard = loop.NonFiniteGuard(config.nonfinite, methods.get(config).terms, writer)
  checkpoint = loop.Checkpoint(mngr, config.checkpoint_every_steps, stop_step, guard)
  actions = _reporting_actions(config, writer, total_steps, epoch_steps, online[0] is not None, batches)
  logging.info('Training %s for %d steps (%d warmup) of global batch %d on %d devices of %d process(es).',
               config.method, total_steps, warmup_steps, config.batch_size, mesh.devices.size, jax.process_count())
  preemption = loop.Preemption()
  try:
    train_step = make_train_step(config, build_model(config), tx, schedule, mesh, online, total_steps)
    diagnose = make_diagnostics(mesh, config.diagnostics_max_rows)
    state, preempted = loop.run(train_step, state, batches, actions, start_step, stop_step,
                                guard=guard, preemption=preemption, checkpoint=checkpoint,
                                derive=lambda hz: diagnose(*hz), profile=loop.Profile(config.profile_steps,
                                                                                      workdir))
  except jax.errors.JaxRuntimeError as e:  # XLA's out of memory: one line with the advice
    raise compilation.out_of_memory(e, config.batch_size // mesh.devices.size) or e
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
  if config.final_probe.enabled:
    summary.update(end_of_run.final_probe(config, state, mesh, workdir))
    writer.write_scalars(int(state.step), {f'final/{k}': v for k, v in summary.items() if k != 'steps'})
  summary['wall_seconds'] = round(time.time() - start_time, 1)
  runs.write_json(os.path.join(workdir, 'summary.json'), summary)
  logging.info('Summary: %s', json.dumps(summary))
  print(json.dumps(summary), flush=True)
  writer.close()
  return summary
