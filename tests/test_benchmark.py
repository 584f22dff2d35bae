"""Tests of metadcseg_jax/benchmark/_all.py: the paper-layout tables, resume, the corruption table.

No training: runs are hand-written results.json files, and the trainer is monkeypatched.
"""

import json
import math
import os
import pathlib
import re
import signal
import threading
import time

import numpy as np
import pytest

from experiments.configs import kvasir_cpu
from experiments.configs import kvasir_seg
from experiments.configs import tiny
from tests import folders
from metadcseg_jax import check_settings
from metadcseg_jax import files
from metadcseg_jax import methods
from metadcseg_jax.benchmark import corruption
from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import report
from metadcseg_jax.benchmark import runner
from metadcseg_jax.benchmark import tables
from metadcseg_jax.data import noise
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.errors import Preempted
from metadcseg_jax.errors import RunStopped
from metadcseg_jax.tools import throughput
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import figures
from metadcseg_jax.training import preemption
from metadcseg_jax.training import train

CE, META = presets.Row("ce", "ce"), presets.Row("metadcseg", "metadcseg")
ROWS = [CE, META]


def _summary(dice, iou, hd95):
  return {
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


def _results(dice, iou, hd95, *, method="ce", epoch=2, raw_dice=None, val_dice=None):
  ema = _summary(dice, iou, hd95)
  raw = dict(ema, dice=dice if raw_dice is None else raw_dice)
  val = _summary(dice - 0.01 if val_dice is None else val_dice, iou, hd95)
  return {
    "epoch": epoch,
    "test": {"raw": raw, "ema": ema},
    "val": {"raw": val, "ema": val},
    "method": method,
    "dataset": "synthetic_s32",
    "noise": {"kind": "?"},
    "workdir": "elsewhere",
  }


def _write_run(root, noise_kind, row, seed, results, corruption=None):
  d = presets.run_dir(root, noise_kind, row, seed)
  d.mkdir(parents=True, exist_ok=True)
  (d / "results.json").write_text(json.dumps(results))
  if corruption is not None:
    (d / "data_info.json").write_text(json.dumps({"noise": {"corruption_mean": corruption}}))
  return d


@pytest.fixture
def fake_runs(tmp_path):
  """l2b40/ce: 3 seeds; l2b40/metadcseg: 2 seeds; none/ce: 1 seed; plus folders to ignore."""
  _write_run(tmp_path, "l2b40", CE, 0, _results(0.60, 0.50, 10.0), corruption=0.41)
  _write_run(tmp_path, "l2b40", CE, 1, _results(0.70, 0.55, 12.0))
  _write_run(tmp_path, "l2b40", CE, 2, _results(0.80, 0.60, 20.0))
  _write_run(tmp_path, "l2b40", META, 0, _results(0.90, 0.81, 4.0, method="metadcseg"))
  _write_run(tmp_path, "l2b40", META, 3, _results(0.86, 0.77, 6.0, method="metadcseg"))
  _write_run(tmp_path, "none", CE, 0, _results(0.95, 0.91, 2.0, raw_dice=0.5))
  (tmp_path / "none" / "ce" / "seed1").mkdir()  # unfinished: no results.json
  (tmp_path / "none" / "ce" / "notes").mkdir()  # not a seed folder
  return tmp_path


def test_collect_means_and_sample_std(fake_runs):
  cells = tables.collect(fake_runs, rows=ROWS, noises=["none", "l2b40"])
  assert [(c["noise"], c["label"]) for c in cells] == [
    ("none", "ce"),
    ("l2b40", "ce"),
    ("l2b40", "metadcseg"),
  ]
  none_ce, ce, meta = cells
  assert ce["seeds"] == [0, 1, 2] and meta["seeds"] == [0, 3] and none_ce["seeds"] == [0]
  # By hand: mean(0.6, 0.7, 0.8) = 0.7, sample std = sqrt((0.01 + 0 + 0.01) / 2) = 0.1.
  assert ce["test"]["ema"]["dice"]["mean"] == pytest.approx(0.7)
  assert ce["test"]["ema"]["dice"]["std"] == pytest.approx(0.1)
  # HD95 (10, 12, 20): mean 14, deviations (-4, -2, 6): sqrt(56 / 2).
  assert ce["test"]["ema"]["hd95"]["std"] == pytest.approx(math.sqrt(28))
  assert ce["val"]["ema"]["dice"]["mean"] == pytest.approx(0.69)
  assert none_ce["test"]["ema"]["dice"]["std"] is None  # one seed
  assert none_ce["test"]["raw"]["dice"]["mean"] == pytest.approx(0.5)
  assert ce["corruption"] == pytest.approx(0.41) and none_ce["corruption"] is None
  assert tables.collect(fake_runs, rows=ROWS, noises=["l2b40"], seeds=[0])[1]["seeds"] == [0]
  with pytest.raises(ValueError, match="not a directory"):
    tables.collect(fake_runs / "missing", rows=ROWS, noises=["l2b40"])


def test_main_table_has_the_papers_layout(fake_runs):
  cells = tables.collect(fake_runs, rows=ROWS, noises=["none", "l2b40"])
  table = report.main_table(cells).splitlines()
  assert table[0] == ("| method | 0% mIoU | 0% DSC | 0% HD95 | 40% mIoU | 40% DSC | 40% HD95 |")
  # mIoU of ce at 40%: (iou + 0.9) / 2 with iou (0.5, 0.55, 0.6): 72.50 ± 2.50 (in %).
  assert table[2] == (
    f"| ce | 90.50 | 95.00 | 2.00 | 72.50 ± 2.50 | 70.00 ± 10.00 | 14.00 ± {math.sqrt(28):.2f} |"
  )
  assert table[3].startswith("| metadcseg | - | - | - | 84.50 ± 1.41 | 88.00 ± 2.83 |")
  md = report.to_markdown(cells, command="metadcseg-benchmark --preset=main")
  for needle in (
    "## Test, EMA parameters",
    "## Validation, raw parameters",
    "metadcseg-benchmark --preset=main",
    "40% (l2b40): measured corruption",
  ):
    assert needle in md
  assert "No finished runs" in report.to_markdown([])


def test_per_class_columns_for_data_of_several_classes(tmp_path):
  def three_class(liver, tumour):
    r = _results((liver[0] + tumour[0]) / 2, 0.5, (liver[1] + tumour[1]) / 2)
    for split in ("test", "val"):
      for params in ("ema", "raw"):
        r[split][params]["per_class"] = {
          "liver": dict(_summary(liver[0], 0.8, liver[1])),
          "tumour": dict(_summary(tumour[0], 0.3, tumour[1])),
        }
    return r

  _write_run(tmp_path, "none", CE, 0, three_class((0.9, 3.0), (0.4, 20.0)))
  _write_run(tmp_path, "none", CE, 1, three_class((0.8, 5.0), (0.6, 10.0)))
  _write_run(tmp_path, "none", META, 0, three_class((0.7, 4.0), (0.5, 8.0)))
  cells = tables.collect(tmp_path, rows=ROWS, noises=["none"])
  tumour = cells[0]["test"]["ema"]["per_class"]["tumour"]
  # By hand: mean(0.4, 0.6) = 0.5, sample std sqrt(2 * 0.01 / 1) = 0.1414.
  assert tumour["dice"]["mean"] == pytest.approx(0.5)
  assert tumour["dice"]["std"] == pytest.approx(math.sqrt(0.02))
  assert cells[0]["test"]["ema"]["per_class"]["liver"]["hd95"]["mean"] == pytest.approx(4.0)
  table = report.per_class_table(cells).splitlines()
  assert table[0] == "| noise | method | liver DSC | liver HD95 | tumour DSC | tumour HD95 |"
  assert table[2] == "| 0% | ce | 85.00 ± 7.07 | 4.00 ± 1.41 | 50.00 ± 14.14 | 15.00 ± 7.07 |"
  assert table[3] == "| 0% | metadcseg | 70.00 | 4.00 | 50.00 | 8.00 |"
  assert "## Per class" in report.to_markdown(cells)
  # Two-class runs: no per_class in the cells, no table.
  two = tmp_path / "two"
  _write_run(two, "none", CE, 0, _results(0.6, 0.5, 10.0))
  plain = tables.collect(two, rows=ROWS, noises=["none"])
  assert "per_class" not in plain[0]["test"]["ema"]
  assert report.per_class_table(plain) == "" and "## Per class" not in report.to_markdown(plain)


def test_ablation_table_has_table5_layout(fake_runs):
  dcd_off = presets.Row("metadcseg: DCD off", "metadcseg", (("dcd.use", False),))
  tau = presets.Row("metadcseg: tau_dcd 4", "metadcseg", (("dcd.tau_dcd", 4.0),))
  _write_run(fake_runs, "l2b40", dcd_off, 0, _results(0.84, 0.7, 5.0, method="metadcseg"))
  _write_run(fake_runs, "l2b40", tau, 0, _results(0.88, 0.7, 5.0, raw_dice=0.8, val_dice=0.5))
  rows = [CE, META, dcd_off, tau]
  cells = tables.collect(fake_runs, rows=rows, noises=["l2b40"])
  lines = report.ablation_table(cells).splitlines()
  assert lines[0] == (
    "| variant | Meta | DCD | Dice | other setting | 40% test DSC ema | 40% test DSC raw "
    "| 40% val DSC ema | 40% val DSC raw |"
  )
  assert len(lines) == 2 + 3  # ce is not a MetaDCSeg variant
  assert (
    lines[2]
    == "| metadcseg | ✓ | ✓ | ✓ | - | 88.00 ± 2.83 | 88.00 ± 2.83 | 87.00 ± 2.83 | 87.00 ± 2.83 |"
  )
  assert lines[3] == "| metadcseg: DCD off | ✓ |  | ✓ | - | 84.00 | 84.00 | 83.00 | 83.00 |"
  assert (
    lines[4]
    == "| metadcseg: tau_dcd 4 | ✓ | ✓ | ✓ | dcd.tau_dcd=4.0 | 88.00 | 80.00 | 50.00 | 50.00 |"
  )
  assert "Table 5 layout" in report.to_markdown(cells)
  # Without variants (the main preset) there is no ablation section.
  plain = tables.collect(fake_runs, rows=ROWS, noises=["l2b40"])
  assert report.ablation_table(plain) == "" and "Table 5" not in report.to_markdown(plain)


def test_run_benchmark_trains_what_is_missing_and_resumes(tmp_path, monkeypatch):
  calls = []

  def fake_train(config, workdir):
    calls.append((config.data.noise.kind, config.method, config.seed, config.dcd.use, workdir))
    dice = {"ce": 0.5, "metadcseg": 0.6}[config.method] + 0.01 * config.seed
    res = _results(dice, dice - 0.1, 5.0, method=config.method)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    pathlib.Path(workdir, "results.json").write_text(json.dumps(res))
    return res

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  config = tiny.get_config()
  config.lock()  # as config_flags hands it over
  no_dcd = presets.Row("metadcseg: DCD off", "metadcseg", (("dcd.use", False),))
  rows = [CE, no_dcd]
  _write_run(tmp_path, "l2b40", no_dcd, 1, _results(0.99, 0.9, 1.0, method="metadcseg"))
  lines = []
  kwargs = dict(rows=rows, noises=["none", "l2b40"], seeds=[0, 1], command="cmd", echo=lines.append)
  cells = runner.run_benchmark(config, tmp_path, **kwargs)

  expected = [
    (n, r.method, s, r.method != "metadcseg")
    for s in (0, 1)
    for n in ("none", "l2b40")
    for r in rows
  ]
  expected.remove(("l2b40", "metadcseg", 1, False))
  assert [c[:4] for c in calls] == expected
  assert config.method == tiny.get_config().method and config.dcd.use  # base config untouched
  assert any("[8/8] l2b40/metadcseg: DCD off/seed1: done already" in l for l in lines)
  assert (tmp_path / "l2b40" / "metadcseg_DCD_off" / "seed0" / "results.json").is_file()
  cell = [c for c in cells if (c["noise"], c["label"]) == ("l2b40", no_dcd.label)][0]
  assert cell["test"]["ema"]["dice"]["values"] == pytest.approx([0.6, 0.99])
  for name in ("benchmark.md", "benchmark.json", "dice_vs_noise.png"):
    assert (tmp_path / name).stat().st_size > 0
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert saved["command"] == "cmd" and len(saved["cells"]) == 4
  calls.clear()
  runner.run_benchmark(config, tmp_path, **kwargs)  # a rerun trains nothing
  assert not calls


def test_bad_grid_and_overrides(tmp_path):
  config = tiny.get_config()
  with pytest.raises(ConfigError, match="--methods"):
    runner.run_benchmark(
      config, tmp_path, rows=[presets.Row("dice", "dice")], noises=["none"], seeds=[0]
    )
  with pytest.raises(ConfigError, match="--noise"):
    runner.run_benchmark(config, tmp_path, rows=[CE], noises=["l2b50"], seeds=[0])
  with pytest.raises(ConfigError, match="--seeds"):
    presets.parse_seeds(["0", "one"])
  with pytest.raises(ConfigError, match="no setting 'dcd.nope'"):
    presets.run_config(
      config, row=presets.Row("x", "ce", (("dcd.nope", 1),)), noise_kind="none", seed=0
    )
  assert set(presets.PRESETS) == {"main", "noisy", "paper", "ablation", "comparison"}


def test_a_setting_no_run_can_train_with_stops_the_benchmark_before_its_first_run(tmp_path):
  """MetaDCSeg on a user's masks that no one verified, without injected noise: one line naming
  the run and what to do, and nothing trained."""
  folders.write_folder(tmp_path / "raw", n=8)
  config = folders.folder_config(tmp_path / "raw", tmp_path / "data")
  calls = []
  with pytest.raises(ConfigError, match="none/metadcseg/seed0: .*trusted") as e:
    runner.run_benchmark(
      config,
      tmp_path / "bench",
      rows=presets.method_rows(["ce", "metadcseg"]),
      noises=["none"],
      seeds=[0],
      trainer=lambda cfg, rdir: calls.append(rdir),
    )
  assert not calls and "\n" not in str(e.value)
  # Every preset backs a claim: each seed draws its own noisy labels and meta split.
  assert {p["labels"] for p in presets.PRESETS.values()} == {"per_seed"}
  # Every registered method is a row of the comparison table.
  assert {r.method for r in presets.PRESETS["comparison"]["rows"]} == set(methods.NAMES)
  assert len({r.dirname for r in presets.ABLATIONS}) == len(presets.ABLATIONS)


def test_command_line():
  assert report.command_line(["/usr/bin/metadcseg-benchmark", "--workdir=a b"]) == (
    "metadcseg-benchmark '--workdir=a b'"
  )
  assert report.command_line(["/x/experiments/benchmark.py", "--seeds=0"]) == (
    "python -m experiments.benchmark --seeds=0"
  )


def test_dice_vs_noise_plot(fake_runs, tmp_path):
  cells = tables.collect(fake_runs, rows=ROWS, noises=["none", "l2b40"])
  out = figures.plot_dice_vs_noise(cells, tmp_path / "plot.png", label=presets.noise_label)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
  with pytest.raises(ValueError, match="empty"):
    figures.plot_dice_vs_noise([], tmp_path / "none.png")


def test_table_matches_the_cache_training_reads(tmp_path):
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path)
  table = corruption.corruption_table(config, ["l2b20", "l2b60"])
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
  assert corruption.corruption_table(config, ["l2b20", "l2b60"]) == table
  assert {p: p.stat().st_mtime_ns for p in cache.glob("noisy_*.npy")} == mtimes


def test_largest_batch_search_doubles_then_bisects(monkeypatch):
  tried = []

  def fits(config):
    tried.append(config.train.batch_size)
    return config.train.batch_size <= 100

  monkeypatch.setattr(throughput, "fits", fits)
  assert throughput.max_batch("ce", 32, 4, 1, "float32") == 100
  assert tried[:5] == [8, 16, 32, 64, 128] and len(tried) <= 12
  monkeypatch.setattr(throughput, "fits", lambda config: False)
  assert throughput.max_batch("ce", 32, 4, 1, "float32") == 0


def test_per_seed_labels_draw_noise_and_meta_split_with_the_seed(tmp_path):
  config = tiny.get_config()
  config.lock()
  per_seed = presets.run_config(config, row=CE, noise_kind="l2b40", seed=2, labels="per_seed")
  assert (per_seed.seed, per_seed.data.noise.seed, per_seed.data.meta_seed) == (2, 2, 2)
  fixed = presets.run_config(config, row=CE, noise_kind="l2b40", seed=2, labels="fixed")
  assert fixed.data.noise.seed == config.data.noise.seed and fixed.data.meta_seed is None
  with pytest.raises(ConfigError, match="--labels"):
    presets.run_config(config, row=CE, noise_kind="l2b40", seed=2, labels="random")
  # A finished run on other noisy labels (the other mode) is refused, not paired.
  res = _results(0.5, 0.4, 5.0)
  res["noise"] = {"kind": "l2b40", "seed": 0}
  _write_run(tmp_path, "l2b40", CE, 2, res)
  with pytest.raises(ConfigError, match="noise seed 0"):
    runner.run_benchmark(
      config, tmp_path, rows=[CE], noises=["l2b40"], seeds=[2], labels="per_seed", echo=print
    )


def test_meta_split_follows_meta_seed(tmp_path):
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path)
  meta = lambda: pipeline.prepare_data(config.data, meta_batch_size=2).info["meta_indices"]
  default = meta()
  config.data.meta_seed = config.data.seed
  assert meta() == default  # unset: the data seed's split
  config.data.meta_seed = config.data.seed + 1
  assert meta() != default


def _write_cases(run, dice_by_params, case_ids):
  cases = {
    split: {
      "raw": {"case_ids": case_ids, "dice": list(dice_by_params["raw"])},
      "ema": {"case_ids": case_ids, "dice": list(dice_by_params["ema"])},
      "ema_bn": {
        bn: {"case_ids": case_ids, "dice": list(dice_by_params[bn])} for bn in ("ema", "recompute")
      },
    }
    for split in ("val", "test")
  }
  (run / train.CASES_FILE).write_text(json.dumps(cases))


def test_paired_comparisons_from_each_runs_case_scores(tmp_path):
  rng = np.random.default_rng(0)
  ids = [f"case{i}" for i in range(40)]
  l2b = presets.Row("l2b", "l2b")
  variant = presets.Row("metadcseg: DCD off", "metadcseg", (("dcd.use", False),))
  rows, gains = [CE, l2b, META, variant], {"ce": 0.0, "l2b": 0.10, "metadcseg": 0.12}
  gains["metadcseg: DCD off"] = 0.11
  scores = {}
  for seed in range(3):
    base = rng.uniform(0.3, 0.7, len(ids))
    for row in rows:
      d = np.clip(base + gains[row.label] + rng.normal(0, 0.01, len(ids)), 0, 1)
      per = {"raw": d, "ema": d, "recompute": d + 0.02}
      scores[row.label, seed] = per
      res = _results(float(d.mean()), 0.5, 5.0, method=row.method)
      for split in ("val", "test"):
        res[split]["ema_bn"] = {
          bn: dict(res[split]["ema"], dice=float(per[bn].mean())) for bn in ("ema", "recompute")
        }
      _write_cases(_write_run(tmp_path, "l2b40", row, seed, res), per, ids)
  cells = tables.collect(tmp_path, rows=rows, noises=["l2b40"])
  assert tables.claim_pairs(cells) == [
    ("metadcseg", "l2b"),
    ("l2b", "ce"),
    ("metadcseg", "ce"),
    ("metadcseg: DCD off", "metadcseg"),
  ]
  found = tables.comparisons(tmp_path, cells)
  by = {(c["row"], c["reference"], c["params"]): c for c in found}
  c = by["l2b", "ce", "raw"]
  want = np.mean([scores["l2b", s]["raw"] - scores["ce", s]["raw"] for s in range(3)])
  assert c["mean"] == pytest.approx(want) and c["seed_list"] == [0, 1, 2]
  assert c["verdict"] == "ahead" and c["se_seed"] > 0 and c["se_test"] > 0
  assert by["metadcseg", "l2b", "ema"]["mean"] == pytest.approx(0.02, abs=0.01)
  # A table reads one choice of the EMA weights' statistics, whatever each run was set to.
  recomputed = tables.collect(tmp_path, rows=rows, noises=["l2b40"], ema_choice="recompute")
  want = np.mean([scores["ce", s]["recompute"].mean() for s in range(3)])
  assert recomputed[0]["test"]["ema"]["dice"]["mean"] == pytest.approx(want)
  assert cells[0]["test"]["ema"]["dice"]["mean"] == pytest.approx(want - 0.02, abs=1e-6)
  c = {
    (c["row"], c["reference"], c["params"]): c
    for c in tables.comparisons(tmp_path, cells, ema_choice="recompute")
  }["l2b", "ce", "ema"]
  want = np.mean([scores["l2b", s]["recompute"] - scores["ce", s]["recompute"] for s in range(3)])
  assert c["mean"] == pytest.approx(want)
  # Chosen per run on validation Dice, where recomputing is ahead in every run here: the
  # recomputed statistics' table, on both splits, and its paired differences.
  best = tables.collect(tmp_path, rows=rows, noises=["l2b40"], ema_choice="best_val")
  for split in ("val", "test"):
    assert best[0][split]["ema"] == recomputed[0][split]["ema"]
  c_best = {
    (c["row"], c["reference"], c["params"]): c
    for c in tables.comparisons(tmp_path, cells, ema_choice="best_val")
  }["l2b", "ce", "ema"]
  assert c_best["mean"] == pytest.approx(want)
  # One run whose validation favours the EMA of the statistics while its test split does not:
  # the rule reads its EMA of the statistics on test too (chosen on validation, never on test).
  run = presets.run_dir(tmp_path, "l2b40", CE, 0)
  res = json.loads((run / "results.json").read_text())
  res["val"]["ema_bn"]["ema"]["dice"] = 0.99
  (run / "results.json").write_text(json.dumps(res))
  best = tables.collect(tmp_path, rows=rows, noises=["l2b40"], ema_choice="best_val")
  want_ce = np.mean(
    [scores["ce", 0]["ema"].mean()] + [scores["ce", s]["recompute"].mean() for s in (1, 2)]
  )
  assert best[0]["test"]["ema"]["dice"]["mean"] == pytest.approx(want_ce)
  c_best = {
    (c["row"], c["reference"], c["params"]): c
    for c in tables.comparisons(tmp_path, cells, ema_choice="best_val")
  }["l2b", "ce", "ema"]
  assert c_best["mean"] == pytest.approx(want + 0.02 / 3)  # seed 0's CE 0.02 lower
  ema_bn = tables.ema_bn_comparisons(tmp_path, cells)
  assert len(ema_bn) == 4 and all(e["mean"] == pytest.approx(0.02, abs=1e-9) for e in ema_bn)
  report.write_outputs(tmp_path, rows=rows, noises=["l2b40"])
  md = (tmp_path / "benchmark.md").read_text()
  assert "## Paired differences" in md and "| 40% | l2b − ce | raw | 3 |" in md
  assert "Recomputed statistics over all 4 cells" in md
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert len(saved["comparisons"]) == 8 and len(saved["ema_batch_stats"]) == 4
  # Runs scored on different test cases cannot be paired.
  run = presets.run_dir(tmp_path, "l2b40", CE, 0)
  _write_cases(run, scores["ce", 0], ids[::-1])
  with pytest.raises(ValueError, match="different test cases"):
    tables.comparisons(tmp_path, cells)


def test_noise_levels_are_ordered_by_value(fake_runs, monkeypatch):
  assert presets.sort_noises(["l2b40", "l2b60", "none"]) == ["none", "l2b40", "l2b60"]
  # Kinds without a level come after the levels, in noise.KINDS order.
  kinds = ["dist", "markov_se", "l2b60", "markov_sr", "none", "l2b20", "l2b60"]
  assert presets.sort_noises(kinds) == [
    "none",
    "l2b20",
    "l2b60",
    "markov_sr",
    "markov_se",
    "dist",
  ]
  assert list(noise.KINDS).index("markov_sr") < list(noise.KINDS).index("dist")
  _write_run(fake_runs, "l2b60", CE, 0, _results(0.5, 0.4, 9.0))
  noises = ["l2b40", "l2b60", "none"]  # the command line's order
  cells = tables.collect(fake_runs, rows=ROWS, noises=noises)
  assert list(dict.fromkeys(c["noise"] for c in cells)) == ["none", "l2b40", "l2b60"]
  head = report.main_table(list(reversed(cells))).splitlines()[0]
  assert [h.split()[0] for h in head.split("|")[2:-1:3]] == ["0%", "40%", "60%"]
  plotted = []
  monkeypatch.setattr(
    figures,
    "plot_dice_vs_noise",
    lambda cells, *a, **k: plotted.append([c["noise"] for c in cells]),
  )
  report.write_outputs(fake_runs, rows=ROWS, noises=noises)
  assert list(dict.fromkeys(plotted[0])) == ["none", "l2b40", "l2b60"]


def test_a_failure_withholds_only_the_verdicts_in_its_rows_favour():
  base = {"seed_list": [0, 1], "verdict": "ahead"}
  c = tables.count_failures(base, [2], [])
  assert (c["verdict"], c["withheld"], c["seeds_attempted"]) == ("not resolved", "ahead", 3)
  # The reference failing leaves the row's win standing: its bad seed is what was dropped.
  assert tables.count_failures(base, [], [2])["verdict"] == "ahead"
  behind = dict(base, verdict="behind")
  assert tables.count_failures(behind, [2], [])["verdict"] == "behind"
  c = tables.count_failures(behind, [], [1, 2])
  assert (c["verdict"], c["withheld"], c["seeds_attempted"]) == ("not resolved", "behind", 3)
  assert tables.count_failures(dict(base, seed_list=[0, 1, 2]), [], [])["withheld"] is None


def _scored_runs(root, gains, jitter, *, seeds=(0, 1, 2), cases=40, skip=()):
  """Runs with per-case test Dice base[seed, case] + gains[noise][row] + jitter[noise]·N(0, 1):
  results.json and cases.json in each folder but those in `skip`. Returns the scores."""
  rng = np.random.default_rng(7)
  ids = [f"case{i}" for i in range(cases)]
  rows = {"ce": CE, "l2b": presets.Row("l2b", "l2b"), "metadcseg": META}
  scores = {}
  for noise_kind, by_row in gains.items():
    for seed in seeds:
      base = rng.uniform(0.4, 0.7, cases)
      for label, gain in by_row.items():
        d = base + gain + rng.normal(0, jitter[noise_kind], cases)
        scores[noise_kind, label, seed] = d
        if (noise_kind, label, seed) in skip:
          continue
        res = _results(float(d.mean()), 0.5, 5.0, method=rows[label].method)
        run = _write_run(root, noise_kind, rows[label], seed, res)
        _write_cases(run, {"raw": d, "ema": d, "recompute": d}, ids)
  return scores, list(rows.values())


def test_the_choice_and_the_failed_seeds_in_a_users_benchmark(tmp_path, monkeypatch):
  # Clean labels: ce 10 points ahead of both. 40%: three rows within noise of each other, and
  # metadcseg's seed 2 diverges.
  gains = {
    "l2b40": {"ce": 0.0, "l2b": 0.0, "metadcseg": 0.0},
    "none": {"ce": 0.10, "l2b": 0.0, "metadcseg": 0.0},
  }
  failing = ("l2b40", "metadcseg", 2)
  scores, rows = _scored_runs(tmp_path, gains, {"l2b40": 0.1, "none": 0.01}, skip=[failing])

  def trainer(config, workdir):
    assert (config.data.noise.kind, config.method, config.seed) == failing
    raise NonFiniteLossError("non-finite training loss at step 3 (epoch 1)")

  plotted = []
  monkeypatch.setattr(figures, "plot_dice_vs_noise", lambda *a, **k: plotted.append(a))
  config = tiny.get_config()
  config.lock()
  lines = []
  with pytest.raises(NonFiniteLossError, match="1 of 18 runs diverged"):
    runner.run_benchmark(
      config,
      tmp_path,
      rows=rows,
      noises=["l2b40", "none"],
      seeds=[0, 1, 2],
      echo=lines.append,
      trainer=trainer,
    )
  choice = json.loads((tmp_path / "benchmark.json").read_text())["choice"]
  assert [c["noise"] for c in choice] == ["none", "l2b40"]
  clean, noisy = choice
  assert clean["best"] == "ce" and clean["ahead_of"] == ["l2b", "metadcseg"]
  for other in clean["others"]:
    want = np.mean([scores["none", other["row"], s] - scores["none", "ce", s] for s in range(3)])
    assert other["mean"] == pytest.approx(want) and other["verdict"] == "behind"
  # 40%: the best mean over each row's finished seeds, the others paired with it.
  means = {
    r: np.mean([scores["l2b40", r, s].mean() for s in range(3) if ("l2b40", r, s) != failing])
    for r in gains["l2b40"]
  }
  best = max(means, key=means.get)
  assert noisy["best"] == best and noisy["best_mean"] == pytest.approx(means[best])
  assert noisy["ahead_of"] == [] and len(noisy["others"]) == 2
  for other in noisy["others"]:
    seeds = [s for s in range(3) if ("l2b40", other["row"], s) != failing]
    seeds = [s for s in seeds if ("l2b40", best, s) != failing]
    want = np.mean([scores["l2b40", other["row"], s] - scores["l2b40", best, s] for s in seeds])
    assert other["mean"] == pytest.approx(want) and other["seed_list"] == seeds
    assert other["verdict"] == "not resolved"
  md = (tmp_path / "benchmark.md").read_text()
  # The choice is the first section, printed as written, clean labels first.
  assert md.index("## Which method to choose") < md.index("## Test, EMA parameters")
  printed = "\n".join(lines)
  section = [l for l in md.splitlines() if l.startswith("- 0%") or l.startswith("- 40%")][:2]
  assert section[0].startswith("- 0%: **ce**") and section[1].startswith("- 40%: ")
  assert section[0].endswith("ce resolved ahead of l2b, metadcseg.")
  assert section[1].endswith("No method resolved ahead.")
  assert all(line in printed for line in section)
  # metadcseg's lost seed is named whether it has the best mean here or is compared with it.
  assert "metadcseg lost 1 of 3 seeds" in section[1]
  # The seeds lost: a column at the level where a run failed, and in the comparison table.
  table = md.split("## Test, EMA parameters")[1].split("##")[0].strip().splitlines()
  assert table[0].split(" | ")[-1] == "40% seeds lost |"
  lost_column = {l.split(" | ")[0][2:]: l.split(" | ")[-1] for l in table[2:]}
  assert lost_column == {"ce": "0 |", "l2b": "0 |", "metadcseg": "1 of 3 |"}
  found = [
    c
    for c in json.loads((tmp_path / "benchmark.json").read_text())["comparisons"]
    if (c["noise"], c["row"], c["reference"], c["params"]) == ("l2b40", "metadcseg", "ce", "ema")
  ]
  assert found[0]["seed_list"] == [0, 1] and found[0]["seeds_lost_row"] == [2]
  assert "| 40% | metadcseg − ce | ema | 2 | row 1 of 3 |" in md
  assert "| 40% | metadcseg − ce | ema | 2 | row 1 of 3 |" in printed
  for words in ("seeds for a ±2-point interval", "seeds for 80% power at 2 points"):
    assert words in md and words in printed
  assert "seeds for ±2 points" not in md
  assert [c["noise"] for c in plotted[-1][0]][::3] == ["none", "l2b40"]


def test_a_row_that_lost_every_seed_keeps_its_lines(tmp_path):
  gains = {"l2b40": {"ce": 0.0, "metadcseg": 0.05}}
  lost = [("l2b40", "metadcseg", s) for s in range(3)]
  _scored_runs(tmp_path, gains, {"l2b40": 0.01}, skip=lost)
  failed = [{"noise": n, "row": r, "method": r, "seed": s, "error": "diverged"} for n, r, s in lost]
  cells = tables.collect(tmp_path, rows=ROWS, noises=["l2b40"])
  assert [c["label"] for c in cells] == ["ce"]
  table = report.main_table(cells, lost=tables.lost_seeds(failed, cells)).splitlines()
  assert table[-1] == "| metadcseg | - | - | - | 3 of 3 |"
  found = tables.comparisons(tmp_path, cells, failed=failed)
  assert [(c["row"], c["verdict"], c["seeds_attempted"]) for c in found] == [
    ("metadcseg", "no paired seeds", 3)
  ] * 2
  # A failed seed that has since finished (a rerun) is not lost.
  assert tables.lost_seeds([dict(failed[0], row="ce")], cells) == {}


def test_kvasir_presets_load(tmp_path):
  cpu, gpu = kvasir_cpu.get_config(), kvasir_seg.get_config()
  assert (cpu.data.size, gpu.data.size, gpu.train.num_epochs) == (64, 256, 140)  # Table 8
  for config in (cpu, gpu):
    config.data.manual_dir = str(tmp_path)
    check_settings.check_config(config)


# Stand-in trainers for the worker processes: module-level, so that the workers import them by
# name.


def _results_for(config) -> dict:
  dice = {"ce": 0.5, "metadcseg": 0.6}[config.method] + 0.01 * config.seed
  summary = {
    "dice": dice,
    "iou": dice - 0.1,
    "miou": dice,
    "hd": 6.0,
    "hd95": 5.0,
    "asd": 2.0,
    "n_cases": 8,
    "n_both_empty": 0,
    "n_one_empty": 0,
  }
  return {
    "epoch": config.train.num_epochs,
    "test": {"raw": summary, "ema": summary},
    "val": {"raw": summary, "ema": summary},
    "method": config.method,
    "noise": {"kind": config.data.noise.kind},
  }


def _train_recording_pid(config, workdir: str) -> dict:
  """Writes the run's results and `pid.txt`, the process that trained it; takes long enough
  (0.5 s) that the runs overlap."""
  results = _results_for(config)
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "pid.txt").write_text(str(os.getpid()))
  time.sleep(0.5)
  # Whole or absent, as the trainer writes it: the parent rereads every results.json after
  # each run while the other worker's run is still going.
  files.write_atomic(path / "results.json", json.dumps(results))
  return results


def _train_until_stopped(config, workdir: str) -> dict:
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


def test_runs_in_worker_processes_give_the_same_tables(tmp_path):
  config = tiny.get_config()
  config.lock()
  kwargs = dict(rows=ROWS, noises=["none", "l2b40"], seeds=[0, 1], command="cmd")
  one = runner.run_benchmark(
    config, tmp_path / "one", **kwargs, echo=lambda _: None, trainer=_train_recording_pid
  )
  lines = []
  two = runner.run_benchmark(
    config,
    tmp_path / "two",
    **kwargs,
    echo=lines.append,
    processes=2,
    trainer=_train_recording_pid,
  )
  pids = {p.read_text() for p in (tmp_path / "two").glob("*/*/seed*/pid.txt")}
  assert len(pids) == 2 and str(os.getpid()) not in pids  # two workers shared the 8 runs
  assert {p.read_text() for p in (tmp_path / "one").glob("*/*/seed*/pid.txt")} == {str(os.getpid())}
  assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
  assert sum("queued" in l for l in lines) == 8
  assert sum(bool(re.search(r"seed\d: .* \[\d+ s\]$", l)) for l in lines) == 8
  strip = lambda p: (
    p.read_text().replace(str(tmp_path / "one"), "").replace(str(tmp_path / "two"), "")
  )
  assert strip(tmp_path / "one" / "benchmark.md") == strip(tmp_path / "two" / "benchmark.md")


def test_a_stop_signal_reaches_the_worker_processes(tmp_path):
  config = tiny.get_config()
  config.lock()
  runs = [presets.run_dir(tmp_path, "none", row, s) for s in (0, 1) for row in ROWS]

  def signal_when_both_run():
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum((r / "started").exists() for r in runs) < 2:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)  # to this process only: it passes it on

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=signal_when_both_run, daemon=True).start()
  lines = []
  with pytest.raises(RunStopped, match="stopped by signal"):
    runner.run_benchmark(
      config,
      tmp_path,
      rows=ROWS,
      noises=["none"],
      seeds=[0, 1],
      echo=lines.append,
      processes=2,
      trainer=_train_until_stopped,
    )
  assert signal.getsignal(signal.SIGTERM) is before
  # The two running runs stopped on the passed-on signal; no queued run trained after it.
  assert [(r / "stopped").exists() for r in runs] == [True, True, False, False]
  assert not any((r / "started").exists() for r in runs[2:])
  assert (tmp_path / "benchmark.md").is_file()


def test_the_stop_reported_is_a_training_runs_whichever_finishes_first():
  # A worker can take a queued run after the signal (the pool hands it over before it can be
  # cancelled); that run says only "not started" and may be collected first.
  lines = []
  outcomes = runner._Outcomes(echo=lines.append, write=lambda: None)
  job = lambda seed: ("tag", "none", CE, seed)
  outcomes.add(job(1), error=runner._NotStarted("seed1: not started"))
  outcomes.add(job(0), error=Preempted("seed0: stopped by signal 15"))
  outcomes.add(job(2), error=runner._NotStarted("seed2: not started"))
  assert str(outcomes.stopped) == "seed0: stopped by signal 15"
  assert len(lines) == 3


def test_default_processes_follow_the_measurements():
  assert runner.default_processes(cpus=2, backend="cpu") == 2
  assert runner.default_processes(cpus=1, backend="cpu") == 1
  assert runner.default_processes(cpus=16, backend="cpu") == 1
  assert runner.default_processes(cpus=2, backend="gpu") == 1
  with pytest.raises(ConfigError, match="processes must be >= 1"):
    runner.run_benchmark(tiny.get_config(), "x", rows=[CE], noises=["none"], seeds=[0], processes=0)


def test_trainer_rates_against_the_bare_steps(tmp_path, monkeypatch):
  config = throughput.trainer_config(
    throughput.config_for("l2b", 16, 2, 1, 4), steps=10, data_dir=str(tmp_path)
  )
  assert (config.data.name, config.data.n_train, config.train.num_epochs) == ("synthetic", 44, 4)
  assert config.train.warmup_epochs == 0 and config.train.eval_every_epochs > 4
  # When each epoch is done, validation and all: the second run (functions compiled) counts.
  clock = iter([0.0, 50.0, 60.0, 70.0, 100.0, 103.0, 105.0, 109.0])

  def fake_train(cfg, workdir, *, after_epoch):
    epochs = [(1.0, "warmup"), (30.0, "warmup"), (10.0, "main"), (20.0, "main")]
    with open(f"{workdir}/metrics.jsonl", "w") as f:
      for epoch, (rate, phase) in enumerate(epochs, start=1):  # the first compiles
        line = {"epoch": epoch, "step": 10 * epoch, "split": "train", "phase": phase}
        f.write(json.dumps({**line, "images_per_s": rate}) + "\n")
        f.write(json.dumps({"epoch": epoch, "split": "diagnostics", "images_per_s": 99.0}) + "\n")
        after_epoch(epoch)

  monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  # The bare steps, timed just before the measured run and just after it: the faster counts.
  bare = iter([{"warmup": 0.1, "main": 0.25}, {"warmup": 0.12, "main": 0.2}])
  timed = {}

  def fake_time_step(c, r, phase):
    if not timed:
      timed.update(next(bare))
    return {"seconds": timed.pop(phase)}

  monkeypatch.setattr(throughput, "time_step", fake_time_step)
  config.train.warmup_epochs = 2  # the method's phases: warm-up, then the meta step
  r = throughput.trainer_rates(config, repeats=3, runs=2)
  assert not timed and next(bare, None) is None
  assert r["epochs"] == 20.0  # the median of the epochs after the first
  assert r["run"] == pytest.approx(30 * 4 / 9.0)  # epochs 2-4: 30 steps of 4 images in 9 s
  assert r["step"] == pytest.approx(4 / 0.2)  # the last epoch's phase
  assert r["run_share"] == pytest.approx((10 * 0.1 + 20 * 0.2) / 9.0)  # each at its own phase


def test_audit_timed_per_function_where_it_factors():
  r = throughput.time_audit(throughput.config_for("l2b", 16, 2, 1, 2), repeats=1)
  assert sorted(r) == ["along", "direction", "maps"] and min(r.values()) > 0
  assert throughput.time_audit(throughput.config_for("ce", 16, 2, 1, 2), repeats=1) == {}
  # Away from (a0, b0) = (0, 0) the virtual step needs each training batch: the whole step.
  config = throughput.config_for("l2b", 16, 2, 1, 2)
  config.meta.a0 = 1.0
  m = methods.create(config, steps_per_epoch=10)
  assert not m.audit_shares_direction and audit_passes.functions(m).direction is None


def test_ema_statistics_rules_cross_fitted_on_validation_halves():
  from experiments import ema_bn_select  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  ema = rng.uniform(0.2, 0.8, 40)
  # Recomputing ahead on every case: the per-run rule always picks it.
  s = ema_bn_select.cross_fitted({"ema": ema, "recompute": ema + 0.1}, splits=20)
  assert s["recompute"] == pytest.approx(s["ema"] + 0.1) and s["best_val"] == s["recompute"]
  assert s["ema"] == pytest.approx(ema.mean())  # both halves of every split: the whole mean
  # Recomputing ahead on half the cases and far behind on the rest: the rule's score is the
  # held-out mean of what the other half chose, case by case computed here.
  rec = np.where(np.arange(40) < 20, ema + 0.3, ema - 0.3)
  rec[0] = np.nan  # a case without a Dice is left out
  got = ema_bn_select.cross_fitted({"ema": ema, "recompute": rec}, splits=5, seed=3)
  keep = np.isfinite(rec)
  e, r = ema[keep], rec[keep]
  order_rng, want = np.random.default_rng(3), {"ema": 0.0, "recompute": 0.0, "best_val": 0.0}
  for _ in range(5):
    order = order_rng.permutation(len(e))  # 39 cases: halves of 19 and 20
    a, b = order[: len(e) // 2], order[len(e) // 2 :]
    for x, y in ((a, b), (b, a)):
      want["ema"] += e[y].mean() / 10
      want["recompute"] += r[y].mean() / 10
      want["best_val"] += (r if r[x].mean() > e[x].mean() else e)[y].mean() / 10
  assert got == pytest.approx(want)
