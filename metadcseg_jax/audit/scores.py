"""The label audit's scores: the trainer's passes averaged, and measured against the truth.

The trainer writes a pass per audited epoch (`metadcseg_jax.training.audit_passes`: per-pixel
suspicion from the meta-weights, a score per image); `load` averages them, and the rest measures
a ranking against masks known to be corrupted (AUROC, average precision) beside two baselines
that read no meta-weights (the model's disagreement with the given mask, hard and soft).
"""

import pathlib
from typing import Any

import numpy as np
from scipy import stats

from metadcseg_jax.errors import UserError
from metadcseg_jax.training.audit_passes import AUDIT_DIR


class AuditError(UserError):
  """The workdir has no audit scores (not a meta method, or not trained to its last epochs)."""


def load(workdir, *, method: str | None = None) -> dict[str, Any]:
  """The audit passes of a run, averaged: {"index", "suspicion" (N,H,W) float32, "pseudo" (the
  last pass's), "probs" (N,H,W,L) float32 (mean; absent if not stored), "score" (N,),
  "epochs", "meta_images" (as in `audit_pass`)}.

  Raises:
    AuditError: no pass was written (names the method the run used, if known).
  """
  paths = sorted((pathlib.Path(workdir) / AUDIT_DIR).glob("epoch_*.npz"))
  paths = [p for p in paths if not p.name.endswith(".tmp.npz")]
  if not paths:
    what = f"its method is {method!r}; " if method else ""
    raise AuditError(
      f"{workdir} has no meta scores ({what}audit scores are written by the meta methods "
      f"l2b and metadcseg in their last config.audit.epochs epochs, into "
      f"{pathlib.Path(workdir) / AUDIT_DIR})"
    )
  passes = [dict(np.load(p)) for p in paths]
  index = passes[0]["index"]
  for p, d in zip(paths, passes):
    if not np.array_equal(d["index"], index):
      raise AuditError(f"{p}: its images differ from {paths[0]}'s (another dataset?)")
  meta_images = {int(d.get("meta_images", 0)) for d in passes}
  if len(meta_images) > 1:
    raise AuditError(
      f"{pathlib.Path(workdir) / AUDIT_DIR}: passes made with different meta sets "
      f"(meta_images {sorted(meta_images)}); recompute them (metadcseg-audit --recompute)"
    )
  mean = lambda key: np.mean([d[key].astype(np.float32) for d in passes], axis=0)
  return {
    "index": index,
    "suspicion": mean("suspicion"),
    **({"probs": mean("probs")} if all("probs" in d for d in passes) else {}),
    "pseudo": passes[-1]["pseudo"],
    "score": np.mean([d["score"] for d in passes], axis=0),
    "epochs": [int(p.stem.split("_")[1]) for p in paths],
    "meta_images": meta_images.pop(),
  }


# ------------------------------------------------------------------ measured against the truth


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with midranks for ties); NaN without both kinds."""
  positive = np.asarray(positive, bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = stats.rankdata(scores)
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(false positive rate, true positive rate), each (K+1,) from (0, 0) to (1, 1), one point
  per distinct score in decreasing order (ties move both rates at once, so the trapezoid area
  is `auroc`)."""
  positive = np.asarray(positive, bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  order = np.argsort(-scores, kind="stable")
  hits, ranked = positive[order], scores[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]
  tp, fp = np.cumsum(hits)[last_of_tie], np.cumsum(~hits)[last_of_tie]
  tpr = np.r_[0.0, tp / max(int(positive.sum()), 1)]
  fpr = np.r_[0.0, fp / max(int((~positive).sum()), 1)]
  return fpr, tpr


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
  """Σ over the positives, in decreasing score, of the precision at each (sklearn's AP without
  interpolation; ties broken by the order given)."""
  positive = np.asarray(positive, bool).ravel()
  if not positive.any():
    return float("nan")
  order = np.argsort(-np.asarray(scores, np.float64).ravel(), kind="stable")
  hits = positive[order]
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(precision[hits].mean())


def soft_dice_distance(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """(N,) 1 − soft Dice between the given foreground y (N,H,W) and the model's foreground
  probability 1 − p(background) from `probs` (N,H,W,L): Σ|y − p| / (|y| + Σp), a baseline that
  reads the model's probabilities only (no meta-weights)."""
  y = (np.asarray(y) > 0).astype(np.float32)
  p = 1.0 - np.asarray(probs, np.float32)[..., 0]
  axes = tuple(range(1, y.ndim))
  total = y.sum(axis=axes) + p.sum(axis=axes)
  return np.where(total > 0, np.abs(y - p).sum(axis=axes) / np.maximum(total, 1e-12), 0.0)


def dice_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N,) 1 − Dice of the foregrounds of two label stacks (0 when both are empty)."""
  axes = tuple(range(1, a.ndim))
  inter = np.sum((a > 0) & (b > 0), axis=axes)
  total = np.sum(a > 0, axis=axes) + np.sum(b > 0, axis=axes)
  return np.where(total > 0, 1.0 - 2.0 * inter / np.maximum(total, 1), 0.0)
