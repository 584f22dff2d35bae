"""`evaluate.evaluate` on hand-built splits with known answers (MetaDCSeg §4.1): the
predictions in order despite a padded last batch, each parameter variant scored, against the
clean labels (never the noisy ones), per image for 2D data and per volume for 3D data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadcseg_jax.data import pipeline
from metadcseg_jax.training import evaluate

SIZE = 8


class ThresholdMethod:
  """Foreground where the image exceeds the variant's threshold in `state`: with images
  2·label − 1 (+ noise below 0.5) the "raw" threshold 0 predicts the clean label exactly and the
  "ema" threshold −10 predicts foreground everywhere."""

  def __init__(self):
    self.calls = []

  def predict(self, state, images, *, variant="raw"):
    self.calls.append((variant, images.shape))  # traced once per shape and variant
    fg = jax.nn.sigmoid(50.0 * (images[..., 0] - state[variant]))
    return jnp.stack([1.0 - fg, fg], axis=-1)


STATE = {"raw": jnp.float32(0.0), "ema": jnp.float32(-10.0)}


def _square(i):
  label = np.zeros((SIZE, SIZE), np.int32)
  label[1 : 3 + i % 5, 2 : 3 + i % 4] = 1  # a different size per example: order matters
  return label


def _source(n, *, volumes=None):
  rng = np.random.default_rng(0)
  items = []
  for i in range(n):
    label = _square(i)
    image = 2.0 * label - 1.0 + rng.uniform(-0.4, 0.4, label.shape)
    item = {"image": image[..., None].astype(np.float32), "label": label, "case_id": f"img{i}"}
    if volumes is not None:
      item["case_id"], item["slice_index"] = volumes[i]
    items.append(item)
  return items


def _records(source, indices):
  # Noisy labels that share nothing with the clean ones: scored against them, the raw Dice
  # would be 0, not 1.
  noisy = np.stack([1 - item["label"] for item in source])
  return pipeline.Records(
    source,
    indices,
    name="test",
    num_classes=2,
    image_shape=(SIZE, SIZE, 1),
    noisy_labels=noisy,
  )


def _all_foreground_dice(labels):
  n = np.sum(labels)
  return 2.0 * n / (n + labels.size)


def test_per_image_scores_with_a_padded_last_batch():
  source = _source(9)
  indices = [7, 2, 5, 0, 8, 1, 3]  # 7 examples, batches of 3: the last one padded by 2
  records = _records(source, indices)
  method = ThresholdMethod()
  predictor = evaluate.Predictor(method)
  out = predictor.predict_split(STATE, records, variant="raw", batch_size=3)
  labels = np.stack([source[i]["label"] for i in indices])
  np.testing.assert_array_equal(out["pred"], labels)  # in order, padding dropped
  np.testing.assert_array_equal(out["label"], labels)
  np.testing.assert_array_equal(out["noisy_label"], 1 - labels)
  assert out["prob"].shape == (7, SIZE, SIZE)
  np.testing.assert_allclose(out["prob"][labels == 1], 1.0, atol=1e-6)
  # One compiled shape: every call is padded to the batch size.
  assert {shape for _, shape in method.calls} == {(3, SIZE, SIZE, 1)}

  results = evaluate.evaluate(predictor, STATE, records, batch_size=3, num_classes=2)
  assert set(results) == {"raw", "ema"}
  raw, ema = results["raw"], results["ema"]
  assert raw["n_cases"] == 7 and ema["n_cases"] == 7
  for key in ("dice", "iou", "miou"):
    assert raw[key] == pytest.approx(1.0)  # scored on the clean labels
  for key in ("hd", "hd95", "asd"):
    assert raw[key] == pytest.approx(0.0)
  want = np.mean([_all_foreground_dice(lab) for lab in labels])
  assert ema["dice"] == pytest.approx(want, rel=1e-6)
  assert ema["n_pred_empty"] == 0 and ema["n_both_empty"] == 0


def test_volumes_are_scored_per_volume():
  # Two volumes of 3 slices, listed out of order in the source and the split.
  volumes = [("b", 2), ("a", 0), ("b", 0), ("a", 2), ("b", 1), ("a", 1), ("c", 0)]
  source = _source(len(volumes), volumes=volumes)
  indices = [4, 1, 0, 5, 2, 3]  # leaves out case c; positions differ from source indices
  records = _records(source, indices)
  predictor = evaluate.Predictor(ThresholdMethod())
  results = evaluate.evaluate(predictor, STATE, records, batch_size=4, num_classes=2)
  raw, ema = results["raw"], results["ema"]
  assert raw["n_cases"] == 2 and ema["n_cases"] == 2  # volumes, not 6 slices
  assert raw["dice"] == pytest.approx(1.0) and raw["hd95"] == pytest.approx(0.0)
  per_volume = [
    _all_foreground_dice(np.stack([source[i]["label"] for i in indices if volumes[i][0] == c]))
    for c in ("a", "b")
  ]
  per_slice = np.mean([_all_foreground_dice(source[i]["label"]) for i in indices])
  assert ema["dice"] == pytest.approx(np.mean(per_volume), rel=1e-6)
  assert not np.isclose(ema["dice"], per_slice, rtol=1e-3)

  # A spacing scales the distances (isotropic 2 mm: exactly twice the voxel distances).
  spaced = evaluate.evaluate(
    predictor,
    STATE,
    records,
    batch_size=4,
    num_classes=2,
    spacing={"a": (2.0, 2.0, 2.0), "b": (2.0, 2.0, 2.0)},
  )["ema"]
  assert ema["hd"] > 0
  for key in ("hd", "hd95", "asd"):
    assert spaced[key] == pytest.approx(2.0 * ema[key], rel=1e-9)
  assert spaced["dice"] == pytest.approx(ema["dice"])


class LabelMethod:
  """Three classes: "raw" predicts the label the image encodes (image = label), "ema" predicts
  class 1 wherever the label is not background, so class 2 is never predicted."""

  def __init__(self):
    self.calls = 0

  def predict(self, state, images, *, variant="raw"):
    del state
    self.calls += 1
    label = jnp.round(images[..., 0]).astype(jnp.int32)
    if variant == "ema":
      label = jnp.minimum(label, 1)
    return jax.nn.one_hot(label, 3)


def test_three_classes_are_scored_and_kept_per_class():
  source = []
  for i in range(3):
    label = np.zeros((SIZE, SIZE), np.int32)
    label[1 : 5 + i, 1:6] = 1
    label[2:4, 2 : 3 + i] = 2
    source.append(
      {"image": label[..., None].astype(np.float32), "label": label, "case_id": f"c{i}"}
    )
  records = pipeline.Records(
    source, [0, 1, 2], name="test", num_classes=3, image_shape=(SIZE, SIZE, 1)
  )
  method = LabelMethod()
  predictor = evaluate.Predictor(method)
  names = ["organ", "lesion"]
  with pytest.raises(ValueError, match="1 class names"):
    evaluate.evaluate(predictor, {}, records, batch_size=2, num_classes=3, class_names=["x"])
  assert method.calls == 0  # a wrong list fails before anything is predicted
  results = evaluate.evaluate(
    predictor, {}, records, batch_size=2, num_classes=3, class_names=names
  )
  raw, ema = results["raw"], results["ema"]
  assert list(raw["per_class"]) == names
  for name in names:
    assert raw["per_class"][name]["dice"] == pytest.approx(1.0)
    assert raw["per_class"][name]["hd95"] == pytest.approx(0.0)
  # EMA: class 1 predicted on T1 ∪ T2 -> Dice 2|T1| / (2|T1| + |T2|); class 2 missed -> Dice 0
  # and distances the 8 x 8 image's diagonal. The headline is the mean over the two classes.
  labels = [item["label"] for item in source]
  organ = [2 * np.sum(t == 1) / (2 * np.sum(t == 1) + np.sum(t == 2)) for t in labels]
  diag = np.hypot(SIZE, SIZE)
  assert ema["per_class"]["organ"]["dice"] == pytest.approx(np.mean(organ))
  assert ema["per_class"]["lesion"]["dice"] == 0.0
  assert ema["per_class"]["lesion"]["hd95"] == pytest.approx(diag)
  assert ema["dice"] == pytest.approx(np.mean(organ) / 2)
  assert ema["hd95"] == pytest.approx((ema["per_class"]["organ"]["hd95"] + diag) / 2)

  ((ids, cases),) = evaluate.evaluate_cases(
    predictor, {}, records, batch_size=2, num_classes=3, variants=("ema",)
  ).values()
  kept = evaluate.case_scores(ids, cases, class_names=names)
  assert kept["case_ids"] == ["c0", "c1", "c2"]
  assert list(kept["per_class"]) == names
  assert set(kept["per_class"]["organ"]) == set(evaluate.CASE_KEYS)
  np.testing.assert_allclose(kept["per_class"]["organ"]["dice"], organ)
  assert kept["per_class"]["lesion"]["dice"] == [0.0, 0.0, 0.0]
  np.testing.assert_allclose(kept["dice"], np.asarray(organ) / 2)
  assert list(evaluate.case_scores(ids, cases)["per_class"]) == ["class1", "class2"]


def test_two_class_case_scores_are_unchanged():
  cases = [{"dice": 0.5, "iou": 1 / 3, "hd95": float("inf")}]
  assert evaluate.case_scores(["a"], cases) == {
    "case_ids": ["a"],
    "dice": [0.5],
    "iou": [1 / 3],
    "hd95": [None],
  }
