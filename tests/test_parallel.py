"""Data parallel training: 4 CPU devices equal 1, two processes train as one, sharded input.

The multi-device checks run in subprocesses: the device count of a process is fixed when JAX
starts (`--xla_force_host_platform_device_count=4`), whatever this process has.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from metadcseg_jax import parallel
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLOW = os.environ.get("METADCSEG_SLOW") == "1"


def _env(devices: int | None = None) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


# ----------------------------------------------------------------------------- one process


def test_mesh_of_more_devices_than_exist_is_refused():
  # However many devices this process has (XLA_FLAGS may force several host devices): one
  # more than that is refused, -1 takes them all, and one process feeds every row.
  n = len(jax.devices())
  with pytest.raises(ConfigError, match=rf"config.mesh.data={n + 1}: this run has {n} devices"):
    parallel.make_parallel(ml_collections.ConfigDict({"data": n + 1}))
  par = parallel.make_parallel(ml_collections.ConfigDict({"data": -1}))
  rows = 8 * n
  assert par.num_devices == n and par.process_rows(rows) == (0, rows)
  assert par.input_shard(rows) == {"shard_index": 0, "num_shards": 1}


def test_distributed_settings_are_checked_before_joining():
  cfg = parallel.distributed_config()
  assert not parallel.initialize_distributed(cfg)  # auto, no cluster manager: one process
  cfg.coordinator_address = "127.0.0.1:1"
  with pytest.raises(ConfigError, match="num_processes >= 1"):
    parallel.initialize_distributed(cfg)
  cfg.initialize = "sometimes"
  with pytest.raises(ConfigError, match="auto, on or off"):
    parallel.initialize_distributed(cfg)


class _Source:
  """20 examples whose image is their index (the stream's order is read off the batch)."""

  name = "toy"

  def __len__(self):
    return 20

  def __getitem__(self, i):
    return {"image": np.full((2, 2, 1), i, np.float32), "index": np.int64(i)}


def _take(it, n):
  return [next(it)["index"] for _ in range(n)]


def test_shards_of_a_stream_are_the_rows_of_its_global_batches():
  kw = dict(batch_size=6, seed=3, augment=False, num_threads=0, prefetch=0)
  whole = _take(iter(pipeline.train_dataset(_Source(), **kw)), 7)  # 3 per epoch: 2+ epochs
  shards = [
    _take(iter(pipeline.train_dataset(_Source(), shard_index=k, num_shards=3, **kw)), 7)
    for k in range(3)
  ]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([s[step] for s in shards]), batch)
  # Epochs stay apart: each epoch's 3 batches are 18 distinct examples, reshuffled.
  assert len(set(np.concatenate(whole[:3]).tolist())) == 18
  assert not np.array_equal(np.concatenate(whole[:3]), np.concatenate(whole[3:6]))
  # A state saved by a 3-process run resumes a 1-process run at the same global batch.
  it3 = iter(pipeline.train_dataset(_Source(), shard_index=1, num_shards=3, **kw))
  _take(it3, 4)
  it1 = iter(pipeline.train_dataset(_Source(), **kw))
  it1.set_state(it3.get_state())
  np.testing.assert_array_equal(next(it1)["index"], whole[4])
  with pytest.raises(ConfigError, match="does not split into 4 equal shards"):
    pipeline.train_dataset(_Source(), shard_index=0, num_shards=4, **kw)


def test_worker_processes_give_the_same_batches():
  kw = dict(batch_size=4, seed=1, augment=False, num_threads=0, prefetch=0)
  plain = _take(iter(pipeline.train_dataset(_Source(), **kw)), 6)
  with_workers = _take(iter(pipeline.train_dataset(_Source(), num_workers=2, **kw)), 6)
  for a, b in zip(plain, with_workers):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- 4 devices

_FOUR_DEVICES = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import ml_collections
from metadcseg_jax import parallel
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.tools import parallel_check

out = {"devices": jax.device_count()}
par = parallel.make_parallel(ml_collections.ConfigDict({"data": -1}))
try:
  par.check_batch("config.train.batch_size", 6)
except ConfigError as e:
  out["error"] = str(e)
for method in sys.argv[2].split(","):
  out[method] = parallel_check.check(
    method, size=16, width=2, batch=8, steps=2, model="unet", x64=True
  )
json.dump(out, open(sys.argv[1], "w"))
"""


def _four_devices(methods, tmp_path):
  out = tmp_path / "four.json"
  proc = subprocess.run(
    [sys.executable, "-c", _FOUR_DEVICES, str(out), ",".join(methods)],
    env=_env(devices=4),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


def _assert_equal_to_one_device(result, methods):
  assert result["devices"] == 4
  for method in methods:
    errors = result[method]
    assert errors["devices"] == 4, method
    # float64: only the order of the sums differs between 1 and 4 devices, so every
    # difference is rounding; a sharding mistake (statistics per device, a per-device
    # normaliser, the meta-gradient from a quarter of the meta batch) is O(1e-2) or more.
    for kind in ("params", "batch_stats", "opt_state", "metrics", "maps"):
      assert errors[kind] < 1e-10, (method, kind, errors)


# Two networks with small-loss selection over the global batch, the meta step with DCD (the
# plain losses and the rest: METADCSEG_SLOW=1).
CORE_METHODS = ("jocor", "metadcseg")


def test_four_devices_equal_one_device_on_the_global_batch(tmp_path):
  result = _four_devices(CORE_METHODS, tmp_path)
  _assert_equal_to_one_device(result, CORE_METHODS)
  assert "does not divide over the 4 devices" in result["error"]
  assert "config.train.batch_size=6" in result["error"]


@pytest.mark.skipif(not SLOW, reason="every method on 4 devices (~10 min): METADCSEG_SLOW=1")
def test_every_method_on_four_devices_equals_one_device(tmp_path):
  from metadcseg_jax import methods  # pylint: disable=g-import-not-at-top

  others = tuple(m for m in methods.NAMES if m not in CORE_METHODS)
  _assert_equal_to_one_device(_four_devices(others, tmp_path), others)


# ----------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, data_dir, *extra):
  return [
    sys.executable,
    "-m",
    "experiments.main",
    "--config=experiments/configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.method=ce",
    "--config.train.diagnostics_every_steps=0",
    *extra,
  ]


def _losses(stderr: str) -> list[str]:
  return [
    l.split("loss ")[1].split()[0] for l in stderr.splitlines() if "step" in l and "loss " in l
  ]


def test_two_processes_train_as_one_and_resume_on_one(tmp_path):
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  port = _free_port()
  procs = [
    subprocess.Popen(
      _train_cmd(
        workdir,
        data_dir,
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}",
        "--config.distributed.timeout_s=120",
      ),
      env=_env(),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600))
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # One run: the same loss at every logged step on both processes, 2 devices in all.
  assert "data parallel over 2 devices (2 processes)" in outs[1][1]
  assert _losses(outs[0][1]) and _losses(outs[0][1]) == _losses(outs[1][1])
  results = json.loads((workdir / "results.json").read_text())
  assert results["epoch"] == 2
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  # Resumed by one process, with one more epoch: it starts at epoch 3 from the checkpoint.
  proc = subprocess.run(
    _train_cmd(workdir, data_dir, "--config.train.num_epochs=3"),
    env=_env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stderr and "at epoch 2" in proc.stderr
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert [r["epoch"] for r in train] == [1, 2, 3]
  assert np.isfinite([r["loss"] for r in train]).all()
  assert json.loads((workdir / "results.json").read_text())["epoch"] == 3
