"""Training curves of one run and the bar chart of a sweep (PNG, matplotlib Agg).

    plots.plot_curves("runs/synthetic/metrics.jsonl", "runs/synthetic/curves.png")
    plots.plot_sweep(sweep.collect("runs/sweep"), "runs/sweep/sweep.png")

`plot_curves` reads the trainer's metrics.jsonl (one "train" line per epoch: epoch, step, loss,
lr, images_per_s, ...; one "test" line per evaluation and parameter set "raw"/"ema" with the
SPEC §7 metrics). `plot_sweep` takes the rows of `experiments.sweep.collect`.
"""

import json
import pathlib
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
import numpy as np

_LABELS = {"dice": "Dice", "iou": "IoU", "miou": "mIoU", "hd": "HD", "hd95": "HD95",
           "asd": "ASD"}


def read_metrics(path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Reads a metrics.jsonl file.

  Args:
    path: the trainer's `workdir/metrics.jsonl`.

  Returns:
    `(train, test)`: the "train" records (one per epoch) and the "test" records (one per
    evaluation and parameter set), each in file order.

  Raises:
    ValueError: the file is missing, or a line is not a JSON object with "split" and "epoch".
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"metrics_jsonl_path={str(path)!r}: no such file")
  train, test = [], []
  for n, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or "split" not in record or "epoch" not in record:
      raise ValueError(f"{path}:{n}: expected a JSON object with 'split' and 'epoch'")
    (train if record["split"] == "train" else test).append(record)
  return train, test


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, values) of the records that have `key`."""
  pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  x, y = zip(*pts)
  return np.asarray(x, float), np.asarray(y, float)


def _empty(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_curves(metrics_jsonl_path, out_png) -> pathlib.Path:
  """Writes a 2x2 figure of one run's curves.

  Panels: training loss per epoch (with the loss terms ce/bd/dice when logged), learning rate
  per epoch (at the epoch's first step), test Dice per evaluation for the raw and the EMA
  parameters, and training throughput (images/s, the first epoch includes jit compilation).

  Args:
    metrics_jsonl_path: the trainer's `workdir/metrics.jsonl`.
    out_png: the PNG to write (its folder is created).

  Returns:
    The path written.

  Raises:
    ValueError: unreadable metrics file, or no records in it.
  """
  train, test = read_metrics(metrics_jsonl_path)
  if not train and not test:
    raise ValueError(f"metrics_jsonl_path={str(metrics_jsonl_path)!r}: no records")
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  ax_loss, ax_lr, ax_dice, ax_speed = axes.ravel()

  x, y = _series(train, "loss")
  if x.size:
    ax_loss.plot(x, y, "o-", ms=3, label="loss", color="black")
    for key, color in (("ce_term", "tab:blue"), ("bd_term", "tab:orange"),
                       ("dice_term", "tab:green"), ("meta_loss", "tab:purple")):
      xt, yt = _series(train, key)
      if xt.size:
        ax_loss.plot(xt, yt, ".--", lw=1, label=key, color=color)
    ax_loss.legend(fontsize=8)
  else:
    _empty(ax_loss, "no training epochs logged")
  ax_loss.set(title="training loss (epoch mean)", xlabel="epoch")

  x, y = _series(train, "lr")
  if x.size:
    ax_lr.plot(x, y, "o-", ms=3, color="tab:red")
  else:
    _empty(ax_lr, "no learning rate logged")
  ax_lr.set(title="learning rate (epoch start)", xlabel="epoch")

  any_dice = False
  for params, style in (("raw", "s--"), ("ema", "o-")):
    x, y = _series([r for r in test if r.get("params") == params], "dice")
    if x.size:
      any_dice = True
      ax_dice.plot(x, y, style, ms=4, label=params)
      ax_dice.annotate(f"{y[-1]:.3f}", (x[-1], y[-1]), textcoords="offset points",
                       xytext=(4, 0), fontsize=8)
  if any_dice:
    ax_dice.legend(fontsize=8)
  else:
    _empty(ax_dice, "no evaluation yet")
  ax_dice.set(title="test Dice", xlabel="epoch")

  x, y = _series(train, "images_per_s")
  if x.size:
    ax_speed.plot(x, y, "o-", ms=3, color="tab:gray")
    ax_speed.set_ylim(bottom=0)
  else:
    _empty(ax_speed, "no throughput logged")
  ax_speed.set(title="throughput, images/s (epoch 1 includes jit)", xlabel="epoch")

  for ax in axes.ravel():
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  # The run folder's last parts name it in a sweep (<noise>/<method>/seed<k>).
  parts = pathlib.Path(metrics_jsonl_path).resolve().parent.parts[-3:]
  fig.suptitle("/".join(parts), fontsize=10)
  fig.tight_layout()
  out = pathlib.Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


def plot_sweep(table_rows: Sequence[Mapping[str, Any]], out_png, *,
               metric: str = "dice") -> pathlib.Path:
  """Grouped bars of the final EMA `metric` per method, one group per noise level.

  Args:
    table_rows: rows of `experiments.sweep.collect`: each has "noise", "method" and
      `row["ema"][metric]` = {"mean": float, "std": float | None, ...}. Noise levels and methods
      appear in the order of the rows.
    out_png: the PNG to write (its folder is created).
    metric: which EMA metric (default "dice"); error bars are the std over seeds.

  Returns:
    The path written.

  Raises:
    ValueError: no rows, or a row without the metric.
  """
  rows = list(table_rows)
  if not rows:
    raise ValueError("table_rows is empty: nothing to plot")
  noises = list(dict.fromkeys(r["noise"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cell = {}
  for r in rows:
    try:
      cell[r["noise"], r["method"]] = r["ema"][metric]
    except (KeyError, TypeError):
      raise ValueError(f"row {r.get('noise')}/{r.get('method')} has no ema[{metric!r}]") from None
  width = min(0.8, 0.25 * len(methods)) / len(methods)
  fig, ax = plt.subplots(figsize=(max(5.0, 2.2 + 0.5 * len(noises) * len(methods)), 4))
  centers = np.arange(len(noises))
  for j, method in enumerate(methods):
    xs, means, stds = [], [], []
    for i, noise in enumerate(noises):
      if (noise, method) in cell:
        stat = cell[noise, method]
        xs.append(centers[i] + (j - (len(methods) - 1) / 2) * width)
        means.append(stat["mean"])
        stds.append(stat.get("std") or 0.0)
    bars = ax.bar(xs, means, width * 0.95, yerr=stds if any(stds) else None, capsize=3,
                  label=method)
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
  ax.set_xticks(centers, noises)
  ax.set_xlabel("label noise")
  ax.set_ylabel(f"test {_LABELS.get(metric, metric)} (EMA, mean ± std over seeds)")
  if metric in ("dice", "iou", "miou"):
    ax.set_ylim(0, 1.1)  # room for the bar labels
  ax.legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  out = pathlib.Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out
