"""`metadcseg-evaluate` (metadcseg_jax.inference.evaluate_folder) on folders built on the fly:
PNG masks and NIfTI volumes with a rotated affine and anisotropic voxels, scored against hand
computations, medpy (`dc`, `jc`, `hd95`, `assd` with voxelspacing) and `metrics.case_metrics`."""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
from PIL import Image
import pytest

from metadcseg_jax import metrics
from metadcseg_jax.data import readers
from metadcseg_jax.errors import DataError
from metadcseg_jax.inference import evaluate_folder as ef

mb = pytest.importorskip("medpy.metric.binary")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# NIfTI voxels (x, y, z) in mm and a grid rotated 30 degrees about z, shifted: the array the
# project reads is (z, y, x), so a wrong axis order gives other distances.
ZOOMS = (0.5, 2.0, 3.0)
SHAPE_XYZ = (9, 8, 6)
_c, _s = math.cos(math.pi / 6), math.sin(math.pi / 6)
AFFINE = np.array(
  [
    [_c * ZOOMS[0], -_s * ZOOMS[1], 0.0, -12.0],
    [_s * ZOOMS[0], _c * ZOOMS[1], 0.0, 30.5],
    [0.0, 0.0, ZOOMS[2], 7.0],
    [0.0, 0.0, 0.0, 1.0],
  ]
)


def _png(path, mask, *, scale=1):
  Image.fromarray((np.asarray(mask) * scale).astype(np.uint8)).save(path)


def _nii(path, data_xyz, affine=AFFINE):
  nib.save(nib.Nifti1Image(np.asarray(data_xyz, np.int16), affine), str(path))


def _square(shape, r0, c0, size):
  m = np.zeros(shape, np.uint8)
  m[r0 : r0 + size, c0 : c0 + size] = 1
  return m


def _shift(mm):
  """An affine's change that moves the grid `mm` along x."""
  out = np.zeros((4, 4))
  out[0, 3] = mm
  return out


def _folders(tmp_path):
  pred, ref = tmp_path / "pred", tmp_path / "ref"
  pred.mkdir()
  ref.mkdir()
  return pred, ref


def _medpy(p, t, spacing=None):
  """medpy's scores of one class, with the empty-mask conventions medpy leaves undefined."""
  p, t = np.asarray(p, bool), np.asarray(t, bool)
  if not p.any() and not t.any():
    return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
  if not p.any() or not t.any():
    sp = np.ones(p.ndim) if spacing is None else np.asarray(spacing)
    diag = float(np.sqrt(np.sum((np.asarray(p.shape) * sp) ** 2)))
    return {"dice": 0.0, "iou": 0.0, "hd95": diag, "asd": diag}
  return {
    "dice": mb.dc(p, t),
    "iou": mb.jc(p, t),
    "hd95": mb.hd95(p, t, spacing),
    "asd": mb.assd(p, t, spacing),
  }


def _assert_scores(got, want, what):
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (what, k, got[k], v)


# -- 2D masks -----------------------------------------------------------------------------------

DIAG_2D = math.hypot(16, 20)
# stem: (prediction, reference), 16 x 20 masks; the shifted square is test_metrics' hand case
# (Dice 0.8, IoU 2/3, HD95 1, ASD 0.5).
PNG_CASES = {
  "shifted": (_square((16, 20), 2, 3, 5), _square((16, 20), 2, 2, 5)),
  "ref_empty": (_square((16, 20), 4, 4, 6), np.zeros((16, 20), np.uint8)),
  "pred_empty": (np.zeros((16, 20), np.uint8), _square((16, 20), 4, 4, 6)),
  "both_empty": (np.zeros((16, 20), np.uint8), np.zeros((16, 20), np.uint8)),
}
PNG_BY_HAND = {
  "shifted": {"dice": 0.8, "iou": 2 / 3, "hd95": 1.0, "asd": 0.5},
  "ref_empty": {"dice": 0.0, "iou": 0.0, "hd95": DIAG_2D, "asd": DIAG_2D},
  "pred_empty": {"dice": 0.0, "iou": 0.0, "hd95": DIAG_2D, "asd": DIAG_2D},
  "both_empty": {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0},
}


def _png_folders(tmp_path):
  pred, ref = _folders(tmp_path)
  for stem, (p, t) in PNG_CASES.items():
    _png(pred / f"{stem}.png", p, scale=255)  # predictions 0/255, references 0/1
    _png(ref / f"{stem}.png", t)
  return pred, ref


def test_png_masks_by_hand_and_medpy(tmp_path):
  pred, ref = _png_folders(tmp_path)
  result = ef.evaluate_folder(pred, ref)
  assert (result.num_classes, result.num_classes_from) == (2, "inferred")
  assert result.class_names == ("class1",) and not result.failures
  assert [c.case for c in result.cases] == sorted(PNG_CASES)
  for case in result.cases:
    p, t = PNG_CASES[case.case]
    (scores,) = case.per_class.values()
    _assert_scores(scores, PNG_BY_HAND[case.case], case.case)
    _assert_scores(scores, _medpy(p, t), case.case)
    # The training evaluation's own numbers.
    want = metrics.case_metrics(p, t, num_classes=2)
    _assert_scores(scores, {k: want[k] for k in ef.METRICS}, case.case)
    assert (scores["pred_empty"], scores["target_empty"]) == (not p.any(), not t.any())
    assert case.unit == "px"
  s = ef.summary(result)
  dice = [PNG_BY_HAND[k]["dice"] for k in sorted(PNG_CASES)]
  assert s["per_class"]["class1"]["dice"]["mean"] == pytest.approx(np.mean(dice))
  assert s["per_class"]["class1"]["dice"]["std"] == pytest.approx(np.std(dice, ddof=1))
  assert s["per_class"]["class1"]["hd95"]["median"] == pytest.approx((1.0 + DIAG_2D) / 2)
  assert (s["per_class"]["class1"]["n_pred_empty"], s["per_class"]["class1"]["n_ref_empty"]) == (
    2,
    2,
  )
  assert s["per_class"]["class1"]["n_both_empty"] == 1
  assert s[ef.FOREGROUND_MEAN]["dice"] == s["per_class"]["class1"]["dice"]  # one class
  assert s["distances"] == "pixels"


def test_missing_predictions_error_empty_or_skip(tmp_path):
  pred, ref = _png_folders(tmp_path)
  (pred / "shifted.png").unlink()
  _png(pred / "stray.png", _square((16, 20), 1, 1, 3))
  lines = []
  with pytest.raises(DataError, match=r"1 reference without a prediction in .*: shifted \("):
    ef.evaluate_folder(pred, ref, echo=lines.append)
  assert lines == [f"1 prediction without a reference in {ref}, not scored: stray"]

  empty = ef.evaluate_folder(pred, ref, missing="empty")
  (case,) = [c for c in empty.cases if c.case == "shifted"]
  assert case.pred is None and empty.scored_empty == ["shifted"]
  _assert_scores(case.per_class[1], {"dice": 0.0, "hd95": DIAG_2D}, "missing as empty")
  assert ef.summary(empty)["missing_predictions"] == {"policy": "empty", "cases": ["shifted"]}
  assert ef.summary(empty)["extra_predictions"] == ["stray"]

  skip = ef.evaluate_folder(pred, ref, missing="skip")
  assert [c.case for c in skip.cases] == ["both_empty", "pred_empty", "ref_empty"]
  assert ef.summary(skip)["per_class"]["class1"]["dice"]["mean"] == pytest.approx(1 / 3)


def test_a_pair_that_cannot_be_scored_is_one_line_and_the_others_are_scored(tmp_path):
  pred, ref = _png_folders(tmp_path)
  (pred / "broken.png").write_bytes(b"not a png")
  _png(ref / "broken.png", _square((16, 20), 1, 1, 3))
  _png(pred / "small.png", _square((8, 20), 1, 1, 3))
  _png(ref / "small.png", _square((16, 20), 1, 1, 3))
  _nii(pred / "moved.nii.gz", np.ones(SHAPE_XYZ), AFFINE + _shift(2.0))
  _nii(ref / "moved.nii.gz", np.ones(SHAPE_XYZ))
  # A 16-bit 0/65535 mask: read as labels, it would ask for 65535 classes.
  Image.fromarray(_square((16, 20), 1, 1, 3).astype(np.uint16) * 65535).save(pred / "wide.png")
  _png(ref / "wide.png", _square((16, 20), 1, 1, 3))
  lines = []
  result = ef.evaluate_folder(pred, ref, echo=lines.append)
  assert [c.case for c in result.cases] == sorted(PNG_CASES)
  assert len(result.failures) == 4 and lines == result.failures
  broken, moved, small, wide = result.failures
  assert wide.startswith(f"case wide: {pred / 'wide.png'} and {ref / 'wide.png'} hold labels up")
  assert "give --num_classes" in wide
  assert broken.startswith(f"case broken: cannot read image file {pred / 'broken.png'}")
  assert moved.startswith(f"case moved: {pred / 'moved.nii.gz'} and {ref / 'moved.nii.gz'} lie")
  assert "differ by up to 2 mm" in moved
  assert small == (
    f"case small: {pred / 'small.png'} and {ref / 'small.png'} differ in shape: (8, 20) vs (16, 20)"
  )
  assert ef.summary(result)["failed"] == result.failures


def test_jpeg_masks_need_a_threshold(tmp_path):
  pred, ref = _folders(tmp_path)
  mask = _square((32, 32), 6, 9, 14)
  Image.fromarray(mask * 255).save(pred / "a.jpg", quality=70)
  _png(ref / "a.png", mask)
  decoded = np.asarray(Image.open(pred / "a.jpg").convert("L"))
  assert not np.isin(decoded, (0, 255)).all()  # compression left other values
  (line,) = ef.evaluate_folder(pred, ref).failures
  assert "is a JPEG" in line and "--threshold" in line
  result = ef.evaluate_folder(pred, ref, threshold=127)
  want = metrics.class_metrics(decoded > 127, mask > 0)
  _assert_scores(result.cases[0].per_class[1], {k: want[k] for k in ef.METRICS}, "jpeg")


# -- volumes ------------------------------------------------------------------------------------

DIAG_3D = 24.5  # sqrt((9 * 0.5)^2 + (8 * 2)^2 + (6 * 3)^2) = sqrt(600.25)


def _volumes():
  """stem: (prediction, reference), (x, y, z) label volumes with classes 0, 1, 2."""
  rng = np.random.default_rng(0)
  # One voxel of class 1 in each, 3, 1 and 1 voxels apart along x, y and z:
  # sqrt((3 * 0.5)^2 + (1 * 2)^2 + (1 * 3)^2) = sqrt(15.25) mm. Class 2 absent from both.
  p_hand, t_hand = np.zeros(SHAPE_XYZ), np.zeros(SHAPE_XYZ)
  p_hand[1, 1, 1] = 1
  t_hand[4, 2, 2] = 1
  # Blobs of both classes, independently drawn: the general case.
  blobs = []
  for _ in range(2):
    v = np.zeros(SHAPE_XYZ)
    v[rng.random(SHAPE_XYZ) < 0.35] = 1
    v[2:7, 2:6, 1:5][rng.random((5, 4, 4)) < 0.6] = 2
    blobs.append(v)
  # Class 2 predicted where the reference has none.
  p_extra = t_hand.copy()
  p_extra[6:8, 5:7, 3:5] = 2
  return {"blobs": tuple(blobs), "hand": (p_hand, t_hand), "c2_ref_empty": (p_extra, t_hand)}


def _nifti_folders(tmp_path, volumes):
  pred, ref = _folders(tmp_path)
  for stem, (p, t) in volumes.items():
    _nii(pred / f"{stem}.nii.gz", p)
    _nii(ref / f"{stem}.nii", t)
  return pred, ref


def test_nifti_three_classes_in_mm_by_hand_and_medpy(tmp_path):
  volumes = _volumes()
  pred, ref = _nifti_folders(tmp_path, volumes)
  result = ef.evaluate_folder(pred, ref, class_names=["organ", "lesion"])
  assert (result.num_classes, result.num_classes_from) == (3, "class names")
  assert not result.failures and [c.case for c in result.cases] == sorted(volumes)
  cases = {c.case: c for c in result.cases}
  root15 = math.sqrt(15.25)
  hand = cases["hand"]
  _assert_scores(hand.per_class[1], {"dice": 0, "iou": 0, "hd95": root15, "asd": root15}, "hand")
  _assert_scores(hand.per_class[2], {"dice": 1, "iou": 1, "hd95": 0, "asd": 0}, "hand")
  _assert_scores(hand.foreground(), {"dice": 0.5, "hd95": root15 / 2}, "hand mean")
  c2 = cases["c2_ref_empty"].per_class[2]
  _assert_scores(c2, {"dice": 0, "iou": 0, "hd95": DIAG_3D, "asd": DIAG_3D}, "c2_ref_empty")
  assert c2["target_empty"] and not c2["pred_empty"]
  for stem, (p, t) in volumes.items():
    case = cases[stem]
    assert case.unit == "mm"
    for c in (1, 2):  # medpy on nibabel's own (x, y, z) arrays and header zooms
      _assert_scores(case.per_class[c], _medpy(p == c, t == c, ZOOMS), (stem, c))
    # The training evaluation's numbers on the project's (z, y, x) reading.
    want = metrics.case_metrics(
      readers.read_volume(pred / f"{stem}.nii.gz").astype(int),
      readers.read_volume(ref / f"{stem}.nii").astype(int),
      num_classes=3,
      spacing=ZOOMS[::-1],
    )
    for c in (1, 2):
      _assert_scores(case.per_class[c], {k: want["per_class"][c][k] for k in ef.METRICS}, stem)
    _assert_scores(case.foreground(), {k: want[k] for k in ef.METRICS}, (stem, "mean"))

  s = ef.summary(result)
  assert list(s["per_class"]) == ["organ", "lesion"] and s["distances"] == "mm (header spacing)"
  for k in ef.METRICS:
    means = [s["per_class"][n][k]["mean"] for n in ("organ", "lesion")]
    assert s[ef.FOREGROUND_MEAN][k]["mean"] == pytest.approx(np.mean(means), abs=1e-12)
  assert s["per_class"]["lesion"]["n_ref_empty"] == 2  # hand and c2_ref_empty
  rows = ef.case_rows(result)
  assert [(r["case"], r["class"]) for r in rows[:3]] == [
    ("blobs", "organ"),
    ("blobs", "lesion"),
    ("blobs", ef.FOREGROUND_MEAN),
  ]
  assert len(rows) == 3 * len(volumes)

  # The classes inferred from the largest label give the same numbers, named by default.
  inferred = ef.evaluate_folder(pred, ref)
  assert (inferred.num_classes, inferred.class_names) == (3, ("class1", "class2"))
  assert [c.per_class for c in inferred.cases] == [c.per_class for c in result.cases]


def test_a_class_absent_from_a_case_is_both_empty_when_the_classes_are_inferred(tmp_path):
  # Case "a" holds class 1 only, case "b" class 2: "a"'s class 2 is filled in afterwards.
  pred, ref = _folders(tmp_path)
  _png(pred / "a.png", _square((10, 10), 1, 1, 4))
  _png(ref / "a.png", _square((10, 10), 2, 1, 4))
  _png(pred / "b.png", _square((10, 10), 3, 3, 3) * 2)
  _png(ref / "b.png", _square((10, 10), 3, 3, 3) * 2)
  result = ef.evaluate_folder(pred, ref)
  assert result.num_classes == 3
  a = result.cases[0]
  want = metrics.case_metrics(_square((10, 10), 1, 1, 4), _square((10, 10), 2, 1, 4), num_classes=3)
  assert a.per_class == want["per_class"]
  assert a.per_class[2] == dict(metrics.BOTH_EMPTY)


def test_mha_reference_on_the_same_grid_as_a_nifti_prediction(tmp_path):
  sitk = pytest.importorskip("SimpleITK")
  p, t = _volumes()["blobs"]
  pred, ref = _folders(tmp_path)
  _nii(pred / "case.nii.gz", p)
  image = sitk.GetImageFromArray(np.asarray(t, np.int16).transpose(2, 1, 0))  # (z, y, x)
  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE  # ITK's world is LPS, NIfTI's RAS
  image.SetSpacing(ZOOMS)
  image.SetDirection((lps[:3, :3] / np.asarray(ZOOMS)).ravel().tolist())
  image.SetOrigin(lps[:3, 3].tolist())
  sitk.WriteImage(image, str(ref / "case.mha"))
  result = ef.evaluate_folder(pred, ref, num_classes=3)
  assert not result.failures
  for c in (1, 2):
    _assert_scores(result.cases[0].per_class[c], _medpy(p == c, t == c, ZOOMS), ("mha", c))


# -- class names, progress ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "labels, want",
  [
    ({"0": "background", "1": "liver", "2": "tumour"}, ("background", "liver", "tumour")),
    ({"background": 0, "tumour": 2, "liver": 1}, ("background", "liver", "tumour")),
    ({"background": 0, "whole": [1, 2]}, "is a region"),
    ({"0": "background", "2": "tumour"}, "are not 0..L-1"),
  ],
)
def test_dataset_json_labels_v1_and_v2(tmp_path, labels, want):
  path = tmp_path / "dataset.json"
  path.write_text(json.dumps({"name": "x", "labels": labels}))
  if isinstance(want, str):
    with pytest.raises(DataError, match=want):
      ef.class_names_from_dataset_json(path)
  else:
    assert ef.class_names_from_dataset_json(path) == want


def test_progress_lines_and_wrong_names(tmp_path):
  pred, ref = _png_folders(tmp_path)
  lines = []
  ef.evaluate_folder(pred, ref, echo=lines.append, progress_s=0.0)
  assert len(lines) == len(PNG_CASES) - 1  # none after the last case
  assert lines[0].startswith("scored 1/4 cases, ") and " cases/s, about " in lines[0]
  assert lines[0].endswith(" left")
  with pytest.raises(ValueError, match="2 class names"):
    ef.evaluate_folder(pred, ref, class_names=["a", "b"], num_classes=2)


# -- the command --------------------------------------------------------------------------------


def _command(*args):
  code = (
    "import sys; from metadcseg_jax.commands import evaluate; "
    f"sys.argv = ['metadcseg-evaluate', *{list(map(str, args))!r}]; evaluate.run()"
  )
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
  )


def test_command_writes_the_tables_and_exits_1_for_a_pair_it_cannot_score(tmp_path):
  volumes = _volumes()
  pred, ref = _nifti_folders(tmp_path, volumes)
  (pred / "broken.nii.gz").write_bytes(b"not a volume")
  _nii(ref / "broken.nii.gz", np.zeros(SHAPE_XYZ))
  (tmp_path / "dataset.json").write_text(
    json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}})
  )
  out = tmp_path / "eval" / "run1"
  done = _command(
    f"--pred={pred}",
    f"--ref={ref}",
    f"--dataset_json={tmp_path / 'dataset.json'}",
    f"--output={out}",
  )
  assert done.returncode == 1, done.stderr
  errors = done.stderr.splitlines()
  assert errors[0].startswith(f"case broken: cannot read volume file {pred / 'broken.nii.gz'}")
  assert errors[-1] == "1 of 4 pairs could not be scored (listed above)"
  assert "Traceback" not in done.stderr
  table = done.stdout.splitlines()
  assert table[0].startswith("3 cases scored, 3 classes (class names); distances in mm")
  assert [line.split()[0] for line in table[2:5]] == ["organ", "lesion", "foreground"]

  library = ef.evaluate_folder(pred, ref, class_names=["organ", "lesion"])
  written = json.loads((out / ef.SUMMARY_JSON).read_text())
  assert written == json.loads(json.dumps(ef.summary(library)))
  rows = list(csv.DictReader((out / ef.CASES_CSV).open()))
  assert tuple(rows[0]) == ef.CSV_COLUMNS
  assert len(rows) == 3 * len(volumes)
  for row, want in zip(rows, ef.case_rows(library)):
    assert (row["case"], row["class"]) == (want["case"], want["class"])
    for k in ef.METRICS:
      assert float(row[k]) == want[k]  # written to full precision
    assert row["pred_empty"] == str(want["pred_empty"])

  missing = _command(f"--pred={tmp_path / 'nowhere'}", f"--ref={ref}")
  assert missing.returncode == 2 and missing.stderr.strip() == (
    f"error: wrong layout: prediction folder {tmp_path / 'nowhere'} does not exist or is not a "
    "folder"
  )


def test_command_help_names_the_conventions_and_every_flag():
  done = _command("--help")
  assert done.returncode == 0 and done.stderr == ""
  text = " ".join(done.stdout.split())
  assert "MONAI's DiceMetric and MeanIoU with ignore_empty=False" in text
  assert "BraTS's fixed worst value" in text and "exactly one empty -> Dice 0" in text
  for flag in ("pred", "ref", "output", "num_classes", "class_names", "dataset_json", "threshold"):
    assert f"--{flag}=" in done.stdout, flag
  assert "--missing=error|empty|skip" in done.stdout
  assert "\n    metadcseg-evaluate --pred=" in done.stdout
