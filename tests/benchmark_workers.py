"""Stand-in trainers for `benchmark.run_benchmark(processes=...)`: worker processes import
them by name, so they live in a module of their own rather than in a test file."""

import json
import os
import pathlib
import time

from metadcseg_jax import preemption
from metadcseg_jax.errors import Preempted


def results_for(config) -> dict:
  dice = {"ce": 0.5, "metadcseg": 0.6}[config.method] + 0.01 * config.seed
  summary = {
    "dice": dice, "iou": dice - 0.1, "miou": dice, "hd": 6.0, "hd95": 5.0, "asd": 2.0,
    "n_cases": 8, "n_both_empty": 0, "n_one_empty": 0,
  }
  return {
    "epoch": config.train.num_epochs,
    "test": {"raw": summary, "ema": summary},
    "val": {"raw": summary, "ema": summary},
    "method": config.method,
    "noise": {"kind": config.data.noise.kind},
  }


def record_pid(config, workdir: str) -> dict:
  """Writes the run's results and `pid.txt`, the process that trained it; takes long enough
  (0.5 s) that the runs overlap."""
  results = results_for(config)
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "pid.txt").write_text(str(os.getpid()))
  time.sleep(0.5)
  (path / "results.json").write_text(json.dumps(results))
  return results


def wait_for_stop(config, workdir: str) -> dict:
  """A run that trains until a stop signal, then stops as the trainer does (`Preempted`);
  `started` marks that its signal handlers are in place."""
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  with preemption.StopSignals() as signals:
    (path / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while signals.received is None and time.monotonic() < deadline:
      time.sleep(0.05)
  if signals.received is None:
    raise TimeoutError(f"{workdir}: no stop signal within 60 s")
  (path / "stopped").write_text(str(signals.received))
  raise Preempted(f"{workdir}: stopped by signal {signals.received}")
