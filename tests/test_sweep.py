"""Tests of experiments/sweep.py (table, resume), metadcseg_jax/plots.py and the Colab notebook.

No training: runs are hand-written results.json files, and the trainer is monkeypatched.
"""

import json
import math
import pathlib

import pytest

from experiments import sweep
from experiments.configs import tiny
from metadcseg_jax import plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab.ipynb"


def _results(dice, iou, hd95, *, method="ce", epoch=2, raw_dice=None):
  summary = {"dice": dice, "iou": iou, "miou": (iou + 0.9) / 2, "hd": hd95 + 1.0,
             "hd95": hd95, "asd": hd95 / 3, "n_cases": 8, "n_both_empty": 0, "n_one_empty": 1}
  raw = dict(summary, dice=dice if raw_dice is None else raw_dice)
  return {"epoch": epoch, "test": {"raw": raw, "ema": summary}, "method": method,
          "dataset": "synthetic_s32", "noise": {"kind": "?"}, "workdir": "elsewhere"}


def _write_run(root, noise, method, seed, results):
  d = sweep.run_dir(root, noise, method, seed)
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
  rows = sweep.collect(fake_sweep)
  # Noise order none < l2b40 (NOISE_ORDER), methods ce < metadcseg (METHOD_ORDER).
  assert [(r["noise"], r["method"]) for r in rows] == [
      ("none", "ce"), ("l2b40", "ce"), ("l2b40", "metadcseg")]
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
  rows = sweep.collect(fake_sweep, methods=["metadcseg", "ce"], noises=["l2b40"], seeds=[0, 1])
  assert [(r["method"], r["seeds"]) for r in rows] == [("metadcseg", [0]), ("ce", [0, 1])]
  assert rows[1]["ema"]["dice"]["mean"] == pytest.approx(0.65)


def test_collect_errors(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    sweep.collect(tmp_path / "missing")
  d = sweep.run_dir(tmp_path, "none", "ce", 0)
  d.mkdir(parents=True)
  (d / "results.json").write_text('{"epoch": 1}')
  with pytest.raises(ValueError, match="results.json"):
    sweep.collect(tmp_path)


def test_to_markdown(fake_sweep):
  md = sweep.to_markdown(sweep.collect(fake_sweep), command="metadcseg-sweep --seeds=0,1,2")
  assert "metadcseg-sweep --seeds=0,1,2" in md
  lines = md.splitlines()
  # Pivot: one row per noise, one column per method; "-" where a combination has no run.
  assert "| noise | ce | metadcseg |" in lines
  assert "| none | 0.9500 | - |" in lines
  assert f"| l2b40 | 0.7000 ± 0.1000 | 0.8800 ± {0.04 / math.sqrt(2):.4f} |" in lines
  assert (f"| l2b40 | ce | 0,1,2 | 2 | 0.7000 ± 0.1000 | 0.5500 ± 0.0500 | "
          f"14.00 ± {math.sqrt(28):.2f} |") in lines
  assert "| none | ce | 0 | 2 | 0.9500 | 0.9100 | 2.00 |" in lines
  assert "No finished runs" in sweep.to_markdown([])


def test_run_sweep_skips_finished_runs(tmp_path, monkeypatch):
  from metadcseg_jax import train  # pylint: disable=g-import-not-at-top
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
  kwargs = dict(methods=["ce", "l2b"], noises=["none", "l2b40"], seeds=[0, 1],
                command="cmd", echo=lines.append)
  rows = sweep.run_sweep(config, tmp_path, **kwargs)

  expected = [(n, m, s) for s in (0, 1) for n in ("none", "l2b40") for m in ("ce", "l2b")]
  expected.remove(("l2b40", "l2b", 1))
  assert [c[:3] for c in calls] == expected
  assert all(pathlib.Path(c[3]) == sweep.run_dir(tmp_path, *c[:3]).resolve() for c in calls)
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
  sweep.run_sweep(config, tmp_path, **kwargs)
  assert not calls


def test_run_sweep_rejects_bad_grid(tmp_path):
  with pytest.raises(ValueError, match="--methods"):
    sweep.run_sweep(tiny.get_config(), tmp_path, methods=["ce", "dice"], noises=["none"],
                    seeds=[0])
  with pytest.raises(ValueError, match="--noise"):
    sweep.run_sweep(tiny.get_config(), tmp_path, methods=["ce"], noises=["l2b50"], seeds=[0])
  with pytest.raises(ValueError, match="--seeds"):
    sweep.parse_seeds(["0", "one"])


def test_command_line():
  assert sweep.command_line(["/usr/bin/metadcseg-sweep", "--workdir=a b"]) == \
      "metadcseg-sweep '--workdir=a b'"
  assert sweep.command_line(["/x/experiments/sweep.py", "--seeds=0"]) == \
      "python -m experiments.sweep --seeds=0"


def _png_size(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_curves_writes_png(tmp_path):
  lines = []
  for epoch in (1, 2, 3, 4):
    lines.append({"epoch": epoch, "step": 6 * epoch, "split": "train", "loss": 1.0 / epoch,
                  "lr": 0.05 * (1 - epoch / 5), "images_per_s": 10.0 * epoch, "grad_norm": 1.0,
                  "ce_term": 0.5 / epoch})
    if epoch % 2 == 0:
      for params, d in (("raw", 0.5), ("ema", 0.6)):
        lines.append({"epoch": epoch, "step": 6 * epoch, "split": "test", "params": params,
                      "dice": d + 0.1 * epoch, "iou": d, "hd95": 3.0})
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  out = plots.plot_curves(path, tmp_path / "figs" / "curves.png")
  w, h = _png_size(out)
  assert w > h > 300  # the 2x2 figure, landscape

  train_records, test_records = plots.read_metrics(path)
  assert [r["epoch"] for r in train_records] == [1, 2, 3, 4] and len(test_records) == 4
  path.write_text(path.read_text() + "{not json\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:9"):
    plots.plot_curves(path, tmp_path / "bad.png")
  with pytest.raises(ValueError, match="no such file"):
    plots.plot_curves(tmp_path / "missing.jsonl", tmp_path / "bad.png")


def test_plot_sweep_writes_png(fake_sweep, tmp_path):
  out = plots.plot_sweep(sweep.collect(fake_sweep), tmp_path / "sweep.png")
  assert min(_png_size(out)) > 100
  with pytest.raises(ValueError, match="empty"):
    plots.plot_sweep([], tmp_path / "none.png")


def test_notebook_is_valid_and_compiles():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert kinds[0] == "markdown" and kinds.count("code") >= 6
  text = "\n".join("".join(c["source"]) for c in nb["cells"])
  for needle in ("pip install", "jax[cuda12]", "jax.devices()", "train_and_evaluate",
                 "synthetic.get_config()", "panel.png", "plot_curves", 'data.name = "kvasir_seg"',
                 "manual_dir", "metadcseg-corrupt", "run_sweep"):
    assert needle in text, needle
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i} has outputs"
    src = "".join(cell["source"])
    py = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%")))
    compile(py, f"colab.ipynb cell {i}", "exec")
