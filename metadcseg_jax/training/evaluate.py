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
    last one padded).

    Args:
      state: the method's state.
      images: (N,H,W,C) float32.
      variant: "raw" or "ema" parameters.
      batch_size: the batch each call predicts.
    """
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

    Args:
      state: the method's state.
      records: the split's records, in order.
      variant: "raw" or "ema" parameters.
      batch_size: the batch each call predicts.

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
  class_names: Sequence[str] | None = None,
) -> dict[str, tuple[list[str], list[dict[str, Any]]]]:
  """MetaDCSeg §4.1 metrics of every case of a split for each parameter variant.

  3D datasets (several slices per case id) are scored per volume, 2D ones per image, in pixels
  unless `spacing` ({case id: (slice, row, col) mm}) is given for the volumes. With more than
  two classes every foreground class is scored on its own (`metrics.case_metrics`).

  Args:
    class_names: names of the foreground classes 1..L-1, checked here against `num_classes`
      before anything is predicted; the case dicts key their classes by label, and
      `metrics.summarize` and `case_scores` name them.

  Returns:
    {variant: (case ids, per-case `metrics.case_metrics` dicts)}, the cases in the order of
    their first slice in `records` (2D: the records' order).
  """
  if class_names is not None:
    metrics_lib.foreground_names(num_classes, class_names)
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
  class_names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
  """MetaDCSeg §4.1 metrics of a split for each parameter variant (`evaluate_cases`, averaged).

  Args:
    class_names: names of the foreground classes 1..L-1 (default "class1", ...), the keys of
      "per_class" when there are more than two classes.

  Returns:
    {variant: `metrics.summarize` dict} for "raw" and "ema".
  """
  per_case = evaluate_cases(
    predictor,
    state,
    records,
    batch_size=batch_size,
    num_classes=num_classes,
    spacing=spacing,
    class_names=class_names,
  )
  return {
    variant: metrics_lib.summarize(cases, class_names=class_names)
    for variant, (_, cases) in per_case.items()
  }


# The per-case scores a run keeps (cases.json), for paired statistics without retraining.
CASE_KEYS = ("dice", "iou", "hd95")


def _finite(value: Any) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def case_scores(
  case_ids: Sequence[str],
  cases: Sequence[dict[str, Any]],
  *,
  class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """One run's per-case scores, as cases.json keeps them (inf/NaN as None).

  Args:
    case_ids: the N case ids.
    cases: the N `metrics.case_metrics` dicts, in the same order.
    class_names: names of the foreground classes 1..L-1 (default "class1", ...).

  Returns:
    {"case_ids": [...], metric: [value per case]} over `CASE_KEYS`; cases of more than two
    classes add "per_class": {name: {metric: [value per case]}} over `CASE_KEYS`.
  """
  out: dict[str, Any] = {"case_ids": [str(c) for c in case_ids]}
  for k in CASE_KEYS:
    out[k] = [_finite(c[k]) for c in cases]
  if cases and "per_class" in cases[0]:
    labels = sorted(cases[0]["per_class"])
    names = metrics_lib.foreground_names(len(labels) + 1, class_names)
    out["per_class"] = {
      name: {k: [_finite(c["per_class"][label][k]) for c in cases] for k in CASE_KEYS}
      for label, name in zip(labels, names)
    }
  elif class_names is not None:
    metrics_lib.foreground_names(2, class_names)
  return out
