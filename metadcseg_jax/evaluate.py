"""Evaluation of a trained state on a split: predictions in order, then MetaDCSeg §4.1 metrics.

Method-agnostic: it calls `method.predict(state, images, variant=...)` and nothing else, for
each parameter variant ("raw" and "ema") of `methods.base.VARIANTS`.
"""

import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

from metadcseg_jax import metrics as metrics_lib
from metadcseg_jax.data import pipeline
from metadcseg_jax.methods import base


class Predictor:
  """`method.predict`, jitted once per variant, fed fixed-size batches (one compiled shape)."""

  def __init__(self, method: base.Method):
    self.method = method

  @functools.cached_property
  def _jitted(self):
    return jax.jit(self.method.predict, static_argnames=("variant",))

  def probs(self, state: Any, images: np.ndarray, *, variant: str, batch_size: int) -> np.ndarray:
    """Class probabilities (N,H,W,L) of images (N,H,W,C), in batches of `batch_size` (the
    last one padded)."""
    out = []
    for start in range(0, len(images), batch_size):
      chunk = images[start : start + batch_size]
      x = np.zeros((batch_size,) + chunk.shape[1:], np.float32)
      x[: len(chunk)] = chunk
      out.append(np.asarray(self._jitted(state, x, variant=variant))[: len(chunk)])
    return np.concatenate(out)

  def predict_split(
    self, state: Any, records: pipeline.Records, *, variant: str, batch_size: int
  ) -> dict[str, np.ndarray]:
    """A split's images in order with their labels and predictions.

    Returns:
      "image" (N,H,W,C), "label" and "noisy_label" (N,H,W), "pred" (N,H,W) int32 argmax and
      "prob" (N,H,W) foreground probability (1 - p(background)).
    """
    out = {"image": [], "label": [], "noisy_label": [], "pred": [], "prob": []}
    for batch in pipeline.eval_batches(records, batch_size):
      probs = self.probs(state, batch["image"], variant=variant, batch_size=batch_size)
      for k in ("image", "label", "noisy_label"):
        out[k].append(batch[k])
      out["pred"].append(np.argmax(probs, axis=-1).astype(np.int32))
      out["prob"].append(1.0 - probs[..., 0])
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_cases(
  predictor: Predictor,
  state: Any,
  records: pipeline.Records,
  *,
  batch_size: int,
  num_classes: int,
  spacing=None,
  variants: Sequence[str] = base.VARIANTS,
) -> dict[str, tuple[list[str], list[dict[str, Any]]]]:
  """MetaDCSeg §4.1 metrics of every case of a split for each parameter variant.

  3D datasets (several slices per case id) are scored per volume, 2D ones per image, in pixels
  unless `spacing` ({case id: (slice, row, col) mm}) is given for the volumes.

  Returns:
    {variant: (case ids, per-case `metrics.case_metrics` dicts)}, the cases in the order of
    their first slice in `records` (2D: the records' order).
  """
  case_ids = [records.case_id(i) for i in range(len(records))]
  per_volume = len(set(case_ids)) < len(case_ids)
  results = {}
  for variant in variants:
    out = predictor.predict_split(state, records, variant=variant, batch_size=batch_size)
    if per_volume:
      slice_idx = [int(np.asarray(records.source[int(i)]["slice_index"])) for i in records.indices]
      by_case = metrics_lib.volume_metrics(
        out["pred"],
        out["label"],
        np.asarray(case_ids),
        slice_indices=np.asarray(slice_idx),
        num_classes=num_classes,
        spacing=spacing,
      )
      ids = list(dict.fromkeys(case_ids))
      results[variant] = (ids, [by_case[c] for c in ids])
    else:
      cases = metrics_lib.batch_case_metrics(out["pred"], out["label"], num_classes=num_classes)
      results[variant] = (case_ids, cases)
  return results


def evaluate(
  predictor: Predictor,
  state: Any,
  records: pipeline.Records,
  *,
  batch_size: int,
  num_classes: int,
  spacing=None,
) -> dict[str, dict[str, float]]:
  """MetaDCSeg §4.1 metrics of a split for each parameter variant (`evaluate_cases`, averaged).

  Returns:
    {variant: `metrics.summarize` dict} for "raw" and "ema".
  """
  per_case = evaluate_cases(
    predictor, state, records, batch_size=batch_size, num_classes=num_classes, spacing=spacing
  )
  return {variant: metrics_lib.summarize(cases) for variant, (_, cases) in per_case.items()}


# The per-case scores a run keeps (cases.json), for paired statistics without retraining.
CASE_KEYS = ("dice", "iou", "hd95")


def case_scores(case_ids: Sequence[str], cases: Sequence[dict[str, Any]]) -> dict[str, list]:
  """{"case_ids": [...], metric: [value per case]} over `CASE_KEYS` (inf/NaN as None)."""
  out: dict[str, list] = {"case_ids": [str(c) for c in case_ids]}
  for k in CASE_KEYS:
    out[k] = [float(c[k]) if math.isfinite(float(c[k])) else None for c in cases]
  return out
