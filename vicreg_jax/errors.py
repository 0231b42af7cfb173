"""Errors a user can cause: the command line turns these (and only these) into one line on stderr and a
non-zero exit status; any other exception is a bug and keeps its traceback."""


class UserError(Exception):
  """A mistake in the command, the config, the data or the workdir; the message says what to do. ``status``:
  the command line's exit status (2: running the same command again cannot help; a supervisor stops)."""
  status = 2


class ConfigError(UserError, ValueError):
  """A config value that cannot work (wrong choice, sizes that do not fit together)."""


class DataNotFoundError(UserError, RuntimeError):
  """A dataset the config names is not available; the message says how to provide it."""


class WorkdirError(UserError):
  """A workdir that cannot be used: not writable, or holding another model's checkpoints or run."""


class NonFiniteError(UserError, FloatingPointError):
  """The loss or the gradients became NaN or inf (the last good checkpoint is kept)."""


class WaitTimeoutError(UserError, TimeoutError):
  """A job gave up waiting for another job's output."""
