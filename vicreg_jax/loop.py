"""The step loop shared by pretraining and the evaluation jobs' classifier, and its job-independent actions: the
step metrics as interval means, the non-finite guard, checkpoints, SIGTERM/preemption, a profile, input timing.

A loop runs ``step_fn(state, batch) -> (state, metrics, aux)`` for steps ``start + 1 … stop``, keeping at most
two steps in flight, and after each calls its actions with ``(step, StepOutput)``. It checks every step's
``metrics['finite']`` one step late (no host sync of its own), stops early with a checkpoint of the step
reached when preempted, and flushes the actions that hold something back where it stops.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
from absl import logging
from jax.experimental import multihost_utils

from vicreg_jax import checkpoints, errors
from vicreg_jax.metrics import IntervalMean


@dataclasses.dataclass
class StepOutput:
  """What one step returned. ``derived()`` is ``derive(aux)`` computed at most once, by the first action asking
  (pretraining: the collapse diagnostics of the step's representations and embeddings)."""
  state: Any
  metrics: dict
  aux: Any = None
  derive: Optional[Callable] = None
  _derived: Any = None

  def derived(self):
    if self._derived is None:
      self._derived = self.derive(self.aux)
      if serial_programs():
        jax.block_until_ready(self._derived)
    return self._derived


def serial_programs() -> bool:
  """Whether each program with collectives must finish before the next starts: several processes on CPU.
  XLA:CPU runs dispatched programs concurrently, and two programs whose cross-process (gloo) collectives are in
  flight at once can pair one process's collective with another's on the peer (seen as
  ``gloo::EnforceNotMet … op.preamble.length <= op.nbytes`` at the end of a two-process run); accelerators order
  a device's programs, so there the loop keeps its two steps in flight."""
  return jax.process_count() > 1 and jax.default_backend() == 'cpu'


def due(step: int, every: int, last: int) -> bool:
  """Whether a periodic action runs at ``step``: every ``every`` steps and at the ``last``."""
  return step % every == 0 or step == last


class StepMetrics:
  """Every ``every`` steps, at every ``log_every``-th and at the last: each step metric's mean over the steps
  since the last write (summed on the device meanwhile: one copy to the host per write; the keys in ``latest``
  as at the step) to the writer, tags prefixed with ``prefix``. Between progress lines an interval's means are
  copied one step later, once the loop has waited for its last step anyway, so that writing them never stalls
  the loop; at a progress line at once. :attr:`last` holds the latest means, for that line."""

  def __init__(self, writer, every: int, log_every: int, total_steps: int, latest=(), prefix: str = ''):
    if every < 1:
      raise errors.ConfigError(f'metrics_every_steps must be at least 1, not {every}')
    self.writer, self.every, self.log_every, self.total_steps = writer, every, log_every, total_steps
    self.prefix = prefix
    self.mean = IntervalMean(latest=latest)
    self.last: dict = {}

  def __call__(self, step: int, out: StepOutput):
    self._write_pending()
    self.mean.add(out.metrics)  # a step whose 'finite' is False is left out of the means
    if due(step, self.log_every, self.total_steps):
      self.flush(step)
    elif due(step, self.every, self.total_steps):
      self.mean.end(step)

  def _write(self, step: int, means: dict) -> None:
    self.writer.write_scalars(step, {self.prefix + k: v for k, v in means.items()})

  def _write_pending(self) -> None:
    if (done := self.mean.pending()) is not None:
      self._write(*done)

  def flush(self, step: int) -> None:
    """Writes what is not written yet: the pending interval, and the means of the steps since, at ``step`` (also
    where a run stops early)."""
    self._write_pending()
    if self.mean.steps:
      self.last = self.mean.take()
      self._write(step, self.last)


class NonFiniteGuard:
  """Reads each step's ``finite`` flag once the step has finished anyway (the loop keeps at most two steps in
  flight), so without a host sync of its own. A non-finite step (whose update the step itself dropped) ends the
  run with :class:`errors.NonFiniteError` naming the step and the term (``nonfinite='stop'``), or is counted
  and logged (``'skip'``). ``what`` names the run in messages ('' for pretraining, the head's tag)."""

  def __init__(self, mode: str, terms, writer, what: str = ''):
    if mode not in ('stop', 'skip'):
      raise errors.ConfigError(f"nonfinite must be 'stop' or 'skip', not {mode!r}")
    self.mode, self.terms, self.writer, self.what = mode, terms, writer, what
    self.skipped, self.checked = 0, 0

  def check(self, step: int, metrics) -> None:
    """Checks step ``step`` (once; ``metrics`` of that step, finished or not)."""
    if metrics is None or step <= self.checked:
      return
    self.checked = step
    if bool(jax.device_get(metrics['finite'])):
      return
    m = jax.device_get(metrics)
    bad = [t for t in (*self.terms, 'loss') if t in m and not math.isfinite(float(m[t]))]  # the culprit first
    what = f'{bad[0]} became {float(m[bad[0]])}' if bad else 'the gradients became non-finite (the loss did not)'
    where = f'{self.what} step {step}' if self.what else f'step {step}'
    if self.mode == 'stop':
      raise errors.NonFiniteError(
          f'{where}: {what}; stopped, the update not applied and the checkpoints intact. Lower the learning rate, '
          'check the data, or pass --config.nonfinite=skip to skip such steps')
    self.skipped += 1
    self.writer.write_scalars(step, {f'{self.what + "/" if self.what else ""}nonfinite_skipped': self.skipped})
    logging.warning('%s: %s; update skipped (%d step(s) skipped so far)', where, what, self.skipped)


class Preemption:
  """SIGTERM (a preempted TPU VM, SLURM's time limit, ``kill``) asks the job to stop after the current step.

  One process: a signal handler sets a flag. Several: JAX's preemption service (which handles SIGTERM itself,
  on whichever processes receive it) makes every process answer True at the same call, the one after the
  most calls any process had made (the calls are counted, so several loops in one job may share it)."""

  def __init__(self):
    self.several = jax.process_count() > 1
    self.received, self._previous, self.calls = False, None, 0
    if not self.several:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self.received = True

  def reached(self) -> bool:
    """Whether to stop now; every process must call it once per step."""
    self.calls += 1
    if self.several:
      return multihost_utils.reached_preemption_sync_point(self.calls)
    return self.received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Checkpoint:
  """Every ``every`` steps (and at this invocation's last step, ``stop_step``, unless ``at_stop`` is False) a
  checkpoint (asynchronous; every process joins); never of a step the guard has not cleared."""

  def __init__(self, mngr, every: int, stop_step: int, guard: NonFiniteGuard, at_stop: bool = True):
    self.mngr, self.every, self.stop_step, self.guard = mngr, every, stop_step, guard
    self.at_stop, self.saved = at_stop, 0  # the step of the last save

  def __call__(self, step: int, out: StepOutput, force: bool = False):
    if force or step % self.every == 0 or (self.at_stop and step == self.stop_step):
      self.guard.check(step, out.metrics)
      checkpoints.save(self.mngr, step, out.state, force=force)
      self.saved = step


class InputWait:
  """The batches iterator, timed: the share of wall time the loop spent waiting for the next batch since the last
  :meth:`share` (shown on the progress line: near 0 when the input keeps up, near 1 when it limits the run)."""

  def __init__(self, batches):
    self.batches, self.waited, self.since = batches, 0.0, time.perf_counter()

  def __next__(self):
    t0 = time.perf_counter()
    batch = next(self.batches)
    self.waited += time.perf_counter() - t0
    return batch

  def share(self) -> float:
    now = time.perf_counter()
    share = self.waited / max(now - self.since, 1e-9)
    self.waited, self.since = 0.0, now
    return share


class Profile:
  """``profile_steps`` 'FIRST-LAST': a profiler trace (``jax.profiler``, for TensorBoard's profile plugin or
  Perfetto) of steps FIRST … LAST in ``WORKDIR/profile``; '' for none."""

  def __init__(self, steps: str, workdir: str):
    self.first = self.last = 0
    if steps:
      try:
        first, last = (int(v) for v in str(steps).split('-')) if '-' in str(steps) else (int(steps),) * 2
      except ValueError:
        first = last = 0
      if not 0 < first <= last:
        raise errors.ConfigError(f"profile_steps {steps!r} must be 'FIRST-LAST' with 0 < FIRST <= LAST, e.g. '20-25'")
      self.first, self.last = first, last
    self.directory, self.active = os.path.join(workdir, 'profile'), False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info('Profile of steps %d-%d written to %s.', self.first, self.last, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def run(step_fn: Callable, state, batches, actions: list, start_step: int, stop_step: int, *,
        guard: NonFiniteGuard, preemption: Preemption, checkpoint: Checkpoint, derive: Optional[Callable] = None,
        profile: Optional[Profile] = None) -> tuple[Any, bool]:
  """Steps ``start_step + 1 … stop_step``, each followed by ``actions`` and then ``checkpoint``; stops early, with
  a checkpoint of the step reached, when ``preemption`` says so. The actions with a ``flush(step)`` are flushed
  where the loop stops; the checkpoint in flight is awaited even when a step raises. Returns the state and
  whether the loop was preempted."""
  metrics, preempted, serial = None, False, serial_programs()
  try:
    for step in range(start_step + 1, stop_step + 1):
      if profile is not None:
        profile.before(step)
      previous = metrics
      state, metrics, aux = step_fn(state, next(batches))
      if serial:
        jax.block_until_ready((state, metrics, aux))
      # At most two steps in flight: the host prepares the next batch while the devices run, without an
      # unbounded dispatch queue (which can also starve XLA:CPU's collective threads on small machines).
      jax.block_until_ready(previous)
      guard.check(step - 1, previous)
      out = StepOutput(state, metrics, aux, derive)
      for action in (*actions, checkpoint):
        action(step, out)
      if profile is not None:
        profile.after(step, state)
      if preemption.reached() and step < stop_step:
        if checkpoint.saved != step:
          checkpoint(step, out, force=True)
        preempted = True
        break
    else:
      guard.check(stop_step, metrics)
    for action in actions:  # what the reporting actions hold back for a step that never came
      if hasattr(action, 'flush'):
        action.flush(int(state.step))
  finally:  # also on an error: let the checkpoint in flight land
    if profile is not None:
      profile.close()
    checkpoint.mngr.wait_until_finished()
  return state, preempted
