"""Figures: a PNG panel of predictions (issue 2) and the γ / DCD-weight picture (paper Fig. 3)."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def _show_image(ax, image: np.ndarray) -> None:
  img = image[..., 0] if image.shape[-1] == 1 else image
  lo, hi = np.percentile(img, (1, 99))
  ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")


def _show_mask(ax, image: np.ndarray, mask: np.ndarray, color: str) -> None:
  _show_image(ax, image)
  ax.imshow(np.ma.masked_where(mask == 0, mask), cmap=matplotlib.colors.ListedColormap([color]),
            alpha=0.45, vmin=0, vmax=1)
  if mask.any():
    ax.contour(mask > 0, levels=[0.5], colors=color, linewidths=0.8)


def write_panel(path: pathlib.Path, eval_fn, state, splits, *, n: int = 6,
                batch_size: int = 16) -> None:
  """Rows of test images (image, label, prediction) and of training images (image, clean
  label, noisy label, prediction) with the EMA parameters."""
  from metadcseg_jax import train  # pylint: disable=g-import-not-at-top

  rows = []
  for name, records in (("test", splits.test), ("train", splits.train)):
    k = min(n, len(records))
    subset = type(records)(records.source, records.indices[:k], name=records.name,
                           num_classes=records.num_classes, image_shape=records.image_shape,
                           noisy_labels=records.noisy_labels)
    out = train.predict(eval_fn, state.ema_params, state.batch_stats, subset, batch_size)
    rows += [(name, {key: v[i] for key, v in out.items()}) for i in range(k)]
  cols = ["image", "label", "noisy label", "prediction (EMA)", "fg probability"]
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.2 * len(cols), 2.2 * len(rows)),
                           squeeze=False)
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
    for c, ax in enumerate(axes[r]):
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(cols[c], fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
