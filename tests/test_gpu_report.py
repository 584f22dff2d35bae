"""The GPU report: its tiny setting end to end (every section written, finite numbers); a row
that runs out of memory and a section that fails recorded while the rest go on; sections
skipped for lack of time or data saying so; the report on disk while it runs; the settings from
the flags; the projection's arithmetic."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.configs import kvasir_seg
from metadcseg_jax import methods
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.tools import gpu_report
from metadcseg_jax.tools import precision as meta_precision
from metadcseg_jax.tools import throughput


ROOT = pathlib.Path(__file__).resolve().parents[1]
# The precision section's own measurement compiles six U-Net++ meta functions (about two
# CPU-minutes at any image size): CI leaves it off, METADCSEG_SLOW=1 runs it.
SLOW = os.environ.get("METADCSEG_SLOW") == "1"
# XLA's quickest compiles (as methods.base.RUN_ONCE_COMPILE): compiling is nearly all the run.
QUICK_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _positive(*values):
  return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  """The command in its tiny setting, run once as a user runs it (flags, entry point, helper
  processes, every section) and shared by the tests below."""
  out = tmp_path_factory.mktemp("gpu_report")
  data_dir = tmp_path_factory.mktemp("data")
  args = [f"--output={out}", "--tiny", f"--data_dir={data_dir}"]
  args += [] if SLOW else ["--precision_s=0"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": QUICK_XLA}
  run = subprocess.run(
    [sys.executable, "-m", "experiments.gpu_report", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return out, json.loads((out / "report.json").read_text()), args


def test_the_tiny_report_has_every_section_with_finite_numbers(tiny_report):
  out, data, args = tiny_report
  sections = {s["name"]: s for s in data["sections"]}
  assert list(sections) == list(gpu_report.SECTIONS)
  assert data["header"]["finished"] and data["header"]["device"]
  assert data["header"]["command"] == "python -m experiments.gpu_report " + " ".join(args)
  ran = [s for s in sections.values() if s["status"] != "off"]
  assert all(_positive(s["wall_s"]) for s in ran) and len(ran) == (4 if SLOW else 3)

  thr = sections["throughput"]
  assert thr["status"] == "done"
  assert [r["method"] for r in thr["rows"]] == list(gpu_report.tiny_settings().methods)
  for r in thr["rows"]:
    assert _positive(r["seconds"], r["images_per_s"], r["compile_s"], r["gflop"], r["wall_s"])

  prec = sections["precision"]
  if SLOW:
    assert prec["status"] == "done"
    assert len(prec["rows"]) == 2 * len(meta_precision.SETTINGS)  # at step 0, after a step
    assert all(_positive(*(r[k] for k in meta_precision.FIELDS)) for r in prec["rows"])
  else:
    assert prec["status"] == "off"

  (row,) = sections["trainer"]["rows"]
  assert sections["trainer"]["status"] == "done" and row["method"] == "ce"
  assert _positive(row["epochs"], row["step"], row["run"], row["run_share"])

  kv = sections["kvasir"]
  assert kv["status"] == "done" and kv["setting"]["dataset"] == "synthetic"
  assert [e["phase"] for e in kv["epochs"]] == ["warmup", "main"]
  assert all(_positive(e["wall_s"], e["images_per_s"]) for e in kv["epochs"])
  proj = kv["projection"]
  assert [r["method"] for r in proj["rows"]] == ["ce", "l2b", "metadcseg"]
  assert _positive(proj["total_s"], *(r["per_run_s"] for r in proj["rows"]))
  assert proj["epochs"] == 140 and proj["warmup_epochs"] == 10  # the paper's, not the run's

  md = (out / "report.md").read_text()
  for i, name in enumerate(gpu_report.SECTIONS, start=1):
    assert f"## {i}. {gpu_report.TITLES[name]}" in md
  assert "The whole table:" in md and "nan" not in md and "unfinished" not in md


def _stand_in_precision(size, width, channels, batch):
  del size, width, channels, batch
  return {
    f"{label}, {state}": {k: 1e-3 for k in meta_precision.FIELDS}
    for label, *_ in meta_precision.SETTINGS
    for state in ("step 0", "step 1")
  }


def test_a_row_out_of_memory_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
  def time_step(config, repeats, phase=None):
    if config.train.batch_size == 4:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
    return {"seconds": 0.01, "compile_s": 1.0, "images_per_s": 200.0, "peak_bytes": None}

  monkeypatch.setattr(throughput, "time_step", time_step)
  monkeypatch.setattr(throughput, "cpu_flops", lambda config: 2e9)
  tiny = gpu_report.tiny_settings()
  settings = dataclasses.replace(
    tiny,
    batches=(2, 4),
    flops_processes=0,
    kvasir_dir=str(tmp_path / "absent"),
    data_dir=str(tmp_path / "data"),
    min_s={**tiny.min_s, "trainer": 1e6},
  )
  data = gpu_report.run(
    settings,
    output=tmp_path,
    command="x",
    kvasir_config=kvasir_seg.get_config(),
    precision=_stand_in_precision,
  )
  thr, prec, trainer, kv = data["sections"]
  assert thr["status"] == "partial"
  for r in thr["rows"]:
    if r["batch"] == 4:
      assert r["status"] == "failed" and r["note"].startswith("out of device memory"), r
    else:
      assert r["status"] == "done" and r["gflop"] == 2.0, r
  assert prec["status"] == "done" and len(prec["rows"]) == 2 * len(meta_precision.SETTINGS)
  assert trainer["status"] == "skipped"
  assert trainer["note"].startswith("skipped for lack of time")
  assert kv["status"] == "skipped" and "no Kvasir-SEG folder at" in kv["note"]
  md = (tmp_path / "report.md").read_text()
  assert "out of device memory" in md and "| float32, highest, step 1 | 1.00e-03 |" in md
  assert "skipped for lack of time" in md and "no Kvasir-SEG folder at" in md


def test_a_failing_section_is_recorded_the_next_runs_and_the_report_is_written_as_it_goes(
  tmp_path,
):
  out = tmp_path / "report"
  seen = {}

  def precision(size, width, channels, batch):
    # While a section runs, the report on disk already has it, marked unfinished.
    seen["md"] = (out / "report.md").read_text()
    raise RuntimeError("boom")

  settings = dataclasses.replace(
    gpu_report.tiny_settings(),
    stand_in=False,
    data_dir=str(tmp_path / "data"),
    budgets={"throughput": 0.0, "precision": 30.0, "trainer": 0.0, "kvasir": 30.0},
  )
  data = gpu_report.run(
    settings, output=out, command="x", kvasir_config=kvasir_seg.get_config(), precision=precision
  )
  status = {s["name"]: (s["status"], s["note"]) for s in data["sections"]}
  assert status["throughput"] == ("off", "off (--throughput_s=0)")
  assert status["precision"] == ("failed", "failed: RuntimeError: boom")
  assert status["kvasir"] == ("skipped", "skipped: no Kvasir-SEG folder given (--kvasir_dir)")
  assert "## 2. " in seen["md"] and "unfinished: the run ended during this section" in seen["md"]
  md = (out / "report.md").read_text()
  assert "failed: RuntimeError: boom" in md and "RuntimeError" in data["sections"][1]["traceback"]
  assert "unfinished" not in md and "finished in" in md


def test_settings_from_flags():
  s = gpu_report.settings_for(False, {"batches": ["8", "16"], "methods": ["ce"], "kvasir_s": 5})
  assert (s.batches, s.methods, s.budgets["kvasir"]) == ((8, 16), ("ce",), 5.0)
  assert s.budgets["throughput"] == gpu_report.Settings().budgets["throughput"]
  assert sum(gpu_report.Settings().budgets.values()) < 600  # ten minutes, with the start
  assert set(gpu_report.DEFAULT_METHODS) == set(methods.NAMES)
  for bad in ({"methods": ["nope"]}, {"colour": 1}, {"table": "nope"}):
    with pytest.raises(ConfigError):
      gpu_report.settings_for(True, bad)


def test_projection_counts_each_phase_at_its_epoch_time():
  epochs = [
    {"epoch": 1, "phase": "warmup", "wall_s": 50.0, "first_of_phase": True},
    {"epoch": 2, "phase": "warmup", "wall_s": 2.0, "first_of_phase": False},
    {"epoch": 3, "phase": "main", "wall_s": 70.0, "first_of_phase": True},
    {"epoch": 4, "phase": "main", "wall_s": 5.0, "first_of_phase": False},
    {"epoch": 5, "phase": "main", "wall_s": 7.0, "first_of_phase": False},
  ]
  settings = gpu_report.Settings()
  p = gpu_report._projection(settings, epochs, paper_epochs=140, paper_warmup=10)
  per_run = {r["method"]: r["per_run_s"] for r in p["rows"]}
  # The compiling epochs are left out; a plain method runs every epoch at the warm-up's time.
  assert per_run == {
    "ce": 140 * 2.0,
    "l2b": 10 * 2.0 + 130 * 6.0,
    "metadcseg": 10 * 2.0 + 130 * 6.0,
  }
  runs = 4 * 3  # the paper's table: 4 noise levels, 3 seeds
  assert p["total_s"] == pytest.approx(runs * sum(per_run.values()))
  assert p["notes"] == []
  # Only the first, compiling, warm-up epoch: an upper bound, said so; meta epochs borrowed.
  p = gpu_report._projection(settings, epochs[:1], paper_epochs=140, paper_warmup=10)
  assert p["rows"][2]["per_run_s"] == 140 * 50.0 and len(p["notes"]) == 3
