"""Evaluation metrics (MetaDCSeg §4.1): Dice, IoU, mIoU, HD, HD95 and ASD per case and per class.

Host-side numpy/scipy code, run at evaluation time and never inside `jit`. A
*case* is one 2D image (2D data) or one 3D volume (3D data, see
`volume_metrics`); every metric is computed per case and then averaged over
cases by `summarize`.

Conventions (this project's, see BUILD_NOTES.md, "Metrics"; the paper, MetaDCSeg §4.1, names mIoU,
DSC and HD without defining them):

* Classes. With two classes (L = 2) the foreground is `label > 0` and Dice, IoU,
  HD, HD95 and ASD are its scores. With more (L > 2) each foreground class
  c = 1..L-1 is scored on its own (`pred == c` against `target == c`, the same
  binary scores, `class_metrics`) and the case's `dice`, `iou`, `hd`, `hd95`
  and `asd` are the means over the L-1 foreground classes (nnU-Net's
  "foreground mean"); the per-class values are kept under `per_class`. mIoU
  averages the IoU of every class, background included, over the classes
  present in the prediction or the target of that case (a class absent from
  both has IoU 0/0 and is left out of that mean).
* Boundary of a mask `m`: `m & ~binary_erosion(m, cross)` with the cross-shaped
  footprint `generate_binary_structure(ndim, 1)` and scipy's default
  `border_value=0`, so foreground touching the image edge has boundary there.
  This is medpy's `connectivity=1` surface.
* Directed distances: for each boundary pixel of one mask, the Euclidean
  distance (`distance_transform_edt(..., sampling=spacing)`) to the nearest
  boundary pixel of the other mask. In pixels, or in mm (the unit of
  `spacing`) when `spacing` is given.
* HD: the maximum over both directed distance sets (symmetric Hausdorff).
* HD95: medpy's pooled convention, the 95th percentile (numpy's default linear
  interpolation) of the *concatenation* of both directed distance sets
  (`medpy.metric.binary.hd95`); not the max of two directed 95th percentiles.
* ASD: the average symmetric surface distance over the pooled set, i.e.
  `(sum d(P->T) + sum d(T->P)) / (|∂P| + |∂T|)`, as in `medpy.metric.binary
  .assd` from medpy 0.5 on and Heimann et al. (2009). medpy <= 0.4 averaged
  the two directed means instead; the two agree when both boundaries have the
  same number of pixels.
* Empty masks, per class (per foreground for L = 2): both empty -> Dice 1,
  IoU 1, HD = HD95 = ASD = 0; exactly one empty -> Dice 0, IoU 0,
  HD = HD95 = ASD = the image diagonal `sqrt(sum((shape * spacing)**2))`.
  Dice and IoU are then those of MONAI's `DiceMetric(ignore_empty=False)` and
  `MeanIoU(ignore_empty=False)` (`DiceHelper.compute_channel`: 1 when the
  reference and the prediction are both empty, else 2|P∩T| / (|P| + |T|),
  which is 0 when exactly one is empty). MONAI's surface distances have no
  finite value there (inf or NaN with a warning), so the distances follow
  BraTS instead: 0 when both are empty and a fixed worst value when exactly
  one is, as nnU-Net's BraTS 2020 evaluation returns (`compute_BraTS_HD95` in
  nnU-Net v1's `dataset_conversion/Task082_BraTS_2020.py`: 373.13 mm, the
  diagonal of BraTS's 240 x 240 x 155 1-mm volume); here the worst value is
  the diagonal of the case's own image, so a BraTS volume gets BraTS's value.
  `summarize` reports how many cases fell into each branch next to the means.

Example (labels (B, H, W) with classes 0, 1, 2):

    cases = batch_case_metrics(pred_labels, true_labels, num_classes=3)
    summary = summarize(cases, class_names=["liver", "tumour"])
    summary["dice"], summary["per_class"]["tumour"]["hd95"]
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
import types
from typing import Any

import numpy as np
from scipy import ndimage

# Keys whose per-case values are averaged by `summarize`.
METRIC_KEYS = ("dice", "iou", "miou", "hd", "hd95", "asd")
# The scores of one class (one binary mask pair); with L > 2 classes a case's headline values
# of these keys are their means over the foreground classes.
CLASS_KEYS = ("dice", "iou", "hd", "hd95", "asd")
HD_PERCENTILE = 95.0
# A class absent from both masks (see the module docstring, "Empty masks").
BOTH_EMPTY = types.MappingProxyType(
  {
    "dice": 1.0,
    "iou": 1.0,
    "hd": 0.0,
    "hd95": 0.0,
    "asd": 0.0,
    "pred_empty": True,
    "target_empty": True,
  }
)

Spacing = float | Sequence[float] | None


def _as_labels(x: Any, name: str) -> np.ndarray:
  """Returns `x` as an integer array; rejects non-integral values."""
  x = np.asarray(x)
  if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
    return x.astype(np.int64, copy=False)
  if np.issubdtype(x.dtype, np.floating):
    # Float label maps (e.g. from nibabel's get_fdata) are fine when integral;
    # a probability map is not, and would silently binarise by `> 0`.
    if not np.all(np.isfinite(x)) or not np.all(x == np.round(x)):
      raise ValueError(
        f"{name} has non-integer values (dtype {x.dtype}); pass a label map "
        "(e.g. argmax over classes), not probabilities or logits."
      )
    return x.astype(np.int64)
  raise ValueError(f"{name} must hold integer labels, got dtype {x.dtype}.")


def _check_pair(
  pred: Any, target: Any, num_classes: int, ndims: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
  """Validates a (pred, target) pair of label maps; returns int64 arrays."""
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}.")
  pred = _as_labels(pred, "pred")
  target = _as_labels(target, "target")
  if pred.shape != target.shape:
    raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}.")
  if pred.ndim not in ndims:
    raise ValueError(f"pred/target must have ndim in {ndims}, got shape {pred.shape}.")
  if pred.size == 0:
    raise ValueError(f"pred/target are empty arrays (shape {pred.shape}).")
  for name, x in (("pred", pred), ("target", target)):
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(
        f"{name} labels must lie in [0, {num_classes - 1}] "
        f"(num_classes={num_classes}), found range [{lo}, {hi}]."
      )
  return pred, target


def _check_spacing(spacing: Spacing, ndim: int) -> np.ndarray:
  """Returns a float64 (ndim,) spacing; ones when `spacing` is None."""
  if spacing is None:
    return np.ones(ndim, np.float64)
  sp = np.asarray(spacing, np.float64)
  if sp.ndim == 0:
    sp = np.full(ndim, float(sp))
  if sp.shape != (ndim,):
    raise ValueError(
      f"spacing must be a scalar or have one entry per axis ({ndim}), got {spacing!r}."
    )
  if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
    raise ValueError(f"spacing must be finite and > 0, got {spacing!r}.")
  return sp


def boundary(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels of a binary mask: `mask & ~erode(mask)` (cross footprint).

  Args:
    mask: (H, W) or (D, H, W) bool.

  Returns:
    Bool array of the same shape. Outside the image counts as background.
  """
  mask = np.asarray(mask, bool)
  cross = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=cross)


def surface_distances(
  pred: np.ndarray, target: np.ndarray, *, spacing: Spacing = None
) -> tuple[np.ndarray, np.ndarray]:
  """Both directed boundary-to-boundary distance sets of two non-empty masks.

  Args:
    pred: (H, W) or (D, H, W) bool, non-empty.
    target: same shape, bool, non-empty.
    spacing: voxel size per axis (scalar or ndim-sequence); None = pixels.

  Returns:
    `(d_pt, d_tp)`: float64 (|∂P|,) distances from each pred boundary pixel to
    the nearest target boundary pixel, and (|∂T|,) the reverse.
  """
  pred = np.asarray(pred, bool)
  target = np.asarray(target, bool)
  if not pred.any() or not target.any():
    raise ValueError("surface_distances needs two non-empty masks.")
  sp = _check_spacing(spacing, pred.ndim)
  bp, bt = boundary(pred), boundary(target)
  # EDT measures distance to the nearest zero, so feed it the complement.
  d_pt = ndimage.distance_transform_edt(~bt, sampling=sp)[bp]
  d_tp = ndimage.distance_transform_edt(~bp, sampling=sp)[bt]
  return d_pt, d_tp


def image_diagonal(shape: Sequence[int], spacing: Spacing = None) -> float:
  """`sqrt(sum((shape * spacing)**2))`: the distances of a one-empty case."""
  sp = _check_spacing(spacing, len(shape))
  return float(np.sqrt(np.sum((np.asarray(shape, np.float64) * sp) ** 2)))


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
  """Mean IoU over classes 0..num_classes-1 present in pred or target.

  Args:
    pred: integer label map, any shape.
    target: integer label map, same shape.
    num_classes: number of classes L (background included).

  Returns:
    `mean_c |P_c ∩ T_c| / |P_c ∪ T_c|` over classes with a non-empty union.
  """
  p, t = pred.ravel(), target.ravel()
  # A joint histogram gives every intersection in one pass.
  conf = np.bincount(t * num_classes + p, minlength=num_classes**2)
  conf = conf.reshape(num_classes, num_classes)
  inter = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - inter
  present = union > 0
  return float(np.mean(inter[present] / union[present]))


def class_metrics(pred: Any, target: Any, *, spacing: Spacing = None) -> dict[str, float | bool]:
  """Dice, IoU, HD, HD95 and ASD of one binary mask pair (one class of a case).

  Args:
    pred: (H, W) or (D, H, W) bool (or 0/1), the predicted mask of the class.
    target: same shape, the reference mask.
    spacing: voxel size per axis (scalar or a tuple of len ndim, e.g. mm);
      None measures distances in pixels.

  Returns:
    Dict of Python floats `dice`, `iou`, `hd`, `hd95` (pooled, medpy
    convention), `asd` (pooled symmetric mean, medpy >= 0.5 `assd`) and bools
    `pred_empty`, `target_empty`; the empty-mask values of the module docstring
    where a mask is empty (`BOTH_EMPTY` when both are).
  """
  p, t = np.asarray(pred, bool), np.asarray(target, bool)
  sp = _check_spacing(spacing, p.ndim)
  n_p, n_t = int(p.sum()), int(t.sum())
  if n_p == 0 and n_t == 0:
    return dict(BOTH_EMPTY)
  if n_p == 0 or n_t == 0:
    dice = iou = 0.0
    hd = hd95 = asd = image_diagonal(p.shape, sp)
  else:
    inter = int(np.sum(p & t))
    dice = 2.0 * inter / (n_p + n_t)
    iou = inter / (n_p + n_t - inter)
    d_pt, d_tp = surface_distances(p, t, spacing=sp)
    pooled = np.concatenate([d_pt, d_tp])
    hd = float(max(d_pt.max(), d_tp.max()))
    hd95 = float(np.percentile(pooled, HD_PERCENTILE))
    asd = float(pooled.mean())
  return {
    "dice": dice,
    "iou": iou,
    "hd": hd,
    "hd95": hd95,
    "asd": asd,
    "pred_empty": n_p == 0,
    "target_empty": n_t == 0,
  }


def foreground_mean(per_class: Mapping[Hashable, Mapping[str, Any]]) -> dict[str, float]:
  """The mean of each of `CLASS_KEYS` over the classes of `per_class` (nnU-Net's foreground mean).

  Args:
    per_class: {class: `class_metrics` dict} of one case's foreground classes (at least one).

  Returns:
    {key: mean over the classes} for each key of `CLASS_KEYS`.
  """
  if not per_class:
    raise ValueError("foreground_mean needs at least one class.")
  return {k: float(np.mean([c[k] for c in per_class.values()])) for k in CLASS_KEYS}


def case_metrics(
  pred: Any, target: Any, *, num_classes: int = 2, spacing: Spacing = None
) -> dict[str, Any]:
  """All MetaDCSeg §4.1 metrics for one case (a 2D image or a 3D volume).

  Args:
    pred: (H, W) or (D, H, W) predicted integer labels in [0, num_classes).
    target: same shape, reference labels.
    num_classes: L, classes including background.
    spacing: voxel size per axis (scalar or a tuple of len ndim, e.g. mm);
      None measures distances in pixels.

  Returns:
    Dict of Python floats `dice`, `iou`, `hd`, `hd95` (pooled, medpy
    convention), `asd` (pooled symmetric mean, medpy >= 0.5 `assd`), `miou`,
    plus bools `pred_empty`, `target_empty` (no foreground, label > 0, at all).
    L = 2: the first five score the foreground `label > 0`. L > 2: they are
    the means over the foreground classes of `per_class`, a dict
    `{c: class_metrics dict}` for c = 1..L-1 (int keys) that only L > 2 adds.

  Raises:
    ValueError: shapes differ, ndim not 2 or 3, non-integer labels, labels
      outside [0, num_classes), or a bad spacing.
  """
  pred, target = _check_pair(pred, target, num_classes, (2, 3))
  sp = _check_spacing(spacing, pred.ndim)
  if num_classes == 2:
    fg = class_metrics(pred > 0, target > 0, spacing=sp)
    per_class = None
  else:
    per_class = {
      c: class_metrics(pred == c, target == c, spacing=sp) for c in range(1, num_classes)
    }
    fg = foreground_mean(per_class)
  out = {
    "dice": fg["dice"],
    "iou": fg["iou"],
    "miou": mean_iou(pred, target, num_classes),
    "hd": fg["hd"],
    "hd95": fg["hd95"],
    "asd": fg["asd"],
    "pred_empty": not bool(np.any(pred > 0)),
    "target_empty": not bool(np.any(target > 0)),
  }
  if per_class is not None:
    out["per_class"] = per_class
  return out


def batch_case_metrics(
  preds: Any,
  targets: Any,
  *,
  num_classes: int = 2,
  spacing: Spacing = None,
) -> list[dict[str, Any]]:
  """`case_metrics` for each image of a 2D batch.

  Args:
    preds: (B, H, W) predicted labels.
    targets: (B, H, W) reference labels.
    num_classes: L, classes including background.
    spacing: (2,) pixel size shared by the batch, or None.

  Returns:
    A list of B per-image metric dicts.
  """
  preds, targets = _check_pair(preds, targets, num_classes, (3,))
  return [
    case_metrics(p, t, num_classes=num_classes, spacing=spacing) for p, t in zip(preds, targets)
  ]


def volume_metrics(
  preds: Any,
  targets: Any,
  case_ids: Any,
  *,
  slice_indices: Any = None,
  num_classes: int = 2,
  spacing: Spacing | Mapping[Hashable, Spacing] = None,
) -> dict[Hashable, dict[str, Any]]:
  """Per-volume metrics for 3D data evaluated slice by slice (MetaDCSeg §4.1).

  Slices are grouped by case id, ordered by slice index and stacked into
  (D, H, W) volumes; each volume is one case. A case with a single slice is
  a (1, H, W) volume: all its foreground is surface (outside the volume is
  background), so its HD95/ASD differ from the same slice scored in 2D.

  Args:
    preds: (N, H, W) predicted labels of N slices, in any order.
    targets: (N, H, W) reference labels.
    case_ids: (N,) hashable id of each slice's volume.
    slice_indices: (N,) integer position of each slice in its volume; must be
      unique and contiguous within a case. None stacks each case's slices in
      the order they appear in `preds`.
    num_classes: L, classes including background.
    spacing: (3,) voxel size (slice axis first) shared by all cases, a
      mapping from case id to its own spacing, or None for voxels.

  Returns:
    `{case_id: case_metrics dict}`, ordered by sorted case id.

  Raises:
    ValueError: mismatched lengths, duplicate or non-contiguous slice
      indices, a case missing from a spacing mapping, or bad labels.
  """
  preds, targets = _check_pair(preds, targets, num_classes, (3,))
  case_ids = np.asarray(case_ids)
  n = preds.shape[0]
  if case_ids.shape != (n,):
    raise ValueError(f"case_ids must have shape ({n},) to match preds, got {case_ids.shape}.")
  given_order = slice_indices is None
  if given_order:
    slice_indices = np.arange(n)
  else:
    slice_indices = _as_labels(slice_indices, "slice_indices")
    if slice_indices.shape != (n,):
      raise ValueError(f"slice_indices must have shape ({n},), got {slice_indices.shape}.")
  results = {}
  for cid in sorted(set(case_ids.tolist())):
    rows = np.flatnonzero(case_ids == cid)
    rows = rows[np.argsort(slice_indices[rows], kind="stable")]
    idx = slice_indices[rows]
    if np.any(np.diff(idx) == 0):
      raise ValueError(f"case {cid!r} has duplicate slice indices.")
    if not given_order and np.any(np.diff(idx) != 1):
      raise ValueError(
        f"case {cid!r} has non-contiguous slice indices "
        f"{idx.min()}..{idx.max()} for {len(idx)} slices; stacking them "
        "would misplace the volume's geometry."
      )
    if isinstance(spacing, Mapping):
      if cid not in spacing:
        raise ValueError(f"spacing mapping has no entry for case {cid!r}.")
      sp = spacing[cid]
    else:
      sp = spacing
    results[cid] = case_metrics(preds[rows], targets[rows], num_classes=num_classes, spacing=sp)
  return results


def foreground_names(num_classes: int, names: Sequence[str] | None = None) -> tuple[str, ...]:
  """The names of the foreground classes 1..L-1: `names` checked, or "class1", "class2", ...

  Args:
    num_classes: L, classes including background.
    names: L-1 names, class 1 first (background has none), or None for the defaults.

  Returns:
    A tuple of L-1 distinct, non-empty strings.

  Raises:
    ValueError: a wrong number of names, an empty or repeated name.
  """
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}.")
  if names is None:
    return tuple(f"class{c}" for c in range(1, num_classes))
  if isinstance(names, str):
    raise ValueError(f"class names must be a list of names, got the string {names!r}.")
  names = tuple(str(n) for n in names)
  if len(names) != num_classes - 1:
    raise ValueError(
      f"{len(names)} class names {list(names)} for {num_classes - 1} foreground classes "
      f"(num_classes={num_classes}); name classes 1..{num_classes - 1}, not the background."
    )
  if any(not n.strip() for n in names) or len(set(names)) != len(names):
    raise ValueError(f"class names must be distinct and non-empty, got {list(names)}.")
  return names


def _case_classes(cases: Sequence[Mapping[str, Any]]) -> list[int]:
  """The foreground classes the cases score one by one ([] for two-class cases)."""
  labels = [sorted(c["per_class"]) if "per_class" in c else [] for c in cases]
  if any(keys != labels[0] for keys in labels):
    raise ValueError("cases score different classes (per_class keys differ); summarize them apart.")
  if labels[0] and labels[0] != list(range(1, len(labels[0]) + 1)):
    raise ValueError(f"per_class must hold classes 1..L-1, got {labels[0]}.")
  return labels[0]


def summarize(
  cases: Iterable[Mapping[str, Any]], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
  """Means of the per-case metrics, with the empty-mask counts beside them.

  Args:
    cases: per-case dicts from `case_metrics` (or the values of
      `volume_metrics`).
    class_names: names of the foreground classes 1..L-1 (default "class1",
      "class2", ...); for cases of L > 2 classes they key `per_class`.

  Returns:
    `{dice, iou, miou, hd, hd95, asd}` means over cases (empty-mask cases
    included with the values above), and ints `n_cases`, `n_both_empty`,
    `n_one_empty` (pred xor target empty), `n_pred_empty`, `n_target_empty`
    (no foreground at all). Cases of L > 2 classes add
    `per_class: {name: {dice, iou, hd, hd95, asd}}`, each the mean over cases
    of that class's score; the headline `dice`, ... then equal the means of
    the per-class means (every case scores every class).

  Raises:
    ValueError: no cases, a case dict missing a key, cases that score
      different classes, or class names that do not fit them.
  """
  cases = list(cases)
  if not cases:
    raise ValueError("summarize needs at least one case, got none.")
  need = METRIC_KEYS + ("pred_empty", "target_empty")
  for i, c in enumerate(cases):
    missing = [k for k in need if k not in c]
    if missing:
      raise ValueError(f"case {i} lacks keys {missing}.")
  out: dict[str, Any] = {k: float(np.mean([c[k] for c in cases])) for k in METRIC_KEYS}
  pe = np.array([bool(c["pred_empty"]) for c in cases])
  te = np.array([bool(c["target_empty"]) for c in cases])
  out.update(
    n_cases=len(cases),
    n_both_empty=int(np.sum(pe & te)),
    n_one_empty=int(np.sum(pe ^ te)),
    n_pred_empty=int(pe.sum()),
    n_target_empty=int(te.sum()),
  )
  labels = _case_classes(cases)
  # Two-class cases have no per_class; a name given for them is still checked (one name).
  if labels or class_names is not None:
    names = foreground_names(max(len(labels), 1) + 1, class_names)
  if labels:
    out["per_class"] = {
      name: {k: float(np.mean([c["per_class"][label][k] for c in cases])) for k in CLASS_KEYS}
      for label, name in zip(labels, names)
    }
  return out


class MetricAccumulator:
  """Collects per-case metrics over an evaluation loop; `result()` summarises.

  Example (a batch of one 2×2 prediction against its reference):

    >>> acc = MetricAccumulator(num_classes=2)
    >>> acc.add_batch(np.array([[[0, 1], [1, 1]]]), np.array([[[0, 1], [0, 1]]]))
    >>> round(acc.result()["dice"], 4), acc.result()["n_one_empty"]
    (0.8, 0)
  """

  def __init__(
    self,
    *,
    num_classes: int = 2,
    spacing: Spacing = None,
    class_names: Sequence[str] | None = None,
  ):
    self.num_classes = num_classes
    self.spacing = spacing
    self.class_names = class_names
    self.cases: list[dict[str, Any]] = []

  def add_case(self, pred: Any, target: Any) -> dict[str, Any]:
    """Scores one (H, W) or (D, H, W) case, stores and returns its dict."""
    case = case_metrics(pred, target, num_classes=self.num_classes, spacing=self.spacing)
    self.cases.append(case)
    return case

  def add_batch(self, preds: Any, targets: Any) -> None:
    """Scores each image of a (B, H, W) batch."""
    self.cases.extend(
      batch_case_metrics(preds, targets, num_classes=self.num_classes, spacing=self.spacing)
    )

  def result(self) -> dict[str, Any]:
    """`summarize` over every case added so far (per class by `class_names`)."""
    return summarize(self.cases, class_names=self.class_names)
