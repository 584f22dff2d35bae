"""The errors a user can cause and fix, as opposed to programming errors.

The command-line entry points (`metadcseg_jax.cli`) print a `UserError` as one line and exit
with status 2; a `RunStopped` (a stop signal, a full disk: the run is checkpointed and resumes
when rerun) as one line with status 75; any other exception keeps its traceback. Each subclass
also derives from the built-in exception a caller would expect (`ValueError` for bad settings
and bad data), so code that catches those keeps working.
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


class RunStopped(Exception):
  """The run stopped early and can be resumed: rerunning the same command carries on.

  Not a `UserError`: the command-line entry points print it as one line and exit with
  `EXIT_RESUMABLE` (75), apart from success (0), a user error (2) and a crash (1).
  """


EXIT_RESUMABLE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retrying is expected to work


class Preempted(RunStopped):
  """A stop signal (SIGTERM, SIGINT, SIGUSR1) ended training after a step, checkpointed."""


class DiskFullError(RunStopped):
  """A write ran out of space; the previous checkpoint is intact (names the path and the free
  space)."""
