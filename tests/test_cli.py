"""The installed console scripts, run as a new user would: the quick start end to end, resume,
the corruption and benchmark commands, and user errors as one line.

Each command is a subprocess of the console script pip installed beside this interpreter. They
share one data folder, so JAX's persistent compilation cache under it serves the later runs.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "configs" / "tiny.py")


def _script(name: str) -> str:
  path = pathlib.Path(sys.executable).parent / name
  found = str(path) if path.exists() else shutil.which(name)
  assert found, f"{name} is not installed: pip install -e . first"
  return found


@pytest.fixture(scope="module")
def data_dir(run_data_dir):
  return run_data_dir


def _run(args, *, env=None, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
  return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_start(data_dir, tmp_path_factory):
  """The quick start on the tiny config, with every imported module listed (-X importtime)."""
  workdir = tmp_path_factory.mktemp("quick") / "run"
  out = _run(
    [
      _script("metadcseg-train"),
      f"--config={TINY}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
    ],
    env={"PYTHONPROFILEIMPORTTIME": "1"},
  )
  return workdir, out


def test_quick_start_writes_every_output(quick_start):
  workdir, out = quick_start
  assert out.returncode == 0, out.stderr[-3000:]
  for name in (
    "results.json",
    "metrics.jsonl",
    "panel.png",
    "curves.png",
    "dcd.png",
    "config.json",
    "config_history.jsonl",
    "data_info.json",
  ):
    assert (workdir / name).stat().st_size > 0, name
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  assert "final test Dice" in out.stdout and str(workdir / "results.json") in out.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert results["epoch"] == 2 and 0.0 <= results["test"]["ema"]["dice"] <= 1.0
  # The progress lines: epoch, step, loss, images/s, time left.
  assert "epoch 2/2 step" in out.stderr and "img/s" in out.stderr and "left" in out.stderr


def test_quick_start_imports_only_declared_dependencies(quick_start, deps):
  _, out = quick_start
  modules = deps.modules_from_importtime(out.stderr)
  assert "metadcseg_jax.train" in modules and "orbax.checkpoint" in modules
  assert deps.undeclared(modules) == {}


def test_second_invocation_resumes_instead_of_retraining(quick_start, data_dir):
  workdir, first = quick_start
  before = (workdir / "results.json").read_text()
  out = _run(
    [
      _script("metadcseg-train"),
      f"--config={TINY}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr and "at epoch 2" in out.stderr
  assert "epoch 1/2" not in out.stderr  # nothing trained again
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records if r["split"] == "train"] == [1, 2]
  assert json.loads((workdir / "results.json").read_text())["test"] == json.loads(before)["test"]
  assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 2


def test_corrupt_command(data_dir):
  out = _run(
    [
      _script("metadcseg-corrupt"),
      f"--config={TINY}",
      f"--config.data.data_dir={data_dir}",
      "--kinds=l2b20,l2b60",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| l2b")]
  assert [r.split("|")[1].strip() for r in rows] == ["l2b20", "l2b60"]
  assert float(rows[1].split("|")[3]) > float(rows[0].split("|")[3])


def test_benchmark_command(data_dir, tmp_path):
  """`metadcseg-benchmark` on its smallest grid: one method, clean labels, one seed; a rerun
  finds the run finished and trains nothing."""
  args = [
    _script("metadcseg-benchmark"),
    f"--config={TINY}",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    "--methods=ce",
    "--noise=none",
    "--seeds=0",
  ]
  out = _run(args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "none" / "ce" / "seed0" / "results.json").is_file()
  assert (tmp_path / "dice_vs_noise.png").stat().st_size > 0
  table = (tmp_path / "benchmark.md").read_text()
  assert "| ce | " in table and "--methods=ce" in table
  cells = json.loads((tmp_path / "benchmark.json").read_text())["cells"]
  assert [(c["noise"], c["label"], c["seeds"]) for c in cells] == [("none", "ce", [0])]
  mtime = (tmp_path / "none" / "ce" / "seed0" / "results.json").stat().st_mtime_ns
  again = _run(args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (tmp_path / "none" / "ce" / "seed0" / "results.json").stat().st_mtime_ns == mtime


def test_step_benchmark_command():
  out = _run(
    [
      _script("metadcseg-bench"),
      "--sizes=32",
      "--widths=4",
      "--channels=1",
      "--steps=ce,l2b_jvp",
      "--repeats=1",
      "--batch=2",
      "--notorch",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  row = [l for l in out.stdout.splitlines() if l.startswith("| 32 | 4 | 1 |")]
  assert len(row) == 1 and all(float(c) > 0 for c in row[0].strip("|").split("|")[3:])
  assert "meta/plain ratio:" in out.stdout


@pytest.mark.parametrize(
  "extra, message",
  [
    (
      ["--config.train.lrr=3"],
      "error: unknown config setting in --config.train.lrr=3 (did you "
      "mean \"lr\" instead of \"lrr\"?)",
    ),
    (["--config.train.batch_size=0"], "error: config.train.batch_size must be >= 1, got 0"),
    (["--config.data.name=kvasir"], "error: config.data.name must be one of ('synthetic', "),
    (["--config.train.lr=abc"], "error: flag --config.train.lr=abc: could not convert"),
  ],
)
def test_user_errors_are_one_line(extra, message, tmp_path):
  out = _run(
    [_script("metadcseg-train"), f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *extra]
  )
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines[0].startswith(message), out.stderr
  assert "Traceback" not in out.stderr and len(lines) <= 2


def test_workdir_errors_are_one_line_and_debug_keeps_the_traceback(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  out = _run([_script("metadcseg-train"), f"--config={TINY}", f"--workdir={not_a_dir}"])
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert (
    out.stderr.strip() == f"error: workdir {not_a_dir} exists and is not a directory: pass a folder"
  )
  out = _run(
    [_script("metadcseg-train"), f"--config={TINY}", f"--workdir={not_a_dir}", "--verbosity=1"]
  )
  assert out.returncode != 0 and "Traceback" in out.stderr and "WorkdirError" in out.stderr


def test_a_busy_workdir_is_refused_with_the_holder_named(tmp_path):
  workdir = tmp_path / "busy"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    (workdir / ".lock").write_text(
      json.dumps(
        {"pid": holder.pid, "host": os.uname().nodename, "started": "now", "process_start": None}
      )
    )
    out = _run([_script("metadcseg-train"), f"--config={TINY}", f"--workdir={workdir}"])
  finally:
    holder.kill()
    holder.wait()
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert f"is in use by pid {holder.pid}" in out.stderr
  assert not (workdir / "metrics.jsonl").exists()  # the busy run's files untouched
