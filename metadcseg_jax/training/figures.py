"""Figures (PNG, matplotlib Agg): predictions, a method's per-pixel maps, curves, benchmarks.

    figures.write_panel("runs/x/panel.png", predictor, state, splits)
    figures.write_maps_figure("runs/x/dcd.png", batch, method.explain(state, batch))
    figures.plot_curves("runs/x/metrics.jsonl", "runs/x/curves.png")
    figures.plot_dice_vs_noise(cells, "runs/bench/dice_vs_noise.png")

Nothing here knows a method's insides: the panel calls `Predictor`, the maps figure draws the
`PixelMap`s a method's `explain` returns.
"""

import pathlib
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import colors  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
import numpy as np

from metadcseg_jax.methods import base
from metadcseg_jax.training import evaluate
from metadcseg_jax.training import workdir as workdir_lib


def _show_image(ax, image: np.ndarray) -> None:
  img = image[..., 0] if image.shape[-1] == 1 else image
  lo, hi = np.percentile(img, (1, 99))
  ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")


def _show_mask(ax, image: np.ndarray, mask: np.ndarray, color: str) -> None:
  _show_image(ax, image)
  ax.imshow(
    np.ma.masked_where(mask == 0, mask),
    cmap=colors.ListedColormap([color]),
    alpha=0.45,
    vmin=0,
    vmax=1,
  )
  if mask.any():
    ax.contour(mask > 0, levels=[0.5], colors=color, linewidths=0.8)


def _save(fig, axes, cols, path) -> None:
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  for ax, title in zip(axes[0], cols):
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_panel(
  path: pathlib.Path,
  predictor: evaluate.Predictor,
  state: Any,
  splits,
  *,
  n: int = 6,
  batch_size: int = 16,
) -> None:
  """Rows of test images (image, label, prediction) and of training images (image, clean label,
  noisy label, prediction) with the EMA parameters.

  Args:
    path: the PNG to write.
    predictor: the run's `evaluate.Predictor`.
    state: the trained state.
    splits: `pipeline.DataSplits`; the first `n` images of test and of train are shown.
    n: images per split.
    batch_size: prediction batch size.
  """
  rows = []
  for name, records in (("test", splits.test), ("train", splits.train)):
    subset = records.subset(min(n, len(records)))
    out = predictor.predict_split(state, subset, variant="ema", batch_size=batch_size)
    rows += [(name, {key: v[i] for key, v in out.items()}) for i in range(len(subset))]
  cols = ["image", "label", "noisy label", "prediction (EMA)", "fg probability"]
  fig, axes = plt.subplots(
    len(rows), len(cols), figsize=(2.2 * len(cols), 2.2 * len(rows)), squeeze=False
  )
  for r, (name, ex) in enumerate(rows):
    _show_image(axes[r, 0], ex["image"])
    axes[r, 0].set_ylabel(name)
    _show_mask(axes[r, 1], ex["image"], ex["label"], "lime")
    if name == "train":
      _show_mask(axes[r, 2], ex["image"], ex["noisy_label"], "orange")
    else:
      axes[r, 2].text(0.5, 0.5, "(test: clean)", ha="center", va="center")
    _show_mask(axes[r, 3], ex["image"], ex["pred"], "red")
    axes[r, 4].imshow(ex["prob"], cmap="magma", vmin=0, vmax=1)
  _save(fig, axes, cols, path)


def write_maps_figure(
  path: pathlib.Path, batch: Mapping[str, np.ndarray], maps: Sequence[base.PixelMap]
) -> None:
  """Per training image: the image with its clean label, the noisy label, then each map (the
  paper's Fig. 3 for MetaDCSeg's γ and DCD weights).

  Args:
    path: the PNG to write.
    batch: "image" (B,H,W,C), "label" and "noisy_label" (B,H,W).
    maps: the method's `explain` output, values (B,H,W) each (NaN pixels undrawn).
  """
  cols = ["image + clean label", "noisy label"] + [m.title for m in maps]
  images = np.asarray(batch["image"])
  n = len(images)
  fig, axes = plt.subplots(n, len(cols), figsize=(2.8 * len(cols), 2.4 * n), squeeze=False)
  for r in range(n):
    _show_mask(axes[r, 0], images[r], np.asarray(batch["label"][r]), "lime")
    _show_mask(axes[r, 1], images[r], np.asarray(batch["noisy_label"][r]), "orange")
    for c, m in enumerate(maps, start=2):
      values = np.asarray(m.values[r], np.float64)
      shown = np.ma.masked_invalid(values)
      if m.log:
        _show_image(axes[r, c], images[r])
        top = float(shown.max()) if shown.count() and shown.max() > 0 else 1.0
        norm = colors.LogNorm(vmin=top * 1e-4, vmax=top)
        im = axes[r, c].imshow(np.ma.maximum(shown, top * 1e-4), cmap="inferno", norm=norm)
      else:
        im = axes[r, c].imshow(shown, cmap="viridis")
      fig.colorbar(im, ax=axes[r, c], fraction=0.046)
  _save(fig, axes, cols, path)


def write_audit_gallery(
  path: pathlib.Path,
  *,
  images: np.ndarray,
  given: np.ndarray,
  model: np.ndarray,
  suspicion: np.ndarray,
  titles: Sequence[str],
) -> None:
  """The label audit's most suspicious masks, one row each: image, given mask, the model's
  mask, the suspicion map (metadcseg_jax/training/audit_passes.py), the row's title on the image.

  Args: images (N,H,W,C), given and model (N,H,W) labels, suspicion (N,H,W) in [0, 1].
  """
  cols = ["image", "given mask", "model's mask", "suspicion"]
  n = max(len(images), 1)
  fig, axes = plt.subplots(n, 4, figsize=(2.8 * 4, 2.4 * n), squeeze=False)
  for r in range(len(images)):
    _show_image(axes[r, 0], images[r])
    axes[r, 0].set_ylabel(titles[r], fontsize=7)
    _show_mask(axes[r, 1], images[r], np.asarray(given[r]), "orange")
    _show_mask(axes[r, 2], images[r], np.asarray(model[r]), "deepskyblue")
    im = axes[r, 3].imshow(np.asarray(suspicion[r], np.float32), cmap="magma", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[r, 3], fraction=0.046)
  _save(fig, axes, cols, path)


def write_audit_roc(
  path: pathlib.Path,
  curves: Mapping[float, Mapping[str, tuple[np.ndarray, np.ndarray, float]]],
  *,
  title: str = "",
) -> None:
  """ROC curves of the label audit's scores for "this mask is corrupted", one panel per
  threshold on 1 − Dice to the clean mask.

  Args: curves {threshold: {score name: (fpr (K+1,), tpr (K+1,), AUROC)}}.
  """
  fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), squeeze=False)
  for ax, (threshold, by_score) in zip(axes[0], curves.items()):
    for name, (fpr, tpr, area) in by_score.items():
      ax.plot(fpr, tpr, label=f"{name} ({area:.3f})", lw=1.4)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"corrupted: 1 − Dice to the clean mask > {threshold:g}", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


_LABELS = {"dice": "Dice", "iou": "IoU", "miou": "mIoU", "hd": "HD", "hd95": "HD95", "asd": "ASD"}


def read_metrics(path) -> dict[str, list[dict[str, Any]]]:
  """Reads a metrics.jsonl file (torn lines dropped with a warning, `workdir.MetricsLog`).

  Args:
    path: the trainer's `workdir/metrics.jsonl`.

  Returns:
    {split: records in file order}: "train" (one per epoch), "val" (one per evaluation and
    parameter set), "diagnostics" (one per diagnostics point), ...

  Raises:
    ValueError: the file is missing.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"metrics_jsonl_path={str(path)!r}: no such file")
  out: dict[str, list[dict[str, Any]]] = {}
  for record in workdir_lib.MetricsLog(path).read():
    out.setdefault(record.get("split", "?"), []).append(record)
  return out


def _series(
  records: Sequence[Mapping[str, Any]], key: str, x: str = "epoch"
) -> tuple[np.ndarray, np.ndarray]:
  """(x values, values) of the records that have a finite `key`."""
  pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float))]
  pts = [(a, b) for a, b in pts if np.isfinite(b)]
  if not pts:
    return np.zeros(0), np.zeros(0)
  xs, ys = zip(*pts)
  return np.asarray(xs, float), np.asarray(ys, float)


def _empty(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _lines(ax, records, keys, *, x="epoch", style=".-", empty="nothing logged") -> bool:
  drawn = False
  for key, color in keys:
    xs, ys = _series(records, key, x)
    if xs.size:
      ax.plot(xs, ys, style, ms=3, lw=1, label=key, color=color)
      drawn = True
  if drawn:
    ax.legend(fontsize=7)
  else:
    _empty(ax, empty)
  return drawn


def plot_curves(metrics_jsonl_path, out_png) -> pathlib.Path:
  """Writes a 2x3 figure of one run's curves.

  Panels: training loss per epoch (with its terms when logged); validation Dice per evaluation
  for the raw and the EMA parameters; the learning rate; and, from the diagnostics lines, each
  loss term's gradient norm before clipping, the cosine of the total gradient with the CE
  term's and the meta-weight shares (zero-weight pixels, α's share where label and prediction
  disagree), and the DCD weights' effective support; then training throughput.

  Args:
    metrics_jsonl_path: the trainer's `workdir/metrics.jsonl`.
    out_png: the PNG to write (its folder is created).

  Returns:
    The path written.

  Raises:
    ValueError: unreadable metrics file, or no records in it.
  """
  records = read_metrics(metrics_jsonl_path)
  train, val, diag = (records.get(k, []) for k in ("train", "val", "diagnostics"))
  if not train and not val:
    raise ValueError(f"metrics_jsonl_path={str(metrics_jsonl_path)!r}: no records")
  fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
  (ax_loss, ax_dice, ax_lr), (ax_grad, ax_share, ax_speed) = axes
  _epoch_panels(ax_loss, ax_dice, ax_lr, ax_speed, train, val)
  _diagnostics_panels(ax_grad, ax_share, diag)
  for ax in axes.ravel():
    ax.grid(alpha=0.3)
  for ax in (ax_loss, ax_dice, ax_lr, ax_speed):
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  # The run folder's last parts name it in a sweep (<noise>/<method>/seed<k>).
  parts = pathlib.Path(metrics_jsonl_path).resolve().parent.parts[-3:]
  fig.suptitle("/".join(parts), fontsize=10)
  return _write_png(fig, out_png)


def _write_png(fig, out_png, dpi: int = 90) -> pathlib.Path:
  """Lays `fig` out, writes it to `out_png` (its folder created) and closes it."""
  fig.tight_layout()
  out = pathlib.Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=dpi)
  plt.close(fig)
  return out


def _epoch_panels(ax_loss, ax_dice, ax_lr, ax_speed, train, val) -> None:
  """`plot_curves`' panels per epoch: training loss and its terms, validation Dice (raw and
  EMA, the last value written beside), learning rate, throughput."""
  _lines(
    ax_loss,
    train,
    [
      ("loss", "black"),
      ("ce_term", "tab:blue"),
      ("bd_term", "tab:orange"),
      ("dice_term", "tab:green"),
      ("meta_loss", "tab:purple"),
    ],
    empty="no training epochs logged",
  )
  ax_loss.set(title="training loss (epoch mean)", xlabel="epoch")

  any_dice = False
  for params, style in (("raw", "s--"), ("ema", "o-")):
    x, y = _series([r for r in val if r.get("params") == params], "dice")
    if x.size:
      any_dice = True
      ax_dice.plot(x, y, style, ms=4, label=params)
      ax_dice.annotate(
        f"{y[-1]:.3f}", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 0), fontsize=8
      )
  if any_dice:
    ax_dice.legend(fontsize=8)
  else:
    _empty(ax_dice, "no evaluation yet")
  ax_dice.set(title="validation Dice", xlabel="epoch")

  _lines(ax_lr, train, [("lr", "tab:red")], empty="no learning rate logged")
  ax_lr.set(title="learning rate (epoch start)", xlabel="epoch")

  _lines(ax_speed, train, [("images_per_s", "tab:gray")], empty="no throughput logged")
  ax_speed.set_ylim(bottom=0)
  ax_speed.set(title="throughput, images/s (epoch 1 includes jit)", xlabel="epoch")


def _diagnostics_panels(ax_grad, ax_share, diag) -> None:
  """`plot_curves`' panels per diagnostics step: each loss term's gradient norm (log scale),
  the cosine of the total gradient with the CE term's and the meta-weight shares, with the DCD
  weights' effective support on a second axis."""
  if _lines(
    ax_grad,
    diag,
    [
      ("grad_norm_ce_term", "tab:blue"),
      ("grad_norm_bd_term", "tab:orange"),
      ("grad_norm_dice_term", "tab:green"),
      ("grad_norm_total", "black"),
    ],
    x="step",
    empty="no diagnostics logged",
  ):
    ax_grad.set_yscale("log")
  ax_grad.set(title="gradient norm per loss term (before clipping)", xlabel="step")

  _lines(
    ax_share,
    diag,
    [
      ("cos_total_ce", "black"),
      ("weight_zero_frac", "tab:gray"),
      ("alpha_share_disagree", "tab:purple"),
      ("alpha_share", "tab:pink"),
    ],
    x="step",
    empty="no diagnostics logged",
  )
  ax_share.set(title="cos(total, CE) and meta-weight shares", xlabel="step")
  x, y = _series(diag, "dcd_support", "step")
  if x.size:
    twin = ax_share.twinx()
    twin.plot(x, y, "x:", ms=3, color="tab:orange", label="DCD support 1/Σw²")
    twin.set_ylabel("DCD support (pixels)", color="tab:orange", fontsize=8)


def plot_dice_vs_noise(
  cells: Sequence[Mapping[str, Any]], out_png, *, label=str, metric: str = "dice"
) -> pathlib.Path:
  """Test `metric` against noise level, mean ± std over seeds, one line per row; EMA and raw
  parameters side by side.

  Args:
    cells: `benchmark.collect`'s cells: "noise", "label", "test" -> "ema"/"raw" -> metric ->
      {"mean", "std"}; noise levels and rows in the order of the cells.
    out_png: the PNG to write (its folder is created).
    label: noise kind -> axis tick label.
    metric: which metric (default "dice").

  Returns:
    The path written.

  Raises:
    ValueError: no cells.
  """
  cells = list(cells)
  if not cells:
    raise ValueError("cells is empty: nothing to plot")
  noises = list(dict.fromkeys(c["noise"] for c in cells))
  rows = list(dict.fromkeys(c["label"] for c in cells))
  by = {(c["noise"], c["label"]): c for c in cells}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, params in zip(axes, ("ema", "raw")):
    for j, row in enumerate(rows):
      xs, means, stds = [], [], []
      for i, n in enumerate(noises):
        stat = by.get((n, row), {}).get("test", {}).get(params, {}).get(metric)
        if stat is not None:
          xs.append(i + (j - (len(rows) - 1) / 2) * 0.04)  # small offsets: bars stay apart
          means.append(stat["mean"])
          stds.append(stat["std"] or 0.0)
      if xs:
        ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, label=row)
    ax.set_xticks(range(len(noises)), [label(n) for n in noises])
    ax.set(title=f"test {_LABELS.get(metric, metric)}, {params} parameters", xlabel="label noise")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"{_LABELS.get(metric, metric)} (mean ± std over seeds)")
  axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _write_png(fig, out_png)


def plot_setting_sweep(
  series: Mapping[str, Sequence[Mapping[str, Any]]],
  out_png,
  *,
  label=str,
  xlabel: str = "setting",
  params: str = "ema",
  metric: str = "dice",
) -> pathlib.Path:
  """Test `metric` against one setting (training budget, meta-set size), mean ± std over seeds,
  one panel per noise level and one line per row.

  Args:
    series: {setting label: `benchmark.collect`'s cells of that setting's benchmark}, in the
      order of the x axis.
    out_png: the PNG to write (its folder is created).
    label: noise kind -> panel title.
    xlabel: the setting's name, under the x axis.
    params: "ema" or "raw".
    metric: which metric (default "dice").

  Returns:
    The path written.

  Raises:
    ValueError: no cells in any setting.
  """
  cells = [(x, c) for x, cs in series.items() for c in cs]
  if not cells:
    raise ValueError("series holds no cells: nothing to plot")
  settings = list(series)
  noises = list(dict.fromkeys(c["noise"] for _, c in cells))
  rows = list(dict.fromkeys(c["label"] for _, c in cells))
  by = {(x, c["noise"], c["label"]): c for x, c in cells}
  fig, axes = plt.subplots(1, len(noises), figsize=(4.6 * len(noises) + 1.6, 4.0), sharey=True)
  axes = np.atleast_1d(axes)
  for ax, n in zip(axes, noises):
    for j, row in enumerate(rows):
      xs, means, stds, seeds = [], [], [], []
      for i, x in enumerate(settings):
        cell = by.get((x, n, row))
        stat = cell and cell["test"][params].get(metric)
        if stat:
          xs.append(i + (j - (len(rows) - 1) / 2) * 0.05)  # small offsets: bars stay apart
          means.append(stat["mean"])
          stds.append(stat["std"] or 0.0)
          seeds.append(len(cell["seeds"]))
      if xs:
        color = f"C{j % 10}"  # a row keeps its colour in every panel
        ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, label=row, color=color)
        for x, m, k in zip(xs, means, seeds):
          if k == 1:  # one seed: no spread to show, and the reader should know
            ax.plot(x, m, "o", mfc="white", mec=color, ms=6)
    ax.set_xticks(range(len(settings)), settings)
    ax.set(title=f"{label(n)}: test {_LABELS.get(metric, metric)}, {params}", xlabel=xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"{_LABELS.get(metric, metric)} (mean ± std over seeds; open: one seed)")
  axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _write_png(fig, out_png)
