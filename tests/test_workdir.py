"""One run per workdir, a log that survives a kill, the settings of every invocation kept."""

import json
import os
import socket
import subprocess
import sys

from absl import logging
import ml_collections
import pytest

from metadcseg_jax import files
from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.training import workdir as workdir_lib


def _lock_as(wd, pid, host=None):
  (wd.path / workdir_lib.LOCK_NAME).write_text(
    json.dumps(
      {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2026-01-01T00:00:00+00:00",
        "process_start": workdir_lib._process_start(pid),
      }
    )
  )


def test_second_run_on_a_busy_workdir_gets_a_one_line_error(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _lock_as(wd, holder.pid)
    with pytest.raises(WorkdirError, match=rf"in use by pid {holder.pid} on "):
      wd.acquire()
    with pytest.raises(WorkdirError) as e:
      workdir_lib.Workdir(tmp_path).acquire()
    assert "\n" not in str(e.value) and ".lock" in str(e.value)
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone: its stale lock is taken over, with a message.
  with wd.locked():
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert not (tmp_path / ".lock").exists()  # released on exit


def test_lock_on_another_host_is_respected(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  _lock_as(wd, 1, host="some-other-node")
  with pytest.raises(WorkdirError, match="some-other-node"):
    wd.acquire()


def test_lock_is_released_when_the_run_raises(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  with pytest.raises(RuntimeError):
    with wd.locked():
      raise RuntimeError("crash")
  wd.acquire()
  wd.release()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a folder")
  with pytest.raises(WorkdirError, match="is not a directory"):
    workdir_lib.Workdir(path)


def test_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, monkeypatch):
  log = workdir_lib.MetricsLog(tmp_path / "metrics.jsonl")
  for epoch in (1, 2, 3):
    log.append({"epoch": epoch, "split": "train", "loss": 1.0 / epoch})
  with log.path.open("a") as f:
    f.write('{"epoch": 4, "split": "tr')  # killed while writing
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  assert [r["epoch"] for r in log.read()] == [1, 2, 3]
  assert len(warnings) == 1 and str(log.path) in warnings[0] and "last line" in warnings[0]
  log.truncate_after(2)
  assert [json.loads(l)["epoch"] for l in log.path.read_text().splitlines()] == [1, 2]
  log.append({"epoch": 3, "split": "train"})
  assert [r["epoch"] for r in log.read()] == [1, 2, 3]


def test_every_invocation_is_recorded_and_the_first_kept(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  config = ml_collections.ConfigDict({"model": {"width": 4}, "method": "ce"})
  wd.record_config(config, ["metadcseg-train", "--config.model.width=4"])
  config.model.width = 8
  wd.record_config(config, ["metadcseg-train", "--config.model.width=8"])
  assert wd.first_config()["model"]["width"] == 4
  history = [json.loads(l) for l in (tmp_path / "config_history.jsonl").read_text().splitlines()]
  assert [h["config"]["model"]["width"] for h in history] == [4, 8]
  assert history[1]["argv"][-1] == "--config.model.width=8" and history[0]["host"]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_atomic(tmp_path / "x.json", "{}")
  finally:
    os.umask(old)
  assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
  assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left


def test_remove_new_removes_only_what_appeared(tmp_path):
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "keep.txt").write_text("x")
  before = files.snapshot(tmp_path)
  (tmp_path / "old" / "new.txt").write_text("y")
  (tmp_path / "half" / "deep").mkdir(parents=True)
  (tmp_path / "half" / "deep" / "f").write_text("z")
  files.remove_new(tmp_path, before)
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
    "old",
    "old/keep.txt",
  ]
