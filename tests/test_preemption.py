"""Stopping and resuming without losing work: stop signals, step checkpoints, a full disk, one
data folder shared by several processes, a benchmark that carries on past a failing run.

The trainer itself is run in tests/test_train.py (it reuses that file's uninterrupted run);
here the parts, and the processes, are tested alone.
"""

import errno
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import types

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import tiny
from metadcseg_jax import cli
from metadcseg_jax import files
from metadcseg_jax import parallel
from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import runner
from metadcseg_jax.data import pipeline
from metadcseg_jax.data.noise import cache as noise_cache
from metadcseg_jax.errors import DiskFullError
from metadcseg_jax.errors import EXIT_RESUMABLE
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.errors import Preempted
from metadcseg_jax.training import checkpoint
from metadcseg_jax.training import preemption
from metadcseg_jax.training import train
from metadcseg_jax.training import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FULL = "RESOURCE_EXHAUSTED: Failed to write 29604 bytes to file 7: No space left on device"


# ----------------------------------------------------------------------------- signals


def test_first_signal_is_recorded_and_a_second_acts_as_before():
  seen = []
  sigint = signal.getsignal(signal.SIGINT)
  before = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
  try:
    with preemption.StopSignals() as stop:
      assert stop.received is None
      signal.raise_signal(signal.SIGUSR1)
      assert stop.received == signal.SIGUSR1 and stop.name == "SIGUSR1" and not seen
      signal.raise_signal(signal.SIGUSR1)  # the handler from before is back at once
      assert seen == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGINT) is sigint  # untouched ones put back on exit
  finally:
    signal.signal(signal.SIGUSR1, before)


def test_schedule_counts_steps_and_agrees_over_processes(monkeypatch):
  stop = preemption.StopSignals()
  schedule = preemption.Schedule(every_steps=3, every_minutes=0, stop=stop)
  assert [schedule.check(s) for s in (1, 2, 3)] == [(False, False), (False, False), (True, False)]
  # Another process received the signal: this one saves and stops at the same step.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  gathered = []

  def allgather(local):
    gathered.append(np.asarray(local).tolist())
    return np.stack([np.asarray(local), np.array([1, 0], np.int32)])

  monkeypatch.setattr(parallel.multihost_utils, "process_allgather", allgather)
  assert schedule.check(4) == (True, True) and gathered == [[0, 0]]
  timed = preemption.Schedule(every_steps=0, every_minutes=1e-9, stop=stop)
  assert timed.check(1) == (True, True)


def test_step_metrics_survive_the_checkpoint_bit_for_bit():
  rng = np.random.default_rng(0)
  stacked = {"loss": rng.standard_normal(7).astype(np.float32), "n": np.arange(7, dtype=np.int32)}
  back = preemption.metrics_from_json(json.loads(json.dumps(preemption.metrics_to_json(stacked))))
  for k, v in stacked.items():
    assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes()


def test_a_stopped_run_exits_75_with_one_line(monkeypatch, capsys):
  def main(argv):
    raise Preempted("stopped by SIGTERM after step 7 (epoch 2, step 2/5), checkpoint /x")

  monkeypatch.setattr(sys, "argv", ["metadcseg-train"])
  monkeypatch.delenv("METADCSEG_DEBUG", raising=False)
  handler = absl_logging.get_absl_handler()  # cli.run adds a filter: put the list back after
  monkeypatch.setattr(handler, "filters", list(handler.filters))
  with pytest.raises(SystemExit) as e:
    cli.run(main)
  assert e.value.code == EXIT_RESUMABLE == 75
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["stopped: stopped by SIGTERM after step 7 (epoch 2, step 2/5), checkpoint /x"]


# ----------------------------------------------------------------------------- checkpoints


def _config():
  return ml_collections.ConfigDict({"model": {"width": 4}})


def _state(value=0.0):
  return {"params": {"kernel": jnp.full((3, 3), value)}, "step": jnp.int32(value)}


def _partial(step, offset, epoch):
  metrics = preemption.metrics_to_json({"loss": np.arange(offset, dtype=np.float32)})
  return {"epoch": epoch, "offset": offset, "step": step, "metrics": metrics}


def test_step_checkpoints_resume_inside_an_epoch_and_go_with_the_next_epoch(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True)
  ckpt.save(1, _state(5.0), {"train": {"at": 5}})
  ckpt.save_step(7, _state(7.0), {"train": {"at": 7}}, _partial(7, 2, 1))
  ckpt.close()
  again = checkpoint.Checkpointer(
    tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True
  )
  point = again.restore_resume_point(jax.eval_shape(_state))
  assert (point.epoch, point.name, point.data) == (1, "step 7", {"train": {"at": 7}})
  assert point.partial["offset"] == 2 and int(point.state["step"]) == 7
  assert again.restore_latest(jax.eval_shape(_state))[0] == 1  # epoch checkpoints alone
  again.save(2, _state(10.0), {"train": {"at": 10}})
  again.close()  # the epoch checkpoint supersedes the step one: removed, with its folder
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
  third = checkpoint.Checkpointer(
    tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True
  )
  point = third.restore_resume_point(jax.eval_shape(_state))
  assert (point.epoch, point.partial, point.name) == (2, None, "epoch 2")
  third.close()


def test_a_damaged_step_checkpoint_falls_back_to_the_epoch_one(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True)
  ckpt.save(1, _state(5.0), {"train": {"at": 5}})
  ckpt.save_step(8, _state(8.0), {"train": {"at": 8}}, _partial(8, 3, 1), wait=True)
  ckpt.close()
  (tmp_path / "steps" / "8" / "state" / "_METADATA").unlink()
  again = checkpoint.Checkpointer(
    tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True
  )
  point = again.restore_resume_point(jax.eval_shape(_state))
  assert (point.epoch, point.partial) == (1, None)
  assert [p.name.split("-")[:2] for p in (tmp_path / "damaged").iterdir()] == [["step", "8"]]
  again.close()


def test_a_full_disk_during_a_save_is_one_error_and_the_previous_checkpoint_restores(
  tmp_path, monkeypatch
):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True)
  ckpt.save(1, _state(5.0), {"train": {"at": 5}})
  ckpt.wait()

  def full(self, step, args=None):
    half = pathlib.Path(self.directory) / f"{step}{checkpoint.TMP_SUFFIX}" / "state"
    half.mkdir(parents=True)
    (half / "d").write_bytes(b"\0" * 100)
    raise ValueError(f'{FULL} [os_error_code=28] writing "{half}"')

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full)
  for save in (lambda: ckpt.save(2, _state(10.0), {}), lambda: ckpt.save_step(7, _state(), {}, {})):
    with pytest.raises(DiskFullError) as e:
      save()
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message and " free of " in message
    assert "rerun the same command" in message
  ckpt.abandon()
  monkeypatch.undo()
  assert not list(tmp_path.rglob(f"*{checkpoint.TMP_SUFFIX}*"))  # nothing half-written left
  again = checkpoint.Checkpointer(
    tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True
  )
  point = again.restore_resume_point(jax.eval_shape(_state))
  assert point.epoch == 1 and float(point.state["params"]["kernel"][0, 0]) == 5.0
  again.close()


SECOND_SIGNAL = """
import os, pathlib, signal, sys
import jax.numpy as jnp, ml_collections
from metadcseg_jax.training import checkpoint, preemption
folder = pathlib.Path(sys.argv[1])
ckpt = checkpoint.Checkpointer(folder, keep=2, config=ml_collections.ConfigDict({"w": 1}),
                               steps_per_epoch=5, writer=True)
state = {"kernel": jnp.ones((256, 1024))}
ckpt.save(1, state, {"train": {}})
ckpt.wait()
original = checkpoint.ocp.CheckpointManager.save
def save_then_signal(self, *args, **kwargs):
  original(self, *args, **kwargs)
  os.kill(os.getpid(), signal.SIGTERM)  # the second signal, while the step save is written
checkpoint.ocp.CheckpointManager.save = save_then_signal
with preemption.StopSignals() as stop:
  os.kill(os.getpid(), signal.SIGTERM)  # the first: recorded
  assert stop.received == signal.SIGTERM
  ckpt.save_step(7, state, {"train": {}}, {"epoch": 1, "offset": 2, "step": 7, "metrics": {}},
                 wait=True)
print("not reached")
"""


def test_a_second_signal_during_the_save_leaves_the_previous_checkpoint(tmp_path):
  run = subprocess.run(
    [sys.executable, "-c", SECOND_SIGNAL, str(tmp_path)], capture_output=True, text=True, cwd=ROOT
  )
  assert run.returncode == -signal.SIGTERM, run.stderr[-2000:]
  assert "not reached" not in run.stdout
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, config=_config(), steps_per_epoch=5, writer=True)
  abstract = {"kernel": jax.ShapeDtypeStruct((256, 1024), jnp.float32)}
  point = ckpt.restore_resume_point(abstract)
  assert point.epoch == 1 or point.name == "step 7"  # the previous one, or the new one whole
  np.testing.assert_array_equal(point.state["kernel"], np.ones((256, 1024)))
  ckpt.close()
  assert not list(tmp_path.rglob(f"*{checkpoint.TMP_SUFFIX}*"))  # cleared on opening


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_leaves_the_metrics_log_whole(tmp_path, monkeypatch):
  log = workdir_lib.MetricsLog(tmp_path / "metrics.jsonl")
  log.append({"epoch": 1, "split": "train", "loss": 1.0})
  before = log.path.read_bytes()
  real_write = os.write

  def short_write(fd, data):
    real_write(fd, data[:5])
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(workdir_lib.os, "write", short_write)
  with pytest.raises(DiskFullError, match=r"no space left writing .*metrics\.jsonl \(.* free"):
    log.append({"epoch": 2, "split": "train", "loss": 0.5})
  monkeypatch.undo()
  assert log.path.read_bytes() == before  # no torn line
  assert files.is_disk_full(ValueError(FULL)) and not files.is_disk_full(
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
  )


def test_a_full_disk_while_writing_a_figure_stops_and_removes_it(tmp_path, monkeypatch):
  def half_panel(path, *args, **kwargs):
    pathlib.Path(path).write_bytes(b"\x89PNG half")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(train.figures, "write_panel", half_panel)
  compiled = types.SimpleNamespace(method=types.SimpleNamespace(figure_name=None), predictor=None)
  config = ml_collections.ConfigDict({"train": {"num_panel_images": 2, "eval_batch_size": 2}})
  wd = workdir_lib.Workdir(tmp_path)
  with pytest.raises(DiskFullError, match="panel.png"):
    train._write_figures(compiled, None, None, config, wd)
  assert not (tmp_path / "panel.png").exists()


# ----------------------------------------------------------------------------- the benchmark


def test_a_failing_run_does_not_stop_the_benchmark_and_a_signal_does(tmp_path, monkeypatch):
  calls = []

  def fake_train(config, workdir):
    calls.append((config.method, config.seed))
    if (config.method, config.seed) == ("ce", 0):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")
    if (config.method, config.seed) == ("l2b", 0):
      raise NonFiniteLossError("non-finite training loss at step 7 (epoch 2)")
    if config.seed == 2:
      raise Preempted("stopped by SIGTERM after step 3 (epoch 1, step 3/5)")
    results = {
      "epoch": config.train.num_epochs,
      "test": {p: {"dice": 0.5, "iou": 0.4, "hd95": 3.0} for p in ("raw", "ema")},
      "val": {p: {"dice": 0.5, "iou": 0.4, "hd95": 3.0} for p in ("raw", "ema")},
      "noise": {"seed": config.data.noise.seed},
    }
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    pathlib.Path(workdir, "results.json").write_text(json.dumps(results))
    return results

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  config = tiny.get_config()
  kwargs = dict(
    rows=presets.method_rows(("ce", "l2b")), noises=["l2b40"], labels="per_seed", echo=print
  )
  with pytest.raises(runner.RunsFailedError, match=r"2 of 4 runs failed \(1 diverged\)"):
    runner.run_benchmark(config, tmp_path, seeds=[0, 1], **kwargs)
  assert calls == [("ce", 0), ("l2b", 0), ("ce", 1), ("l2b", 1)]  # the others ran
  md = (tmp_path / "benchmark.md").read_text()
  assert "l2b40/ce/seed0: RuntimeError: RESOURCE_EXHAUSTED: Out of memory" in md
  assert "l2b40/l2b/seed0: non-finite training loss at step 7" in md
  calls.clear()
  with pytest.raises(Preempted):  # seed 2 is stopped by a signal: nothing after it starts
    runner.run_benchmark(config, tmp_path, seeds=[0, 2, 1], **kwargs)
  assert calls == [("ce", 0), ("l2b", 0), ("ce", 2)]  # the failed runs retried first
  assert "l2b40/ce/seed0" in (tmp_path / "benchmark.md").read_text()


# ----------------------------------------------------------------------------- one data folder

BUILD = """
import hashlib, json, sys
import jax, jax.numpy as jnp, numpy as np
from experiments.configs import tiny
from metadcseg_jax.data import pipeline
from metadcseg_jax.training import train
config = tiny.get_config()
config.data.data_dir = sys.argv[1]
train.enable_compilation_cache(config.data.data_dir)
splits = pipeline.prepare_data(config.data, meta_batch_size=2)
digest = hashlib.sha256()
for records in (splits.train, splits.meta, splits.val, splits.test):
  for r in records:
    for key in sorted(r):
      digest.update(np.ascontiguousarray(r[key]).tobytes())
y = jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8)))
print(json.dumps({"data": digest.hexdigest(), "jit": float(y.sum())}))
"""


def _digest(splits) -> str:
  digest = hashlib.sha256()
  for records in (splits.train, splits.meta, splits.val, splits.test):
    for r in records:
      for key in sorted(r):
        digest.update(np.ascontiguousarray(r[key]).tobytes())
  return digest.hexdigest()


def test_two_runs_build_one_fresh_data_folder_at_once_and_a_torn_cache_is_rebuilt(
  tmp_path, monkeypatch
):
  data_dir = tmp_path / "data"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  runs = [
    subprocess.Popen(
      [sys.executable, "-c", BUILD, str(data_dir)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=env,
    )
    for _ in range(2)
  ]
  outs = [r.communicate(timeout=600) for r in runs]
  for r, (out, err) in zip(runs, outs):
    assert r.returncode == 0, err[-3000:]
  first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
  assert first == second
  assert any((data_dir / train.COMPILE_CACHE).iterdir())
  # A noisy-label cache file cut short (a kill, a full disk) is named and rebuilt, identical.
  (cached,) = (data_dir / "noisy_labels").rglob("noisy_*.npy")
  cached.write_bytes(cached.read_bytes()[:100])
  lines = []
  monkeypatch.setattr(noise_cache.logging, "info", lambda msg, *a: lines.append(msg % a))
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  splits = pipeline.prepare_data(config.data, meta_batch_size=2)
  assert any(f"Building noisy labels {cached}" in line and "cannot read" in line for line in lines)
  assert _digest(splits) == first["data"]
