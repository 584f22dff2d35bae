"""Figures: a PNG panel of predictions (issue 2) and the γ / DCD-weight picture (paper Fig. 3)."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from metadcseg_jax import meta
from metadcseg_jax import objective


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


def _save(fig, axes, cols, path) -> None:
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  for ax, title in zip(axes[0], cols):
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


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
  _save(fig, axes, cols, path)


def dcd_maps(model, optimizer, state, meta_cfg, loss_kwargs, x, y, xv, yv
             ) -> dict[str, np.ndarray]:
  """γ (Eq. 9), the boundary set and the DCD weights (Eq. 12) of one training batch.

  Runs the training step's own meta step (`meta_cfg`) and objective (`loss_kwargs`, from
  `train.objective_kwargs`), jitted once for the figure.
  """

  def maps(variables, opt_state, centers, x, y, xv, yv):
    mo = meta.meta_weights(model.apply, variables, opt_state, optimizer, x, y, xv, yv,
                           a0b0=(meta_cfg.a0, meta_cfg.b0), eta=meta_cfg.eta,
                           normalizer=meta_cfg.normalizer, route=meta_cfg.route)
    _, aux = objective.metadcseg_loss(
        mo.logits, mo.features, x, y, a_hat=mo.a_hat, b_hat=mo.b_hat, gamma=mo.gamma,
        pi_a=mo.pi_a, pi_b=mo.pi_b, y_pseudo=mo.y_pseudo, default_centers=centers,
        **loss_kwargs)
    return {"gamma": mo.gamma, "w": aux["w"], "bd": aux["bd"]}

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  out = jax.jit(maps)(variables, state.opt_state, state.dcd_centers, x, y, xv, yv)
  return jax.tree.map(np.asarray, out)


def write_dcd_figure(path: pathlib.Path, images: np.ndarray, noisy: np.ndarray,
                     clean: np.ndarray, maps: dict[str, np.ndarray]) -> None:
  """A picture like the paper's Fig. 3: per training image, the image with its clean label,
  the noisy label, the reliability γ = α̃ + β̃ and the DCD weights over the boundary set."""
  cols = ["image + clean label", "noisy label", "γ (reliability)",
          "DCD weight on boundary (log)"]
  n = len(images)
  fig, axes = plt.subplots(n, len(cols), figsize=(2.6 * len(cols), 2.4 * n), squeeze=False)
  for r in range(n):
    _show_mask(axes[r, 0], images[r], clean[r], "lime")
    _show_mask(axes[r, 1], images[r], noisy[r], "orange")
    im = axes[r, 2].imshow(maps["gamma"][r], cmap="viridis")
    fig.colorbar(im, ax=axes[r, 2], fraction=0.046)
    bd = maps["bd"][r].astype(bool)
    w = np.ma.masked_where(~bd, maps["w"][r])
    _show_image(axes[r, 3], images[r])
    # The softmax over DCD/τ_dcd (Eq. 12) is very peaked: a log scale shows the whole ring.
    top = float(w.max()) if bd.any() and w.max() > 0 else 1.0
    norm = matplotlib.colors.LogNorm(vmin=top * 1e-4, vmax=top)
    im = axes[r, 3].imshow(np.ma.maximum(w, top * 1e-4), cmap="inferno", norm=norm)
    fig.colorbar(im, ax=axes[r, 3], fraction=0.046)
  _save(fig, axes, cols, path)
