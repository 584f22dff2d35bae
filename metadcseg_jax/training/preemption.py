"""Stopping a run so that it resumes where it stopped: stop signals, step checkpoints.

A cluster or a shared machine ends a job with a signal, then (after a grace period) SIGKILL:
SIGTERM (SLURM, Kubernetes, a closing notebook), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
`--signal=USR1@<seconds>`). While the trainer's loop runs, the first of them only sets a flag:
the step in progress finishes, a step checkpoint is written and waited for, and the trainer
raises `Preempted` (the command-line tools exit with status 75, `errors.EXIT_RESUMABLE`).
The handlers that were there before come back as soon as the first signal arrives, so a second
one acts as it would without the trainer (SIGTERM ends the process at once, SIGINT raises
KeyboardInterrupt); the checkpoints already on disk are untouched by it.

Step checkpoints are also written on a schedule (`config.train.checkpoint_every_steps`,
`config.train.checkpoint_every_minutes`), so an epoch of a large dataset is never lost whole.
On several processes every decision is taken by all of them at the same step
(`parallel.any_process`).
"""

import signal
import threading
import time
from typing import Any

import numpy as np

from metadcseg_jax import parallel

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
  """A context in which the first stop signal is recorded instead of acted on.

  Handlers can only be installed from the main thread; elsewhere (the trainer called from a
  thread) the signals keep their handlers and `received` stays None. A signal the process
  ignores (SIGINT in a shell's background job) stays ignored.

  Attributes:
    received: the number of the first signal received, or None.
  """

  def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
    self.signals = signals
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        if signal.getsignal(s) is not signal.SIG_IGN:  # ignored on purpose (a background job)
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.received is None:
      self.received = signum
    self._restore()

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()

  @property
  def name(self) -> str:
    return "a stop signal" if self.received is None else signal.Signals(self.received).name


class Schedule:
  """When the trainer writes a step checkpoint, and whether it stops after it.

  `check(step)` after each step: a checkpoint every `every_steps` global steps, when
  `every_minutes` have passed since the last checkpoint (`reset`), or when a stop signal was
  received by any process. One process: no communication; several: one all-gather of two
  flags per step, so that all of them save and stop at the same step.
  """

  def __init__(self, every_steps: int, every_minutes: float, stop: StopSignals):
    self.every_steps = int(every_steps)
    self.every_s = float(every_minutes) * 60.0
    self.stop = stop
    self.reset()

  def reset(self) -> None:
    self._last = time.monotonic()

  def check(self, step: int) -> tuple[bool, bool]:
    """`(save, stop)` after global step `step` (1-based count of steps done)."""
    stop = self.stop.received is not None
    timed = self.every_s > 0 and time.monotonic() - self._last >= self.every_s
    stop, timed = parallel.any_process([stop, timed])
    counted = self.every_steps > 0 and step % self.every_steps == 0
    return stop or timed or counted, stop


def metrics_to_json(stacked: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """The finished steps' metrics of an epoch, {name: (steps, ...) array}, for a checkpoint's
  JSON item (exact: float32 values survive the round trip through Python floats)."""
  return {k: {"dtype": str(v.dtype), "values": np.asarray(v).tolist()} for k, v in stacked.items()}


def metrics_from_json(saved: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
  """Inverse of `metrics_to_json`."""
  return {k: np.asarray(v["values"], dtype=v["dtype"]) for k, v in saved.items()}
