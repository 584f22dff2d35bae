"""Tests for metadcseg_jax.metrics (MetaDCSeg §4.1), with hand-worked expectations."""

import math

import numpy as np
import pytest
from scipy import ndimage

from metadcseg_jax import metrics

SQ18 = math.sqrt(18.0)


def _square(shape, r0, c0, size):
  m = np.zeros(shape, np.int32)
  m[r0 : r0 + size, c0 : c0 + size] = 1
  return m


def _assert_case(got, **want):
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-12), (k, got[k], v)


def test_boundary_cross_footprint_and_image_edge():
  # A plus sign: with the cross footprint its centre is interior (all four
  # 4-neighbours are foreground); an 8-neighbour footprint would keep it.
  plus = np.zeros((5, 5), bool)
  plus[2, 1:4] = plus[1:4, 2] = True
  want = plus.copy()
  want[2, 2] = False
  np.testing.assert_array_equal(metrics.boundary(plus), want)
  # Outside the image is background, so a square in the corner keeps its
  # edge rows/cols as boundary: all 8 non-centre pixels of the 3x3.
  corner = np.zeros((6, 6), bool)
  corner[:3, :3] = True
  want = corner.copy()
  want[1, 1] = False
  np.testing.assert_array_equal(metrics.boundary(corner), want)


def test_shifted_square_by_hand():
  # Target: 5x5 square rows 2..6, cols 2..6 of a 12x12 image; pred: the
  # same square one column to the right (cols 3..7).
  # |P|=|T|=25, |P∩T|=5*4=20 -> Dice 40/50=0.8, IoU 20/30=2/3.
  # Each boundary is the 16-pixel ring. Pred ring -> target ring: rows 2 and
  # 6 at cols 3..6 lie on the target ring (0, 8 px); everything else (cols 3
  # and 7 rows 3..5, and the two col-7 corners) is 1 px away (8 px). By
  # mirror symmetry the reverse set is the same: 16 zeros, 16 ones pooled.
  # HD = 1; HD95 = pooled value at position 0.95*31 = 29.45 -> 1; ASD = 0.5.
  # mIoU: background |P0∩T0| = 144-30 = 114, |P0∪T0| = 144-20 = 124
  # -> (114/124 + 2/3) / 2.
  t = _square((12, 12), 2, 2, 5)
  p = _square((12, 12), 2, 3, 5)
  got = metrics.case_metrics(p, t)
  _assert_case(got, dice=0.8, iou=2 / 3, hd=1.0, hd95=1.0, asd=0.5, miou=(114 / 124 + 2 / 3) / 2)
  assert got["pred_empty"] is False and got["target_empty"] is False


def test_outlier_pins_pooled_hd95_and_asd():
  # Target: 2x2 square rows 2..3, cols 2..3 (all 4 pixels are boundary).
  # Pred: the same square plus one pixel at (6, 6), sqrt(3^2+3^2)=sqrt(18)
  # from the nearest target pixel (3, 3).
  # Dice = 2*4/(5+4) = 8/9, IoU = 4/5, HD = sqrt(18).
  # Pooled distances: P->T {0,0,0,0,sqrt18}, T->P {0,0,0,0}: 9 values.
  # HD95 (pooled, linear): position 0.95*8 = 7.6 -> 0 + 0.6*sqrt18 = 2.5456.
  #   (max of the directed 95th percentiles would be 0.8*sqrt18 = 3.394.)
  # ASD (pooled) = sqrt18/9 = 0.4714.
  #   (mean of the two directed means would be (sqrt18/5 + 0)/2 = 0.4243.)
  t = _square((10, 10), 2, 2, 2)
  p = t.copy()
  p[6, 6] = 1
  got = metrics.case_metrics(p, t)
  _assert_case(got, dice=8 / 9, iou=4 / 5, hd=SQ18, hd95=0.6 * SQ18, asd=SQ18 / 9)
  # Symmetric in its arguments.
  swapped = metrics.case_metrics(t, p)
  for k in metrics.METRIC_KEYS:
    assert swapped[k] == pytest.approx(got[k], abs=1e-12)


def test_anisotropic_spacing_by_hand():
  # Single pixels at (0,0) and (3,4): 5 px apart; with spacing (2.0, 0.5)
  # they are sqrt((3*2)^2 + (4*0.5)^2) = sqrt(40) mm apart.
  p = np.zeros((8, 8), np.int32)
  t = np.zeros((8, 8), np.int32)
  p[0, 0] = 1
  t[3, 4] = 1
  px = metrics.case_metrics(p, t)
  mm = metrics.case_metrics(p, t, spacing=(2.0, 0.5))
  _assert_case(px, dice=0.0, iou=0.0, hd=5.0, hd95=5.0, asd=5.0)
  s40 = math.sqrt(40.0)
  _assert_case(mm, dice=0.0, iou=0.0, hd=s40, hd95=s40, asd=s40)
  # Square shifted down one row (pred rows 3..7, target rows 2..6, cols
  # 2..6 both), rows 2.0 mm apart, columns 0.5 mm. Pred ring -> target ring:
  #   row 3, cols 2 and 6: on the target ring            -> 0, 0
  #   row 3, cols 3, 4, 5: nearest is a target side column -> 0.5, 1.0, 0.5
  #     (in pixels: 1, 1, 1, so pixel ASD = 2*(3+5)/32 = 0.5)
  #   row 7, cols 2..6: one row below target row 6        -> 5 x 2.0
  #   cols 2 and 6, rows 4..6: on the target ring         -> 6 x 0
  # The reverse set is the mirror image. HD = 2.0; ASD = 2*(2+10)/32 = 0.75;
  # pooled sorted: 16 x 0, 4 x 0.5, 2 x 1.0, 10 x 2.0, position 29.45 -> 2.0.
  t = _square((12, 12), 2, 2, 5)
  p = _square((12, 12), 3, 2, 5)
  mm = metrics.case_metrics(p, t, spacing=(2.0, 0.5))
  _assert_case(mm, hd=2.0, hd95=2.0, asd=0.75)
  _assert_case(metrics.case_metrics(p, t), hd=1.0, hd95=1.0, asd=0.5)


def test_3d_volume_by_hand():
  # 3x3x3 cubes in a 7^3 volume, pred shifted by one along axis 0 (z).
  # Intersection 18 -> Dice 36/54 = 2/3, IoU 18/36 = 1/2.
  # Surfaces: 26 voxels each (cube minus its centre). P->T: pred's z=2 face
  # lies on target surface except its centre (2,2,2), the target's centre,
  # 1 voxel sideways from target surface; pred's z=3 ring is target top
  # face (0); pred's z=4 face (9) is one z-step away. So 16 zeros, 1 x
  # (1 step in-plane), 9 x (1 step in z); the reverse is the mirror image.
  # With spacing (3,1,1): in-plane step 1 mm, z step 3 mm.
  #   HD = 3, HD95: pooled 52 values, 18 threes at the top -> 3,
  #   ASD = (2*1 + 18*3) / 52 = 56/52. In voxels: HD 1, ASD 20/52.
  t = np.zeros((7, 7, 7), np.int32)
  t[1:4, 1:4, 1:4] = 1
  p = np.zeros_like(t)
  p[2:5, 1:4, 1:4] = 1
  _assert_case(
    metrics.case_metrics(p, t, spacing=(3.0, 1.0, 1.0)),
    dice=2 / 3,
    iou=0.5,
    hd=3.0,
    hd95=3.0,
    asd=56 / 52,
  )
  _assert_case(metrics.case_metrics(p, t), hd=1.0, hd95=1.0, asd=20 / 52)


def test_empty_masks_and_counts():
  shape = (12, 12)
  empty = np.zeros(shape, np.int32)
  sq = _square(shape, 2, 2, 5)
  diag = math.sqrt(12**2 + 12**2)
  both = metrics.case_metrics(empty, empty)
  _assert_case(both, dice=1.0, iou=1.0, hd=0.0, hd95=0.0, asd=0.0, miou=1.0)
  pred_empty = metrics.case_metrics(empty, sq)
  # mIoU: background IoU (144-25)/144, foreground 0.
  _assert_case(pred_empty, dice=0.0, iou=0.0, hd=diag, hd95=diag, asd=diag, miou=(119 / 144) / 2)
  assert pred_empty["pred_empty"] and not pred_empty["target_empty"]
  target_empty = metrics.case_metrics(sq, empty, spacing=(2.0, 0.5))
  diag_mm = math.sqrt(24.0**2 + 6.0**2)
  _assert_case(target_empty, dice=0.0, iou=0.0, hd=diag_mm, hd95=diag_mm, asd=diag_mm)
  assert target_empty["target_empty"] and not target_empty["pred_empty"]
  normal = metrics.case_metrics(_square(shape, 2, 3, 5), sq)
  summary = metrics.summarize([both, pred_empty, target_empty, normal])
  assert summary["n_cases"] == 4
  assert summary["n_both_empty"] == 1
  assert summary["n_one_empty"] == 2
  assert summary["n_pred_empty"] == 2 and summary["n_target_empty"] == 2
  assert summary["dice"] == pytest.approx((1.0 + 0 + 0 + 0.8) / 4)
  assert summary["hd"] == pytest.approx((0.0 + diag + diag_mm + 1.0) / 4)


def test_three_classes_scored_per_class_by_hand():
  t = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
  p = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 1, 2]])
  # mIoU: class 0: inter 4, union 5 -> 0.8; class 1: inter 3 ((0,3),(1,2),(1,3)),
  # union 5 (+(0,2) from T, +(3,2) from P) -> 0.6; class 2: inter 7, union 8 -> 0.875.
  # Class 1: |P1| = |T1| = 4, inter 3 -> Dice 6/8, IoU 3/5. Every pixel of both is boundary.
  #   P1 -> T1: (0,3), (1,2), (1,3) lie on T1 (0); (3,2) is 2 rows below (1,2) -> {0,0,0,2}.
  #   T1 -> P1: (0,2) is 1 from (0,3) -> {1,0,0,0}. Pooled sorted [0 x 6, 1, 2]: HD 2,
  #   HD95 at position 0.95*7 = 6.65 -> 1 + 0.65 = 1.65, ASD 3/8.
  # Class 2: |T2| = 8 (rows 2-3), |P2| = 7 (T2 less (3,2)), inter 7 -> Dice 14/15, IoU 7/8.
  #   Every pixel of both is boundary; P2 -> T2 all 0; T2 -> P2: (3,2) is 1 away, the rest 0.
  #   Pooled: 14 zeros and a 1: HD 1, HD95 at 0.95*14 = 13.3 -> 0.3, ASD 1/15.
  # The merged foreground (label > 0, |T| 12, |P| 11, inter 11) would give Dice 22/23 instead.
  got = metrics.case_metrics(p, t, num_classes=3)
  want1 = dict(dice=0.75, iou=0.6, hd=2.0, hd95=1.65, asd=3 / 8)
  want2 = dict(dice=14 / 15, iou=7 / 8, hd=1.0, hd95=0.3, asd=1 / 15)
  assert sorted(got["per_class"]) == [1, 2]
  _assert_case(got["per_class"][1], **want1)
  _assert_case(got["per_class"][2], **want2)
  _assert_case(got, miou=(0.8 + 0.6 + 0.875) / 3, **{k: (want1[k] + want2[k]) / 2 for k in want1})
  assert not got["pred_empty"] and not got["target_empty"]
  # A class absent from both maps: no IoU in mIoU, but Dice 1 and distances 0 in its own
  # scores (MONAI's ignore_empty=False), so the foreground means take it in.
  got4 = metrics.case_metrics(p, t, num_classes=4)
  assert got4["miou"] == pytest.approx(got["miou"], abs=1e-12)
  _assert_case(got4["per_class"][3], dice=1.0, iou=1.0, hd=0.0, hd95=0.0, asd=0.0)
  _assert_case(got4, dice=(0.75 + 14 / 15 + 1) / 3, hd95=(1.65 + 0.3 + 0) / 3)


@pytest.mark.parametrize(
  "pred_has, target_has, want",
  [
    # (class present in pred, in target) -> (Dice, IoU, distances: 0 or the diagonal)
    (False, False, (1.0, 1.0, 0.0)),
    (True, False, (0.0, 0.0, "diag")),
    (False, True, (0.0, 0.0, "diag")),
  ],
)
def test_empty_conventions_hold_per_class(pred_has, target_has, want):
  # Class 1 is scored normally in every row (identical squares); class 2 takes the row's
  # empty-mask branch. The diagonal of a 6 x 10 image at (2.0, 0.5) mm is sqrt(12^2 + 5^2) = 13.
  p = _square((6, 10), 0, 0, 2)
  t = p.copy()
  if pred_has:
    p[4, 7] = 2
  if target_has:
    t[5, 8] = 2
  got = metrics.case_metrics(p, t, num_classes=3, spacing=(2.0, 0.5))
  dice, iou, dist = want
  dist = 13.0 if dist == "diag" else dist
  _assert_case(got["per_class"][1], dice=1.0, iou=1.0, hd=0.0, hd95=0.0, asd=0.0)
  c2 = got["per_class"][2]
  _assert_case(c2, dice=dice, iou=iou, hd=dist, hd95=dist, asd=dist)
  assert (c2["pred_empty"], c2["target_empty"]) == (not pred_has, not target_has)
  _assert_case(got, dice=(1.0 + dice) / 2, hd95=dist / 2)
  # The case's own flags say whether any foreground is there at all: class 1 always is.
  assert not got["pred_empty"] and not got["target_empty"]


def test_two_classes_keep_the_merged_foreground_and_no_per_class():
  rng = np.random.default_rng(3)
  p = (rng.random((12, 12)) > 0.5).astype(np.int32)
  t = (rng.random((12, 12)) > 0.5).astype(np.int32)
  got = metrics.case_metrics(p, t, spacing=(1.0, 2.0))
  assert "per_class" not in got
  assert set(got) == set(metrics.METRIC_KEYS) | {"pred_empty", "target_empty"}
  fg = metrics.class_metrics(p > 0, t > 0, spacing=(1.0, 2.0))
  for k in metrics.CLASS_KEYS:
    assert got[k] == fg[k]  # exactly: the two-class numbers are the foreground's
  summary = metrics.summarize([got, got])
  assert "per_class" not in summary
  assert metrics.summarize([got], class_names=["polyp"]) == metrics.summarize([got])
  with pytest.raises(ValueError, match="2 class names"):
    metrics.summarize([got], class_names=["a", "b"])


def test_summarize_per_class_by_name():
  t = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
  p = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 1, 2]])
  a = metrics.case_metrics(p, t, num_classes=3)  # the hand-worked case above
  b = metrics.case_metrics(t, t, num_classes=3)  # perfect
  empty = np.zeros_like(t)
  c = metrics.case_metrics(empty, t, num_classes=3)  # nothing predicted: Dice 0, diag 4*sqrt2
  diag = 4 * math.sqrt(2.0)
  summary = metrics.summarize([a, b, c], class_names=["liver", "tumour"])
  assert list(summary["per_class"]) == ["liver", "tumour"]
  liver, tumour = summary["per_class"]["liver"], summary["per_class"]["tumour"]
  _assert_case(liver, dice=(0.75 + 1 + 0) / 3, iou=(0.6 + 1 + 0) / 3, hd95=(1.65 + 0 + diag) / 3)
  _assert_case(tumour, dice=(14 / 15 + 1 + 0) / 3, asd=(1 / 15 + 0 + diag) / 3, hd=(1 + diag) / 3)
  assert set(liver) == set(metrics.CLASS_KEYS)
  # The headline is the mean over foreground classes (nnU-Net's foreground mean).
  for k in metrics.CLASS_KEYS:
    assert summary[k] == pytest.approx((liver[k] + tumour[k]) / 2, abs=1e-12), k
  assert summary["n_pred_empty"] == 1 and summary["n_one_empty"] == 1
  default = metrics.summarize([a, b, c])
  assert list(default["per_class"]) == ["class1", "class2"]
  assert default["per_class"]["class2"] == tumour
  acc = metrics.MetricAccumulator(num_classes=3, class_names=("liver", "tumour"))
  for pred in (p, t, empty):
    acc.add_case(pred, t)
  assert acc.result() == summary
  with pytest.raises(ValueError, match="1 class names"):
    metrics.summarize([a], class_names=["liver"])
  with pytest.raises(ValueError, match="distinct"):
    metrics.summarize([a], class_names=["liver", "liver"])
  with pytest.raises(ValueError, match="different classes"):
    metrics.summarize([a, metrics.case_metrics(p, t, num_classes=4)])


def test_batch_accumulator_and_volume_grouping():
  rng = np.random.default_rng(1)
  preds = (rng.random((3, 16, 16)) > 0.6).astype(np.int32)
  targets = (rng.random((3, 16, 16)) > 0.6).astype(np.int32)
  targets[2] = 0  # one target-empty case
  cases = metrics.batch_case_metrics(preds, targets, spacing=(1.0, 2.0))
  for i, c in enumerate(cases):
    assert c == metrics.case_metrics(preds[i], targets[i], spacing=(1.0, 2.0))
  acc = metrics.MetricAccumulator(spacing=(1.0, 2.0))
  acc.add_batch(preds[:2], targets[:2])
  acc.add_case(preds[2], targets[2])
  assert acc.result() == metrics.summarize(cases)
  assert acc.result()["n_one_empty"] == 1

  # Two volumes split into slices and shuffled; grouping must rebuild them.
  va = np.zeros((5, 9, 9), np.int32)
  va[1:4, 2:5, 2:5] = 1
  vb = np.zeros((4, 9, 9), np.int32)
  vb[0:2, 3:8, 1:6] = 1
  pa, pb = np.roll(va, 1, axis=0), np.roll(vb, 2, axis=2)
  slices_p = np.concatenate([pa, pb])
  slices_t = np.concatenate([va, vb])
  ids = np.array(["a"] * 5 + ["b"] * 4)
  idx = np.concatenate([np.arange(5), np.arange(4)])
  perm = rng.permutation(9)
  sp = {"a": (3.0, 1.0, 1.0), "b": (2.0, 0.5, 0.5)}
  vols = metrics.volume_metrics(
    slices_p[perm], slices_t[perm], ids[perm], slice_indices=idx[perm], spacing=sp
  )
  assert list(vols) == ["a", "b"]
  assert vols["a"] == metrics.case_metrics(pa, va, spacing=sp["a"])
  assert vols["b"] == metrics.case_metrics(pb, vb, spacing=sp["b"])
  # Volume a is the hand-worked 3D example (a cube shifted one 3 mm slice).
  assert vols["a"]["hd"] == pytest.approx(3.0)

  with pytest.raises(ValueError, match="duplicate"):
    metrics.volume_metrics(slices_p, slices_t, ids, slice_indices=np.zeros(9, int))
  with pytest.raises(ValueError, match="non-contiguous"):
    metrics.volume_metrics(slices_p, slices_t, ids, slice_indices=idx * 2)
  with pytest.raises(ValueError, match="no entry for case 'b'"):
    metrics.volume_metrics(
      slices_p, slices_t, ids, slice_indices=idx, spacing={"a": (1.0, 1.0, 1.0)}
    )


@pytest.mark.parametrize(
  "pred, target, kwargs, match",
  [
    (np.zeros((4, 4), int), np.zeros((4, 5), int), {}, "shapes differ"),
    (np.full((4, 4), 0.5), np.zeros((4, 4), int), {}, "non-integer"),
    (np.zeros((4, 4), int), np.full((4, 4), 2), {}, r"target labels .*\[0, 1\]"),
    (np.full((4, 4), -1), np.zeros((4, 4), int), {}, r"pred labels"),
    (np.zeros((4, 4), int), np.zeros((4, 4), int), {"num_classes": 1}, "num_classes"),
    (np.zeros(4, int), np.zeros(4, int), {}, "ndim"),
    (np.zeros((4, 4), int), np.zeros((4, 4), int), {"spacing": (1.0, 1.0, 1.0)}, "spacing"),
    (np.zeros((4, 4), int), np.zeros((4, 4), int), {"spacing": (1.0, 0.0)}, "spacing"),
    (np.zeros((4, 4), "U1"), np.zeros((4, 4), int), {}, "integer labels"),
  ],
)
def test_input_validation(pred, target, kwargs, match):
  with pytest.raises(ValueError, match=match):
    metrics.case_metrics(pred, target, **kwargs)


def test_integral_float_labels_accepted():
  # nibabel's get_fdata returns float64 label maps; integral floats are fine.
  t = _square((10, 10), 2, 2, 4)
  got = metrics.case_metrics(t.astype(np.float64), t)
  _assert_case(got, dice=1.0, iou=1.0, hd=0.0, asd=0.0, miou=1.0)


def _blobs(rng, shape, n, sigma):
  out = []
  while len(out) < n:
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    m = x > 0.5 * x.std()
    if m.any():
      out.append(m.astype(np.int32))
  return out


def test_matches_medpy_on_random_blobs():
  mb = pytest.importorskip("medpy.metric.binary")
  rng = np.random.default_rng(0)
  pairs = [
    (p, t, None if i % 2 else (rng.uniform(0.3, 3), rng.uniform(0.3, 3)))
    for i, (p, t) in enumerate(zip(_blobs(rng, (32, 32), 20, 2.0), _blobs(rng, (32, 32), 20, 2.0)))
  ]
  pairs += [
    (p, t, (3.0, 0.7, 0.9))
    for p, t in zip(_blobs(rng, (10, 14, 14), 3, 1.5), _blobs(rng, (10, 14, 14), 3, 1.5))
  ]
  for p, t, sp in pairs:
    got = metrics.case_metrics(p, t, spacing=sp)
    want = {
      "dice": mb.dc(p, t),
      "iou": mb.jc(p, t),
      "hd": mb.hd(p, t, sp),
      "hd95": mb.hd95(p, t, sp),
      "asd": mb.assd(p, t, sp),
    }
    for k, v in want.items():
      assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (k, sp)
    assert got["hd95"] <= got["hd"] + 1e-12 and got["asd"] <= got["hd"] + 1e-12


def test_per_class_scores_match_medpy():
  mb = pytest.importorskip("medpy.metric.binary")
  rng = np.random.default_rng(5)
  # Three-class label maps: class 2 where a second blob field overlaps the first's class 1.
  fields = _blobs(rng, (24, 28), 8, 2.0)
  maps = [f + (f & g) for f, g in zip(fields[::2], fields[1::2])]
  sp = (0.7, 1.9)
  for p, t in zip(maps[:2], maps[2:]):
    got = metrics.case_metrics(p, t, num_classes=3, spacing=sp)
    for c in (1, 2):
      pc, tc = p == c, t == c
      want = {
        "dice": mb.dc(pc, tc),
        "iou": mb.jc(pc, tc),
        "hd": mb.hd(pc, tc, sp),
        "hd95": mb.hd95(pc, tc, sp),
        "asd": mb.assd(pc, tc, sp),
      }
      for k, v in want.items():
        assert got["per_class"][c][k] == pytest.approx(v, rel=1e-12, abs=1e-12), (k, c)
