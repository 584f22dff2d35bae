"""The errors a user can cause and fix, as opposed to programming errors.

The command-line entry points (`metadcseg_jax.cli`) print a `UserError` as one line and exit
with status 2; any other exception keeps its traceback. Each subclass also derives from the
built-in exception a caller would expect (`ValueError` for bad settings and bad data), so code
that catches those keeps working.
"""


class UserError(Exception):
  """Something the user can fix: a setting, a file, a busy workdir. Shown as one line."""


class ConfigError(UserError, ValueError):
  """A config value that is missing, out of range, unknown or incompatible with another."""


class DataError(UserError, ValueError):
  """A dataset file or folder that cannot be read as the loader expects (names the file)."""


class WorkdirError(UserError):
  """The workdir cannot be used: not a directory, or locked by another run."""


class CheckpointError(UserError):
  """No checkpoint in the workdir restores, or they were made with incompatible settings."""


class NonFiniteLossError(UserError, FloatingPointError):
  """A training loss became NaN or Inf; the last good checkpoint is kept."""
