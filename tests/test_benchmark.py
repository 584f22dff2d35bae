"""Tests of metadcseg_jax/benchmark.py: the sweep table, resume, the corruption table.

No training: runs are hand-written results.json files, and the trainer is monkeypatched.
"""

import json
import math
import pathlib

import numpy as np
import pytest

from experiments.configs import tiny
from metadcseg_jax import benchmark
from metadcseg_jax import noise
from metadcseg_jax import train
from metadcseg_jax.data import pipeline


def _results(dice, iou, hd95, *, method="ce", epoch=2, raw_dice=None):
  summary = {
    "dice": dice,
    "iou": iou,
    "miou": (iou + 0.9) / 2,
    "hd": hd95 + 1.0,
    "hd95": hd95,
    "asd": hd95 / 3,
    "n_cases": 8,
    "n_both_empty": 0,
    "n_one_empty": 1,
  }
  raw = dict(summary, dice=dice if raw_dice is None else raw_dice)
  return {
    "epoch": epoch,
    "test": {"raw": raw, "ema": summary},
    "method": method,
    "dataset": "synthetic_s32",
    "noise": {"kind": "?"},
    "workdir": "elsewhere",
  }


def _write_run(root, noise, method, seed, results):
  d = benchmark.run_dir(root, noise, method, seed)
  d.mkdir(parents=True, exist_ok=True)
  (d / "results.json").write_text(json.dumps(results))
  return d


@pytest.fixture
def fake_sweep(tmp_path):
  """l2b40/ce: 3 seeds; l2b40/metadcseg: 2 seeds; none/ce: 1 seed; plus noise to ignore."""
  _write_run(tmp_path, "l2b40", "ce", 0, _results(0.60, 0.50, 10.0))
  _write_run(tmp_path, "l2b40", "ce", 1, _results(0.70, 0.55, 12.0))
  _write_run(tmp_path, "l2b40", "ce", 2, _results(0.80, 0.60, 20.0))
  _write_run(tmp_path, "l2b40", "metadcseg", 0, _results(0.90, 0.81, 4.0, method="metadcseg"))
  _write_run(tmp_path, "l2b40", "metadcseg", 3, _results(0.86, 0.77, 6.0, method="metadcseg"))
  _write_run(tmp_path, "none", "ce", 0, _results(0.95, 0.91, 2.0, raw_dice=0.5))
  (tmp_path / "none" / "ce" / "seed1").mkdir()  # unfinished: no results.json
  (tmp_path / "none" / "ce" / "notes").mkdir()  # not a seed folder
  (tmp_path / "none" / "ce" / "notes" / "results.json").write_text("{}")
  return tmp_path


def test_collect_means_and_sample_std(fake_sweep):
  rows = benchmark.collect(fake_sweep)
  # Noise order none < l2b40 (NOISE_ORDER), methods ce < metadcseg (METHOD_ORDER).
  assert [(r["noise"], r["method"]) for r in rows] == [
    ("none", "ce"),
    ("l2b40", "ce"),
    ("l2b40", "metadcseg"),
  ]
  none_ce, ce, meta = rows
  assert ce["seeds"] == [0, 1, 2] and meta["seeds"] == [0, 3] and none_ce["seeds"] == [0]
  # By hand: mean(0.6, 0.7, 0.8) = 0.7, sample std = sqrt((0.01 + 0 + 0.01) / 2) = 0.1.
  assert ce["ema"]["dice"]["mean"] == pytest.approx(0.7)
  assert ce["ema"]["dice"]["std"] == pytest.approx(0.1)
  # HD95 (10, 12, 20): mean 14, deviations (-4, -2, 6): sqrt(56 / 2).
  assert ce["ema"]["hd95"]["mean"] == pytest.approx(14.0)
  assert ce["ema"]["hd95"]["std"] == pytest.approx(math.sqrt(28.0))
  # Two seeds: mean 0.88, sample std |0.90 - 0.86| / sqrt(2).
  assert meta["ema"]["dice"]["mean"] == pytest.approx(0.88)
  assert meta["ema"]["dice"]["std"] == pytest.approx(0.04 / math.sqrt(2))
  assert meta["ema"]["iou"]["values"] == pytest.approx([0.81, 0.77])
  # One seed: no std; raw and EMA kept apart.
  assert none_ce["ema"]["dice"]["std"] is None
  assert none_ce["raw"]["dice"]["mean"] == pytest.approx(0.5)
  assert none_ce["ema"]["dice"]["mean"] == pytest.approx(0.95)


def test_collect_filters_and_orders(fake_sweep):
  rows = benchmark.collect(fake_sweep, methods=["metadcseg", "ce"], noises=["l2b40"], seeds=[0, 1])
  assert [(r["method"], r["seeds"]) for r in rows] == [("metadcseg", [0]), ("ce", [0, 1])]
  assert rows[1]["ema"]["dice"]["mean"] == pytest.approx(0.65)


def test_collect_errors(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    benchmark.collect(tmp_path / "missing")
  d = benchmark.run_dir(tmp_path, "none", "ce", 0)
  d.mkdir(parents=True)
  (d / "results.json").write_text('{"epoch": 1}')
  with pytest.raises(ValueError, match="results.json"):
    benchmark.collect(tmp_path)


def test_to_markdown(fake_sweep):
  md = benchmark.to_markdown(benchmark.collect(fake_sweep), command="metadcseg-sweep --seeds=0,1,2")
  assert "metadcseg-sweep --seeds=0,1,2" in md
  lines = md.splitlines()
  # Pivot: one row per noise, one column per method; "-" where a combination has no run.
  assert "| noise | ce | metadcseg |" in lines
  assert "| none | 0.9500 | - |" in lines
  assert f"| l2b40 | 0.7000 ± 0.1000 | 0.8800 ± {0.04 / math.sqrt(2):.4f} |" in lines
  assert (
    f"| l2b40 | ce | 0,1,2 | 2 | 0.7000 ± 0.1000 | 0.5500 ± 0.0500 | 14.00 ± {math.sqrt(28):.2f} |"
  ) in lines
  assert "| none | ce | 0 | 2 | 0.9500 | 0.9100 | 2.00 |" in lines
  assert "No finished runs" in benchmark.to_markdown([])


def test_run_sweep_skips_finished_runs(tmp_path, monkeypatch):
  calls = []

  def fake_train(config, workdir):
    calls.append((config.data.noise.kind, config.method, config.seed, workdir))
    dice = {"ce": 0.5, "l2b": 0.6}[config.method] + 0.01 * config.seed
    res = _results(dice, dice - 0.1, 5.0, method=config.method)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    pathlib.Path(workdir, "results.json").write_text(json.dumps(res))
    return res

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  config = tiny.get_config()
  config.lock()  # as config_flags hands it over
  _write_run(tmp_path, "l2b40", "l2b", 1, _results(0.99, 0.9, 1.0, method="l2b"))
  lines = []
  kwargs = dict(
    methods=["ce", "l2b"], noises=["none", "l2b40"], seeds=[0, 1], command="cmd", echo=lines.append
  )
  rows = benchmark.run_sweep(config, tmp_path, **kwargs)

  expected = [(n, m, s) for s in (0, 1) for n in ("none", "l2b40") for m in ("ce", "l2b")]
  expected.remove(("l2b40", "l2b", 1))
  assert [c[:3] for c in calls] == expected
  assert all(pathlib.Path(c[3]) == benchmark.run_dir(tmp_path, *c[:3]).resolve() for c in calls)
  assert config.method == tiny.get_config().method  # the base config is not modified
  assert any("[8/8] l2b40/l2b/seed1: done already" in l for l in lines)
  assert any(l.startswith("[1/8] none/ce/seed0: EMA Dice 0.5000") for l in lines)
  l2b40_l2b = [r for r in rows if (r["noise"], r["method"]) == ("l2b40", "l2b")][0]
  assert l2b40_l2b["ema"]["dice"]["values"] == pytest.approx([0.6, 0.99])
  for name in ("sweep.md", "sweep.json", "sweep.png"):
    assert (tmp_path / name).stat().st_size > 0
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved["command"] == "cmd" and len(saved["rows"]) == 4

  # A second call (a resumed sweep) trains nothing.
  calls.clear()
  benchmark.run_sweep(config, tmp_path, **kwargs)
  assert not calls


def test_run_sweep_rejects_bad_grid(tmp_path):
  with pytest.raises(ValueError, match="--methods"):
    benchmark.run_sweep(
      tiny.get_config(), tmp_path, methods=["ce", "dice"], noises=["none"], seeds=[0]
    )
  with pytest.raises(ValueError, match="--noise"):
    benchmark.run_sweep(tiny.get_config(), tmp_path, methods=["ce"], noises=["l2b50"], seeds=[0])
  with pytest.raises(ValueError, match="--seeds"):
    benchmark.parse_seeds(["0", "one"])


def test_command_line():
  assert (
    benchmark.command_line(["/usr/bin/metadcseg-sweep", "--workdir=a b"])
    == "metadcseg-sweep '--workdir=a b'"
  )
  assert (
    benchmark.command_line(["/x/experiments/sweep.py", "--seeds=0"])
    == "python -m experiments.sweep --seeds=0"
  )


def test_sweep_plot_writes_png(fake_sweep, tmp_path):
  from metadcseg_jax import figures  # pylint: disable=g-import-not-at-top

  out = figures.plot_sweep(benchmark.collect(fake_sweep), tmp_path / "sweep.png")
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
  with pytest.raises(ValueError, match="empty"):
    figures.plot_sweep([], tmp_path / "none.png")


def test_table_matches_the_cache_training_reads(tmp_path):
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path)
  table = benchmark.corruption_table(config, ["l2b20", "l2b60"])
  rows = [l for l in table.splitlines() if l.startswith("| l2b")]
  assert len(rows) == 2
  sources, key, _ = pipeline.open_dataset(config.data)
  cache = pathlib.Path(pipeline.noise_cache_dir(config.data, key))
  files = sorted(p.name for p in cache.glob("noisy_*.npy"))
  assert files == ["noisy_l2b20_seed0.npy", "noisy_l2b60_seed0.npy"]
  clean = pipeline.load_labels(sources["train"], key, 2)
  for row, kind in zip(rows, ("l2b20", "l2b60")):
    noisy = np.load(cache / f"noisy_{kind}_seed0.npy")
    want = noise.measured_corruption(clean, noisy).mean()
    assert row.split("|")[3].strip() == f"{want:.3f}"
  # The stronger level corrupts more, and a rerun reuses the files untouched.
  assert float(rows[1].split("|")[3]) > float(rows[0].split("|")[3])
  mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("noisy_*.npy")}
  assert benchmark.corruption_table(config, ["l2b20", "l2b60"]) == table
  assert {p: p.stat().st_mtime_ns for p in cache.glob("noisy_*.npy")} == mtimes
