"""Tests of metadcseg_jax/benchmark/sweeps.py: benchmarks that differ in one setting, side by side.

No training: each run is a hand-written results.json, cases.json and metrics.jsonl.
"""

import json

import numpy as np
import pytest

from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import sweeps
from metadcseg_jax.training import train

CE, L2B = presets.Row("ce", "ce"), presets.Row("l2b", "l2b")
NO_BOOT = presets.Row("l2b: no bootstrap", "l2b", (("meta.bootstrap", False),))
IDS = [f"case{i}" for i in range(30)]


def _summary(dice):
  return {"dice": dice, "iou": dice, "miou": dice, "hd": 1.0, "hd95": 1.0, "asd": 1.0}


def _write(root, noise, row, seed, case_dice, diagnostics=()):
  run = presets.run_dir(root, noise, row, seed)
  run.mkdir(parents=True)
  mean = float(np.mean(case_dice))
  results = {"epoch": 10, "method": row.method, "noise": {"kind": noise}}
  for split in ("test", "val"):
    results[split] = {"ema": _summary(mean), "raw": _summary(mean)}
  (run / "results.json").write_text(json.dumps(results))
  entry = {"case_ids": IDS, "dice": [float(v) for v in case_dice]}
  cases = {split: {"ema": entry, "raw": entry} for split in ("test", "val")}
  (run / train.CASES_FILE).write_text(json.dumps(cases))
  lines = [{"split": "train", "step": 1, "loss": 0.5}]
  lines += [{"split": "diagnostics", "step": i, **d} for i, d in enumerate(diagnostics)]
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  return run


@pytest.fixture
def sweep(tmp_path):
  """Two budgets; at 0% L2B is 10 points behind CE on every case, the variant 1 point ahead of
  L2B; seed s shifts every score by s/100."""
  rng = np.random.default_rng(0)
  base = rng.uniform(0.5, 0.9, len(IDS))
  roots = {"short": tmp_path / "e10", "long": tmp_path / "e40"}
  for budget, root in roots.items():
    lift = 0.05 if budget == "long" else 0.0
    for seed in (0, 1, 2):
      shift = seed / 100 + lift
      noise = rng.normal(0, 0.002, len(IDS))
      _write(root, "none", CE, seed, base + shift)
      _write(root, "none", L2B, seed, base + shift - 0.10 + noise)
      _write(root, "none", NO_BOOT, seed, base + shift - 0.09 + rng.normal(0, 0.02, len(IDS)))
  return roots, base


def test_setting_table_gives_each_rows_dice_and_the_paired_differences(sweep):
  roots, base = sweep
  table = sweeps.setting_table(roots, methods=("ce", "l2b"), noises=("none",)).splitlines()
  assert table[0] == "| setting | noise | seeds | ce | l2b | l2b − ce |"
  cells = [c.strip() for c in table[2].strip("|").split("|")]
  assert cells[:3] == ["short", "0%", "3"]
  # CE: the case mean plus 0, 1, 2 points: mean +1, sample std 1 (points).
  ce_mean = 100 * (base.mean() + 0.01)
  assert cells[3] == f"{ce_mean:.1f} ± 1.0"
  mean, interval, verdict = cells[5].split(" ", 1)[0], cells[5], cells[5].split()[-1]
  assert float(mean) == pytest.approx(-10.0, abs=0.1) and verdict == "behind"
  low, high = (float(x) for x in interval[interval.index("[") + 1 : interval.index("]")].split(","))
  assert low <= float(mean) <= high < 0 and high - low < 1.0
  long_cells = [c.strip() for c in table[3].strip("|").split("|")]
  assert long_cells[0] == "long" and long_cells[3] == f"{ce_mean + 5:.1f} ± 1.0"


def test_setting_table_reads_variant_rows_chosen_claims_and_seeds(sweep):
  roots, _ = sweep
  table = sweeps.setting_table(
    {"short": roots["short"]},
    methods=("ce", "l2b", NO_BOOT),
    noises=("none", "l2b40"),
    seeds=[0],
    claims=[("l2b: no bootstrap", "l2b"), ("metadcseg", "ce")],
  ).splitlines()
  # The claim naming a row not in the table is left out; a level with no runs has no line.
  assert table[0] == (
    "| setting | noise | seeds | ce | l2b | l2b: no bootstrap | l2b: no bootstrap − l2b |"
  )
  assert len(table) == 3
  cells = [c.strip() for c in table[2].strip("|").split("|")]
  assert cells[2] == "1" and "±" not in cells[3]
  # One seed: the mean difference and the test cases' half-width, 1.96 standard errors of the
  # mean of the 30 per-case differences (the seed part is unknown).
  roots_short = roots["short"]
  d = np.asarray(_case_dice(roots_short, NO_BOOT)) - np.asarray(_case_dice(roots_short, L2B))
  half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))
  assert cells[-1] == f"{100 * d.mean():+.1f} (one seed; test cases ±{100 * half:.1f})"


def _case_dice(root, row, seed=0):
  run = presets.run_dir(root, "none", row, seed)
  return json.loads((run / train.CASES_FILE).read_text())["test"]["ema"]["dice"]


def test_diagnostics_table_averages_each_runs_last_points_over_seeds(tmp_path):
  root = tmp_path / "e10"
  ids = np.linspace(0.5, 0.8, len(IDS))
  for seed, values in ((0, (0.1, 0.2, 0.3, 0.4, 0.5)), (1, (0.9, 0.6, 0.6, 0.6))):
    diag = [{"weight_zero_frac": v, "effective_pixel_frac": 1 - v} for v in values]
    _write(root, "none", L2B, seed, ids, diag)
  unfinished = _write(root, "none", L2B, 2, ids, [{"weight_zero_frac": 1.0}])
  (unfinished / "results.json").unlink()
  _write(root, "none", NO_BOOT, 0, ids, [{"weight_zero_frac": 0.7, "alpha_share": 1.0}])
  table = sweeps.diagnostics_table({"e10": root}, methods=("l2b", NO_BOOT), noises=("none",))
  lines = table.splitlines()
  assert lines[0].startswith("| setting | noise | method | seeds | weight_zero_frac |")
  # Seed 0's last three points average 0.4, seed 1's 0.6; the unfinished seed 2 is not read.
  assert lines[2] == "| e10 | 0% | l2b | 2 | 0.500 | 0.500 | – | – | – |"
  assert lines[3] == "| e10 | 0% | l2b: no bootstrap | 1 | 0.700 | – | 1.000 | – | – |"
  only = sweeps.diagnostics_table({"e10": root}, methods=("l2b",), noises=("none",), seeds=[1])
  assert only.splitlines()[2] == "| e10 | 0% | l2b | 1 | 0.600 | 0.400 | – | – | – |"
  assert sweeps.run_diagnostics(unfinished) == {}


def test_plot_sweep_writes_a_png_with_one_panel_per_noise_level(sweep, tmp_path):
  roots, _ = sweep
  out = sweeps.plot_sweep(roots, tmp_path / "fig" / "budget.png", noises=("none",), xlabel="epochs")
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
  one = sweeps.plot_sweep(roots, tmp_path / "one.png", methods=("ce", NO_BOOT), seeds=[0])
  assert one.is_file()
  (tmp_path / "empty_bench").mkdir()
  with pytest.raises(ValueError, match="no cells"):
    sweeps.plot_sweep({"x": tmp_path / "empty_bench"}, tmp_path / "none.png")
