"""Evaluation of a trained state on a split: predictions in order, then MetaDCSeg §4.1 metrics.

Method-agnostic: it calls `method.predict(state, images, variant=...)` and nothing else, for
each parameter variant ("raw" and "ema") of `methods.base.VARIANTS`.
"""

import functools
from typing import Any

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


def evaluate(
  predictor: Predictor,
  state: Any,
  records: pipeline.Records,
  *,
  batch_size: int,
  num_classes: int,
  spacing=None,
) -> dict[str, dict[str, float]]:
  """MetaDCSeg §4.1 metrics of a split for each parameter variant.

  3D datasets (several slices per case id) are scored per volume, 2D ones per image, in pixels
  unless `spacing` ({case id: (slice, row, col) mm}) is given for the volumes.

  Returns:
    {variant: `metrics.summarize` dict} for "raw" and "ema".
  """
  case_ids = [records.case_id(i) for i in range(len(records))]
  per_volume = len(set(case_ids)) < len(case_ids)
  results = {}
  for variant in base.VARIANTS:
    out = predictor.predict_split(state, records, variant=variant, batch_size=batch_size)
    if per_volume:
      slice_idx = [int(np.asarray(records.source[int(i)]["slice_index"])) for i in records.indices]
      cases = list(
        metrics_lib.volume_metrics(
          out["pred"],
          out["label"],
          np.asarray(case_ids),
          slice_indices=np.asarray(slice_idx),
          num_classes=num_classes,
          spacing=spacing,
        ).values()
      )
    else:
      cases = metrics_lib.batch_case_metrics(out["pred"], out["label"], num_classes=num_classes)
    results[variant] = metrics_lib.summarize(cases)
  return results
