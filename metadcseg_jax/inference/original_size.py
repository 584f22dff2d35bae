"""Scores at the user's resolution: a split's predictions mapped back to each case's own size
and geometry and compared with its reference mask as the raw folder holds it.

The trainer scores at the network's size (every image and slice resized to a square
`config.data.size`), where HD95 is in pixels of that square and Dice that of a squashed mask.
Here each case's class probabilities go back to its original height and width (bilinear, as
`metadcseg-predict` writes them), the argmax is scored against the reference file (the trusted
mask where there is one) with `metadcseg_jax.metrics`, in millimetres for volumes (the
original voxel spacing), in pixels of the original image for 2D data. What `metadcseg-predict`
followed by `metadcseg-evaluate` gives on the same files.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import numpy as np

from metadcseg_jax import metrics as metrics_lib
from metadcseg_jax.data import pipeline
from metadcseg_jax.data import real
from metadcseg_jax.errors import DataError
from metadcseg_jax.inference import model as model_lib


def available(info: Mapping[str, Any]) -> bool:
  """Whether a run's data records where its cases' raw files are (real datasets)."""
  return bool(info.get("case_files")) and bool(info.get("source"))


def _cases(records: pipeline.Records) -> dict[str, list[tuple[int, int]]]:
  """{case id: [(slice index, position in records)] in slice order}, cases in records order."""
  by_case: dict[str, list[tuple[int, int]]] = {}
  for i in range(len(records)):
    record = records.source[int(records.indices[i])]
    by_case.setdefault(records.case_id(i), []).append((int(record["slice_index"]), i))
  return {c: sorted(v) for c, v in by_case.items()}


def score_split(
  model: model_lib.Model,
  records: pipeline.Records,
  info: Mapping[str, Any],
  data,
  *,
  variant: str,
) -> tuple[list[str], list[dict[str, Any]]]:
  """Per-case metrics of `records`' cases at their own size.

  Args:
    model: the trained network and its preprocessing.
    records: a split (val or test) of the run.
    info: the run's data info (`case_files`, `source`: where the raw files are).
    data: the run's `config.data` (how the build reads masks).
    variant: "raw" or "ema".

  Returns:
    (case ids, `metrics.case_metrics` dicts), the cases in the records' order.

  Raises:
    DataError: a reference file is missing or its size differs from the prediction's.
  """
  root = pathlib.Path(info["source"])
  builder = real.BUILDERS[data.name]
  options = {**builder.OPTIONS, **pipeline.builder_options(data)}
  if "num_classes" in options and options["num_classes"] is None and data.name != "folder":
    options["num_classes"] = int(data.num_classes)
  ids, cases = [], []
  for case_id, slices in _cases(records).items():
    files = info["case_files"].get(case_id)
    if files is None:
      raise DataError(f"case {case_id!r}: its raw files are not recorded in the run's data info")
    path = root / files["label"]
    if not path.is_file():
      raise DataError(f"case {case_id!r}: its reference {path} is gone from the data folder")
    reference = builder.read_reference(path, options)
    x = np.stack([records[i]["image"] for _, i in slices])
    probs = model.probabilities(x, variant=variant)
    shape = reference.shape[-2:]
    pred = np.argmax(model.preprocessing.restore(probs, shape), axis=-1)
    spacing = None
    if reference.ndim == 3:
      row, col, sl = files["spacing_mm"]
      spacing = (sl, row, col)
    else:
      pred = pred[0]
    if pred.shape != reference.shape:
      raise DataError(
        f"case {case_id!r}: {len(slices)} slices predicted for a reference {path} of shape "
        f"{reference.shape}"
      )
    ids.append(case_id)
    cases.append(
      metrics_lib.case_metrics(pred, reference, num_classes=int(data.num_classes), spacing=spacing)
    )
  return ids, cases
