"""Scores of a folder of predicted masks against a folder of reference masks (`metadcseg-evaluate`).

    result = evaluate_folder.evaluate_folder("preds/", "labelsTs/", class_names=("liver", "tumour"))
    print("\n".join(evaluate_folder.summary_lines(result)))
    evaluate_folder.write_outputs(result, "eval/")   # cases.csv and summary.json

Files are paired by stem: `case7.png` with `case7.png`, `case7.nii.gz` with `case7.nii.gz` or
`case7.mha`. A mask is a 2D image (PNG, JPEG, BMP, TIFF: 0/255 or 0/1 binary, or class indices),
a NIfTI volume (`.nii`, `.nii.gz`) or, with SimpleITK installed, an MHA/MHD volume; volumes are
read as the project's readers read them ((S, H, W), `data.readers.read_volume`), their spacing
from the header (`data.readers.volume_info`).

Every number is `metadcseg_jax.metrics`'s, so a folder of a run's predictions scores as the
run's own evaluation does: per foreground class c = 1..L-1 the binary scores of `pred == c`
against `ref == c` (`metrics.class_metrics`: Dice, IoU, HD95 and ASD, the distances in mm from
the reference's header spacing for volumes and in pixels for 2D images), and per case the mean
over the foreground classes (`metrics.foreground_mean`; with two classes, the one class). A
class absent from both masks of a case scores `metrics.BOTH_EMPTY` (Dice 1, distances 0), as
`metrics.case_metrics` scores it, so the classes need not be known before the folder is read.

Decisions:
  * A reference without a prediction is an error by default (`missing="error"`, as
    nnU-Net's evaluate_folder without --chill): a file that is not there is more often a
    prediction run that stopped or a renamed file than a model that predicted nothing, and
    either of the other choices changes the score without the user asking. `missing="empty"`
    scores it as an all-background prediction (Dice 0 where the reference has the class),
    `missing="skip"` leaves it out (nnU-Net's --chill); the choice and the cases are recorded.
  * A prediction without a reference is named and not scored.
  * A pair that cannot be scored (a file that does not read, other shapes, other geometry,
    labels outside the classes) is one line naming the files and the reason; the others are
    scored, and `FolderEvaluation.failures` keeps the lines (the command exits 1).
  * Nothing is written unless an output folder is named (`write_outputs`).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from metadcseg_jax import files
from metadcseg_jax import metrics
from metadcseg_jax import progress
from metadcseg_jax.data import readers
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError

ITK_SUFFIXES = (".mha", ".mhd")
VOLUME_SUFFIXES = readers.NIFTI_SUFFIXES + ITK_SUFFIXES
SUFFIXES = readers.IMAGE_SUFFIXES + VOLUME_SUFFIXES
# Data files of an .mhd header, listed neither as masks nor as skipped.
COMPANIONS = (".raw", ".zraw")
JPEG_SUFFIXES = (".jpg", ".jpeg")
MISSING = ("error", "empty", "skip")
# The scores of cases.csv and summary.json, per class and for the foreground mean.
METRICS = ("dice", "iou", "hd95", "asd")
FOREGROUND_MEAN = "foreground_mean"
CASES_CSV = "cases.csv"
SUMMARY_JSON = "summary.json"
CSV_COLUMNS = ("case", "class", *METRICS, "pred_empty", "ref_empty")
# Two volumes lie on the same grid when their voxel-to-world (RAS, mm) affines agree to this:
# float32 headers written by other tools round 100 mm to about 1e-5 mm.
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-5
PROGRESS_S = 5.0
# The most classes inferred from the labels seen; more must be asked for.
MAX_INFERRED_CLASSES = 256
_SHOWN = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "asd": "ASD"}
EMPTY_MASKS = (
  "per class, both masks empty: Dice 1, IoU 1, HD95 = ASD = 0; exactly one empty: Dice 0, "
  "IoU 0, HD95 = ASD = the image diagonal (mm for volumes, pixels for 2D images). Dice and "
  "IoU as MONAI's DiceMetric and MeanIoU with ignore_empty=False; distances as BraTS's fixed "
  "worst value (nnU-Net's BraTS evaluation: 373.13 mm, the diagonal of a BraTS volume)."
)
# ITK's world coordinates are LPS, NIfTI's (nibabel's affine) RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class Mask:
  """A mask as read from its file.

  Attributes:
    labels: (H, W) for a 2D image or (S, H, W) for a volume, int64 class indices.
    spacing: the size of a voxel along each array axis in mm ((slice, row, col)), or None for a
      2D image (distances in pixels).
    affine: (4, 4) voxel index (i, j, k) to RAS world mm of a volume, or None for a 2D image.
  """

  labels: np.ndarray
  spacing: tuple[float, ...] | None = None
  affine: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Pairing:
  """Two folders' mask files matched by stem.

  Attributes:
    pairs: {stem: (prediction, reference)}, sorted by stem.
    missing: {stem: reference} of the references without a prediction.
    extra: {stem: prediction} of the predictions without a reference.
    skipped: entries of either folder that are not mask files (folder/name).
  """

  pairs: dict[str, tuple[pathlib.Path, pathlib.Path]]
  missing: dict[str, pathlib.Path]
  extra: dict[str, pathlib.Path]
  skipped: list[str]


@dataclasses.dataclass(frozen=True)
class CaseScores:
  """One scored case.

  Attributes:
    case: the file stem.
    pred: the prediction file, or None for a missing prediction scored as empty.
    ref: the reference file.
    per_class: {c: `metrics.class_metrics` dict} for c = 1..L-1.
    unit: "mm" (a volume) or "px" (a 2D image), the unit of its distances.
  """

  case: str
  pred: pathlib.Path | None
  ref: pathlib.Path
  per_class: dict[int, dict[str, Any]]
  unit: str

  def foreground(self) -> dict[str, Any]:
    """The case's mean over the foreground classes, with its flags for no foreground at all."""
    out: dict[str, Any] = metrics.foreground_mean(self.per_class)
    out["pred_empty"] = all(c["pred_empty"] for c in self.per_class.values())
    out["target_empty"] = all(c["target_empty"] for c in self.per_class.values())
    return out


@dataclasses.dataclass(frozen=True)
class FolderEvaluation:
  """What `evaluate_folder` found and scored.

  Attributes:
    pred_dir, ref_dir: the two folders.
    num_classes: L, classes including background.
    num_classes_from: "num_classes", "class names" or "inferred" (largest label seen + 1).
    class_names: the L-1 names of classes 1..L-1.
    cases: the scored cases, by stem.
    failures: one line per pair that could not be scored.
    pairing: the files matched.
    missing_policy: one of `MISSING`.
  """

  pred_dir: pathlib.Path
  ref_dir: pathlib.Path
  num_classes: int
  num_classes_from: str
  class_names: tuple[str, ...]
  cases: list[CaseScores]
  failures: list[str]
  pairing: Pairing
  missing_policy: str

  @property
  def scored_empty(self) -> list[str]:
    """The cases whose missing prediction was scored as empty."""
    return [c.case for c in self.cases if c.pred is None]


# -- files --------------------------------------------------------------------------------------


def pair_folders(pred_dir: os.PathLike | str, ref_dir: os.PathLike | str) -> Pairing:
  """Matches the mask files of two folders by stem.

  Raises:
    DataError: a folder is missing, the two are the same folder, or two files of one folder
      share a stem (e.g. `a.png` and `a.nii.gz`).
  """
  pred_dir = readers.require_dir(pred_dir, "prediction")
  ref_dir = readers.require_dir(ref_dir, "reference")
  if pred_dir.resolve() == ref_dir.resolve():
    raise DataError(f"the prediction and reference folders are the same folder, {pred_dir}")
  listed = {}
  skipped = []
  for name, folder in (("pred", pred_dir), ("ref", ref_dir)):
    listing = readers.list_files(folder, SUFFIXES, root=folder, companions=COMPANIONS)
    listed[name] = listing.files
    skipped += [f"{folder}/{entry}" for entry in listing.skipped]
  preds, refs = listed["pred"], listed["ref"]
  return Pairing(
    pairs={s: (preds[s], refs[s]) for s in sorted(refs) if s in preds},
    missing={s: refs[s] for s in sorted(refs) if s not in preds},
    extra={s: preds[s] for s in sorted(preds) if s not in refs},
    skipped=skipped,
  )


def class_names_from_dataset_json(path: os.PathLike | str) -> tuple[str, ...]:
  """The class names of an nnU-Net / Decathlon `dataset.json`, background first.

  Args:
    path: the file; its "labels" in the v1 form {"0": "background", "1": "liver"} or the v2
      form {"background": 0, "liver": 1}.

  Returns:
    L names, of labels 0..L-1.

  Raises:
    DataError: the file does not read, has no "labels", or its labels are not 0..L-1 (v2's
      region labels, lists of labels, are not classes of one label map).
  """
  path = pathlib.Path(path).expanduser()
  try:
    labels = json.loads(path.read_text())["labels"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"cannot read the labels of dataset.json {path}: {e!r}") from None
  if not isinstance(labels, dict) or not labels:
    raise DataError(f"dataset.json {path}: 'labels' is not a mapping of labels to names")
  by_label: dict[int, str] = {}
  for key, value in labels.items():
    if isinstance(value, bool) or isinstance(value, (list, tuple)):
      raise DataError(
        f"dataset.json {path}: label {key!r} is a region ({value!r}); only one label per "
        "class can be scored"
      )
    if isinstance(value, int):  # v2: name -> label
      label, name = value, key
    elif str(key).strip().lstrip("-").isdigit():  # v1: "label" -> name
      label, name = int(key), str(value)
    else:
      raise DataError(f"dataset.json {path}: cannot read the label entry {key!r}: {value!r}")
    if label in by_label:
      raise DataError(f"dataset.json {path}: label {label} is named twice")
    by_label[label] = name
  if sorted(by_label) != list(range(len(by_label))) or len(by_label) < 2:
    raise DataError(
      f"dataset.json {path}: labels {sorted(by_label)} are not 0..L-1 with L >= 2 (0 the "
      "background)"
    )
  return tuple(by_label[i] for i in range(len(by_label)))


def _optional(module: str) -> Any:
  """An optional reader package, imported when a file of its format is read."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"reading this volume needs {module}: pip install {module}") from e


def _affine(path: pathlib.Path) -> np.ndarray:
  """(4, 4) voxel index (i, j, k) to RAS mm of a volume file (its header only)."""
  if readers.strip_suffix(path.name, readers.NIFTI_SUFFIXES):
    return np.asarray(_optional("nibabel").load(str(path)).affine, np.float64)
  reader = _optional("SimpleITK").ImageFileReader()
  reader.SetFileName(str(path))
  reader.ReadImageInformation()
  direction = np.asarray(reader.GetDirection(), np.float64).reshape(3, 3)
  affine = np.eye(4)
  affine[:3, :3] = direction * np.asarray(reader.GetSpacing(), np.float64)
  affine[:3, 3] = reader.GetOrigin()
  return _LPS_TO_RAS @ affine


def _check_labels(labels: np.ndarray, path: pathlib.Path, num_classes: int | None) -> np.ndarray:
  """`labels` unchanged, or a DataError naming the values below 0 or not below `num_classes`."""
  bad = labels < 0
  if num_classes is not None:
    bad |= labels >= num_classes
  if bad.any():
    where = f"[0, {num_classes}) (num_classes={num_classes})" if num_classes else "[0, inf)"
    raise DataError(
      f"mask {path} has labels {np.unique(labels[bad])[:10].tolist()} outside {where}"
    )
  return labels


def read_mask(
  path: os.PathLike | str, *, num_classes: int | None = None, threshold: float | None = None
) -> Mask:
  """Reads a mask file as class indices, with its spacing and geometry for a volume.

  2D images: a mask of 0/255 (with num_classes None or 2) reads as 0/1; other values are class
  indices, except that a JPEG (lossy, so its values are not labels) must be binary or be
  binarised with `threshold`; an 8-bit mask holding 255 beside other values is an error unless
  `num_classes` says so many classes are meant. Volumes (NIfTI, MHA/MHD): integral values,
  class indices.

  Args:
    path: the file.
    num_classes: L, when known: labels must lie in [0, L).
    threshold: JPEG files only: the mask is `value > threshold` (their lossy compression
      leaves values other than the labels near edges).

  Returns:
    The `Mask` (labels (H, W) or (S, H, W) int64).

  Raises:
    DataError: the file does not read, or its values are not labels (named).
    ImportError: a volume format whose reader is not installed.
  """
  path = pathlib.Path(path)
  if readers.strip_suffix(path.name, VOLUME_SUFFIXES):
    volume = readers.read_volume(path)
    labels = np.rint(volume)
    if not np.array_equal(labels, volume):
      bad = np.unique(volume[labels != volume])[:5]
      raise DataError(f"mask {path} holds non-integer values, e.g. {bad.tolist()}")
    _, (row, col, slc) = readers.volume_info(path)
    try:
      affine = _affine(path)
    except Exception as e:  # pylint: disable=broad-except  # any header reader's failure
      if isinstance(e, ImportError):
        raise
      raise DataError(f"cannot read the geometry of {path}: {e}") from e
    labels = _check_labels(labels.astype(np.int64), path, num_classes)
    return Mask(labels, (slc, row, col), affine)
  raw = readers.read_mask(path)
  jpeg = path.suffix.lower() in JPEG_SUFFIXES
  if jpeg and threshold is not None:
    return Mask((raw > threshold).astype(np.int64))
  values = np.unique(raw)
  if num_classes in (None, 2) and np.isin(values, (0, 255)).all():
    return Mask((raw == 255).astype(np.int64))
  binary = np.isin(values, (0, 1)).all()
  if jpeg and not binary:
    raise DataError(
      f"mask {path} is a JPEG with values {values[:10].tolist()}: lossy compression changes "
      "labels; binarise it with --threshold (e.g. 127)"
    )
  if num_classes is None and 255 in values and not binary:
    # An 8-bit mask with 255 beside other values is an anti-aliased or photo mask, not 256
    # classes; inferring the classes from it would score every grey level as one.
    raise DataError(
      f"mask {path} has values {values[:10].tolist()}: neither binary (0/1, 0/255) nor class "
      "indices; give --num_classes if its values are classes"
    )
  return Mask(_check_labels(raw.astype(np.int64), path, num_classes))


# -- scoring ------------------------------------------------------------------------------------


def score_pair(
  pred: Mask,
  ref: Mask,
  *,
  num_classes: int | None = None,
  names: tuple[str, str] = ("prediction", "reference"),
) -> dict[int, dict[str, Any]]:
  """`metrics.class_metrics` of each foreground class of one pair.

  Args:
    pred: the predicted mask.
    ref: the reference mask, whose spacing measures the distances.
    num_classes: L when known; else the classes up to the largest label of the pair.
    names: the two files, for the messages.

  Returns:
    {c: class scores} for c = 1..L-1 (1..max(1, largest label) without `num_classes`).

  Raises:
    DataError: other shapes, other geometry (affines differing by more than
      `AFFINE_ATOL_MM` + `AFFINE_RTOL` x |affine|), or without `num_classes` a label of
      `MAX_INFERRED_CLASSES` or more.
  """
  if pred.labels.shape != ref.labels.shape:
    raise DataError(
      f"{names[0]} and {names[1]} differ in shape: {pred.labels.shape} vs {ref.labels.shape}"
    )
  if pred.affine is not None and not np.allclose(
    pred.affine, ref.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM
  ):
    worst = float(np.max(np.abs(pred.affine - ref.affine)))
    raise DataError(
      f"{names[0]} and {names[1]} lie on other grids: their affines differ by up to "
      f"{worst:.4g} mm (tolerance {AFFINE_ATOL_MM} mm); resample the prediction to the "
      "reference first"
    )
  if num_classes is None:
    top = max(1, int(pred.labels.max()), int(ref.labels.max()))
    if top >= MAX_INFERRED_CLASSES:
      # Scoring every label up to a stray 65535 (a 16-bit 0/65535 mask) would take hours.
      raise DataError(
        f"{names[0]} and {names[1]} hold labels up to {top}: give --num_classes (or the class "
        f"names) to score more than {MAX_INFERRED_CLASSES} classes"
      )
  else:
    top = num_classes - 1
  return {
    c: metrics.class_metrics(pred.labels == c, ref.labels == c, spacing=ref.spacing)
    for c in range(1, top + 1)
  }


def evaluate_folder(
  pred_dir: os.PathLike | str,
  ref_dir: os.PathLike | str,
  *,
  num_classes: int | None = None,
  class_names: Sequence[str] | None = None,
  missing: str = "error",
  threshold: float | None = None,
  echo: Callable[[str], None] | None = None,
  progress_s: float = PROGRESS_S,
) -> FolderEvaluation:
  """Scores every reference mask of `ref_dir` against the prediction of the same stem.

  Args:
    pred_dir: the folder of predicted masks.
    ref_dir: the folder of reference masks.
    num_classes: L, classes including background; None: `len(class_names) + 1` when names
      are given, else the largest label seen + 1 (at least 2).
    class_names: the names of classes 1..L-1 (default "class1", ...).
    missing: a reference without a prediction: "error" (`DataError` before anything is
      scored), "empty" (scored as an all-background prediction) or "skip" (left out); the
      command's --missing.
    threshold: JPEG masks are binarised as `value > threshold`.
    echo: receives the lines for the user: files not paired, pairs that cannot be scored,
      progress every `progress_s` seconds. None: silent.
    progress_s: seconds between progress lines.

  Returns:
    The `FolderEvaluation`.

  Raises:
    DataError: a folder is missing, nothing to score, or (with missing="error") a reference
      without a prediction (all such named in one line).
    ConfigError: a bad `missing`, `num_classes` or `class_names`.
  """
  echo = echo or (lambda line: None)
  if missing not in MISSING:
    raise ConfigError(f"missing={missing!r}: choose one of {', '.join(MISSING)}")
  num_classes, class_names, source = _classes(num_classes, class_names)
  pairing = pair_folders(pred_dir, ref_dir)
  pred_dir, ref_dir = pathlib.Path(pred_dir), pathlib.Path(ref_dir)
  todo = _cases_to_score(pairing, missing, pred_dir, ref_dir, echo)
  scored: list[tuple[str, pathlib.Path | None, pathlib.Path, dict[int, dict], str]] = []
  failures: list[str] = []
  lines = progress.Lines(len(todo), echo, verb="scored", noun="cases", every_s=progress_s)
  for done, (stem, pred_path, ref_path) in enumerate(todo, 1):
    try:
      ref = read_mask(ref_path, num_classes=num_classes, threshold=threshold)
      if pred_path is None:
        pred = Mask(np.zeros_like(ref.labels), ref.spacing, ref.affine)
      else:
        pred = read_mask(pred_path, num_classes=num_classes, threshold=threshold)
      per_class = score_pair(
        pred, ref, num_classes=num_classes, names=(str(pred_path), str(ref_path))
      )
    except (DataError, ImportError) as e:
      failures.append(f"case {stem}: {e}")
      echo(failures[-1])
    else:
      scored.append((stem, pred_path, ref_path, per_class, "px" if ref.spacing is None else "mm"))
    lines.update(done)

  if num_classes is None:
    num_classes = max([2] + [max(per_class) + 1 for *_, per_class, _ in scored])
  names = metrics.foreground_names(num_classes, class_names)
  cases = []
  for stem, pred_path, ref_path, per_class, unit in scored:
    # Classes above a case's largest label are absent from both of its masks.
    filled = {c: per_class.get(c, dict(metrics.BOTH_EMPTY)) for c in range(1, num_classes)}
    cases.append(CaseScores(stem, pred_path, ref_path, filled, unit))
  return FolderEvaluation(
    pred_dir=pred_dir,
    ref_dir=ref_dir,
    num_classes=num_classes,
    num_classes_from=source,
    class_names=names,
    cases=cases,
    failures=failures,
    pairing=pairing,
    missing_policy=missing,
  )


def _classes(
  num_classes: int | None, class_names: Sequence[str] | None
) -> tuple[int | None, tuple[str, ...] | None, str]:
  """`evaluate_folder`'s classes checked: (L or None, the names or None, where L comes from)."""
  if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
    raise ConfigError(f"num_classes={num_classes}: must be an integer >= 2")
  if class_names is None:
    return num_classes, None, "inferred" if num_classes is None else "num_classes"
  class_names = tuple(class_names)
  if num_classes is None:
    num_classes = len(class_names) + 1
  try:
    metrics.foreground_names(num_classes, class_names)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return num_classes, class_names, "class names"


def _cases_to_score(
  pairing: Pairing,
  missing: str,
  pred_dir: pathlib.Path,
  ref_dir: pathlib.Path,
  echo: Callable[[str], None],
) -> list[tuple[str, pathlib.Path | None, pathlib.Path]]:
  """(stem, prediction or None for an empty one, reference) of every case to score, by stem; a
  line for each kind of file left unpaired.

  Raises:
    DataError: references without a prediction under missing="error", or nothing to score.
  """
  if pairing.skipped:
    echo(
      f"skipped {_count(pairing.skipped, 'entry')} that are not mask files: "
      f"{_listed(pairing.skipped)}"
    )
  if pairing.extra:
    echo(
      f"{_count(pairing.extra, 'prediction')} without a reference in {ref_dir}, not scored: "
      f"{_listed(list(pairing.extra))}"
    )
  if pairing.missing:
    line = (
      f"{_count(pairing.missing, 'reference')} without a prediction in {pred_dir}: "
      f"{_listed(list(pairing.missing))}"
    )
    if missing == "error":
      raise DataError(
        f"{line} (--missing=empty scores them as empty predictions, --missing=skip leaves them out)"
      )
    echo(f"{line}; " + ("scored as empty predictions" if missing == "empty" else "left out"))
  todo: list[tuple[str, pathlib.Path | None, pathlib.Path]] = [
    (stem, p, r) for stem, (p, r) in pairing.pairs.items()
  ]
  if missing == "empty":
    todo += [(stem, None, r) for stem, r in pairing.missing.items()]
    todo.sort(key=lambda item: item[0])
  if not todo:
    raise DataError(f"no pair of masks to score in {pred_dir} and {ref_dir}")
  return todo


def _count(items: Sequence[object], noun: str) -> str:
  n = len(items)
  plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
  return f"{n} {noun if n == 1 else plural}"


def _listed(names: Sequence[object], limit: int = 10) -> str:
  shown = ", ".join(str(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- summary and files --------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, float | None]:
  """Mean, sample standard deviation (None for one value) and median."""
  v = np.asarray(values, np.float64)
  return {
    "mean": float(v.mean()),
    "std": float(v.std(ddof=1)) if v.size > 1 else None,
    "median": float(np.median(v)),
  }


def _group(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Statistics of one class (or of the foreground mean) over the cases."""
  pe = np.array([bool(s["pred_empty"]) for s in scores])
  re = np.array([bool(s["target_empty"]) for s in scores])
  out: dict[str, Any] = {k: _stats([s[k] for s in scores]) for k in METRICS}
  out.update(
    n_cases=len(scores),
    n_pred_empty=int(pe.sum()),
    n_ref_empty=int(re.sum()),
    n_both_empty=int((pe & re).sum()),
  )
  return out


def _units(result: FolderEvaluation) -> str:
  units = {c.unit for c in result.cases}
  if units == {"mm"}:
    return "mm (header spacing)"
  if units == {"px"}:
    return "pixels"
  return "mm for volumes (header spacing), pixels for 2D images" if units else "none scored"


def summary(result: FolderEvaluation) -> dict[str, Any]:
  """summary.json's content.

  Returns:
    {"pred", "ref", "num_classes", "num_classes_from", "class_names" (classes 1..L-1),
    "distances" (their unit), "empty_masks" (the conventions), "n_cases", "per_class":
    {name: {metric: {"mean", "std", "median"}, "n_cases", "n_pred_empty", "n_ref_empty",
    "n_both_empty"}}, "foreground_mean" (the same over each case's mean over the foreground
    classes; empty counts of no foreground at all; None when no case was scored),
    "missing_predictions": {"policy", "cases"}, "extra_predictions", "failed" (one line per
    pair not scored)}. Metrics: `METRICS`; std is the sample standard deviation (n - 1).
  """
  per_class = {
    name: _group([c.per_class[label] for c in result.cases])
    for label, name in enumerate(result.class_names, 1)
    if result.cases
  }
  return {
    "pred": str(result.pred_dir),
    "ref": str(result.ref_dir),
    "num_classes": result.num_classes,
    "num_classes_from": result.num_classes_from,
    "class_names": list(result.class_names),
    "distances": _units(result),
    "empty_masks": EMPTY_MASKS,
    "n_cases": len(result.cases),
    "per_class": per_class,
    FOREGROUND_MEAN: _group([c.foreground() for c in result.cases]) if result.cases else None,
    "missing_predictions": {
      "policy": result.missing_policy,
      "cases": list(result.pairing.missing),
    },
    "extra_predictions": list(result.pairing.extra),
    "failed": list(result.failures),
  }


def case_rows(result: FolderEvaluation) -> list[dict[str, Any]]:
  """cases.csv's rows: per case, one per foreground class and, with more than one foreground
  class, one `FOREGROUND_MEAN` row (the case's mean over them); columns `CSV_COLUMNS`."""
  rows = []
  for case in result.cases:
    groups = [(name, case.per_class[label]) for label, name in enumerate(result.class_names, 1)]
    if len(groups) > 1:
      groups.append((FOREGROUND_MEAN, case.foreground()))
    for name, scores in groups:
      rows.append(
        {
          "case": case.case,
          "class": name,
          **{k: scores[k] for k in METRICS},
          "pred_empty": bool(scores["pred_empty"]),
          "ref_empty": bool(scores["target_empty"]),
        }
      )
  return rows


def write_outputs(result: FolderEvaluation, output_dir: os.PathLike | str) -> list[pathlib.Path]:
  """Writes `CASES_CSV` and `SUMMARY_JSON` into `output_dir` (created; files replaced whole).

  Returns:
    The two paths.
  """
  out = pathlib.Path(output_dir).expanduser()
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows(case_rows(result))
  paths = [out / CASES_CSV, out / SUMMARY_JSON]
  files.write_atomic(paths[0], buffer.getvalue())
  files.write_atomic(paths[1], json.dumps(summary(result), indent=1) + "\n")
  return paths


def prepare_output(output_dir: os.PathLike | str) -> pathlib.Path:
  """Creates the output folder before anything is scored, so a bad path fails first.

  Raises:
    ConfigError: the path is a file or cannot be created or written.
  """
  out = pathlib.Path(output_dir).expanduser()
  if out.exists() and not out.is_dir():
    raise ConfigError(f"output {out} is a file, not a folder")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"cannot create the output folder {out}: {e.strerror}") from None
  if not os.access(out, os.W_OK):
    raise ConfigError(f"the output folder {out} is not writable")
  return out


def _cell(stats: Mapping[str, float | None]) -> str:
  mean, std = stats["mean"], stats["std"]
  if not math.isfinite(mean):
    return str(mean)
  return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def summary_lines(result: FolderEvaluation) -> list[str]:
  """The printed summary: a table of mean ± std per class and the foreground mean, and the
  empty-mask counts per class."""
  s = summary(result)
  n = s["n_cases"]
  head = f"{n} cases scored, {result.num_classes} classes ({result.num_classes_from})"
  if result.scored_empty:
    head += f", {len(result.scored_empty)} of them missing predictions scored as empty"
  lines = [head + f"; distances in {s['distances']}"]
  if not n:
    return lines
  groups = list(s["per_class"].items())
  if len(groups) > 1:
    groups.append(("foreground mean", s[FOREGROUND_MEAN]))
  width = max(len(name) for name, _ in groups) + 2
  cells = [[_cell(group[k]) for k in METRICS] for _, group in groups]
  # Distances in pixels of a large image run to hundreds: the columns grow with their cells.
  col = [max(len(_SHOWN[k]), *(len(c[i]) for c in cells)) + 2 for i, k in enumerate(METRICS)]
  lines.append("class".ljust(width) + "".join(_SHOWN[k].rjust(w) for k, w in zip(METRICS, col)))
  for (name, _), row in zip(groups, cells):
    lines.append(name.ljust(width) + "".join(c.rjust(w) for c, w in zip(row, col)))
  lines.append(
    "empty masks (prediction/reference/both): "
    + ", ".join(
      f"{name} {g['n_pred_empty']}/{g['n_ref_empty']}/{g['n_both_empty']}"
      for name, g in s["per_class"].items()
    )
  )
  return lines
