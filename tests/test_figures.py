"""Tests of metadcseg_jax/training/figures.py: curves from a metrics log, the maps figure."""

import json
import pathlib

import numpy as np
import pytest

from metadcseg_jax.methods import base
from metadcseg_jax.training import figures


def _png_size(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_curves_writes_png(tmp_path):
  lines = []
  for epoch in (1, 2, 3, 4):
    lines.append(
      {
        "epoch": epoch,
        "step": 6 * epoch,
        "split": "train",
        "loss": 1.0 / epoch,
        "lr": 0.05 * (1 - epoch / 5),
        "images_per_s": 10.0 * epoch,
        "grad_norm": 1.0,
        "ce_term": 0.5 / epoch,
      }
    )
    if epoch % 2 == 0:
      for params, d in (("raw", 0.5), ("ema", 0.6)):
        lines.append(
          {
            "epoch": epoch,
            "step": 6 * epoch,
            "split": "val",
            "params": params,
            "dice": d + 0.1 * epoch,
            "iou": d,
            "hd95": 3.0,
          }
        )
    lines.append(
      {
        "epoch": epoch,
        "step": 6 * epoch - 3,
        "split": "diagnostics",
        "grad_norm_ce_term": 2.0,
        "grad_norm_bd_term": 0.5,
        "grad_norm_total": 2.2,
        "cos_total_ce": 0.97,
        "weight_zero_frac": 0.2,
        "alpha_share_disagree": 0.4,
        "dcd_support": float("nan"),
      }
    )
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  out = figures.plot_curves(path, tmp_path / "figs" / "curves.png")
  w, h = _png_size(out)
  assert w > 1.5 * h > 450  # the 2x3 figure, landscape

  records = figures.read_metrics(path)
  assert [r["epoch"] for r in records["train"]] == [1, 2, 3, 4] and len(records["val"]) == 4
  assert len(records["diagnostics"]) == 4
  path.write_text(path.read_text() + '{"epoch": 5, "spl')  # a kill during a write
  assert [r["epoch"] for r in figures.read_metrics(path)["train"]] == [1, 2, 3, 4]
  with pytest.raises(ValueError, match="no such file"):
    figures.plot_curves(tmp_path / "missing.jsonl", tmp_path / "bad.png")


def test_maps_figure_draws_each_map_and_skips_nan(tmp_path):
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.standard_normal((2, 16, 16, 1)),
    "label": np.zeros((2, 16, 16), int),
    "noisy_label": np.ones((2, 16, 16), int),
  }
  w = rng.uniform(1e-5, 1.0, (2, 16, 16))
  w[:, :4] = np.nan  # outside the boundary set
  maps = [base.PixelMap("gamma", rng.uniform(size=(2, 16, 16))), base.PixelMap("w", w, log=True)]
  path = tmp_path / "maps.png"
  figures.write_maps_figure(path, batch, maps)
  w_px, h_px = _png_size(path)
  assert w_px > h_px  # four columns, two rows
