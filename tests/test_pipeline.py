"""Augmentation, meta split, noisy-label attachment and the resumable grain stream."""

import numpy as np
import pytest

from metadcseg_jax import configs
from metadcseg_jax.data import augment
from metadcseg_jax.data import pipeline
from metadcseg_jax.data import splits


def _disk(size, r, cy=None, cx=None):
  yy, xx = np.mgrid[:size, :size]
  cy = size / 2 if cy is None else cy
  cx = size / 2 if cx is None else cx
  return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _fake_source(n, size=32, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    label = _disk(size, rng.integers(4, 10), rng.integers(10, 22), rng.integers(10, 22))
    image = label[..., None] + 0.1 * rng.standard_normal((size, size, channels))
    out.append(
      {
        "image": image.astype(np.float32),
        "label": label,
        "case_id": f"case{i}".encode(),
        "slice_index": np.int32(0),
      }
    )
  return out


def test_augment_same_geometry_for_image_and_labels():
  rng = np.random.default_rng(0)
  label = _disk(48, 12, 20, 26)
  noisy = _disk(48, 9, 22, 22)
  ex = {
    "image": np.stack([label, 1 - label], -1).astype(np.float32),
    "label": label,
    "noisy_label": noisy,
  }
  for _ in range(10):
    out = augment.augment(ex, rng)
    # The bilinear image is exactly 0/1 away from edges; there it must equal the labels.
    interior = (out["image"][..., 0] == 0) | (out["image"][..., 0] == 1)
    assert interior.mean() > 0.8
    np.testing.assert_array_equal(out["image"][..., 0][interior], out["label"][interior])
    np.testing.assert_allclose(out["image"][..., 1], 1 - out["image"][..., 0], atol=1e-6)
    assert out["label"].dtype == label.dtype and out["noisy_label"].dtype == noisy.dtype
    assert set(np.unique(out["label"])) <= {0, 1}


def test_augment_zooms_in_and_rotates_by_at_most_10_degrees():
  size, r = 64, 10
  ex = {"image": _disk(size, r)[..., None].astype(np.float32), "label": _disk(size, r)}
  ratios = []
  for seed in range(20):
    m, _ = augment.random_affine(np.random.default_rng(seed), (size, size))
    scale = np.sqrt(abs(np.linalg.det(m)))
    # output->input scale = size / (size + s), s in [4, 30]
    assert size / (size + 30) - 1e-9 <= scale <= size / (size + 4) + 1e-9
    angle = np.degrees(np.arctan2(abs(m[1, 0]), abs(m[0, 0])))
    assert angle <= 10.0 + 1e-6
    out = augment.augment(ex, np.random.default_rng(seed))
    ratios.append(out["label"].sum() / ex["label"].sum())
  # Area grows by (1/scale)^2 in [1.13, 2.1] (up to pixelisation).
  assert 1.05 < min(ratios) and max(ratios) < 2.3


def test_augment_deterministic_per_generator():
  ex = {
    "image": np.random.default_rng(1).standard_normal((32, 32, 3)).astype(np.float32),
    "label": _disk(32, 8),
  }
  a = augment.augment(ex, np.random.default_rng(5))
  b = augment.augment(ex, np.random.default_rng(5))
  c = augment.augment(ex, np.random.default_rng(6))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])


def _records(source, n_classes=2, noisy=None, idx=None):
  idx = np.arange(len(source)) if idx is None else idx
  return pipeline.Records(
    source,
    idx,
    name="fake/train",
    num_classes=n_classes,
    image_shape=source[0]["image"].shape,
    noisy_labels=noisy,
  )


def test_records_errors_name_the_example():
  src = _fake_source(6)
  src[3] = dict(src[3], label=src[3]["label"] * 3)  # label value 3 with 2 classes
  rec = _records(src)
  with pytest.raises(ValueError, match=r"example 3 \(case case3\).*\[3\].*outside \[0, 2\)"):
    rec[3]
  src[4] = dict(src[4], label=src[4]["label"][:-1])
  with pytest.raises(ValueError, match="example 4.*label shape"):
    rec[4]
  src[5] = dict(src[5], image=src[5]["image"][:16])
  with pytest.raises(ValueError, match="example 5.*image shape"):
    rec[5]
  src[0] = dict(src[0], image=np.full_like(src[0]["image"], np.nan))
  with pytest.raises(ValueError, match="example 0.*NaN"):
    rec[0]
  with pytest.raises(ValueError, match="x/train example 1.*outside"):
    pipeline.load_labels([src[1], dict(src[2], label=src[2]["label"] + 5)], "x/train", 2)


def test_meta_split_seeded_disjoint_and_at_least_one_batch():
  tr, me = splits.meta_indices(100, fraction=0.02, min_size=4, seed=3)
  assert len(me) == 4 and len(tr) == 96
  assert not set(tr) & set(me) and set(tr) | set(me) == set(range(100))
  tr2, me2 = splits.meta_indices(100, fraction=0.02, min_size=4, seed=3)
  np.testing.assert_array_equal(me, me2)
  _, me3 = splits.meta_indices(1000, fraction=0.02, min_size=2, seed=3)
  assert len(me3) == 20
  with pytest.raises(ValueError, match="no training examples"):
    splits.meta_indices(3, fraction=0.02, min_size=4, seed=0)


def test_train_stream_resumes_from_iterator_state_and_reshuffles_each_epoch():
  src = _fake_source(10)
  noisy = np.stack([s["label"] for s in src])[:, ::-1].copy()  # a recognisable "noise"
  rec = _records(src, noisy=noisy)
  ds = pipeline.train_dataset(rec, batch_size=3, seed=11)
  it = iter(ds)
  epoch1 = [next(it) for _ in range(3)]  # 10 // 3 = 3 batches per epoch
  state = it.get_state()
  epoch2 = [next(it) for _ in range(3)]
  idx1 = np.concatenate([b["index"] for b in epoch1])
  idx2 = np.concatenate([b["index"] for b in epoch2])
  assert len(set(idx1)) == 9 and len(set(idx2)) == 9  # no example twice within an epoch
  assert not np.array_equal(idx1, idx2)  # reshuffled
  b = epoch1[0]
  assert b["image"].shape == (3, 32, 32, 1) and b["noisy_label"].dtype == np.int32
  # noisy labels travel with their example (augmented with the same warp as the label).
  it2 = iter(pipeline.train_dataset(rec, batch_size=3, seed=11))
  it2.set_state(state)
  for want in epoch2:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.train_dataset(_records(src[:2]), batch_size=3, seed=0)


def test_noisy_label_is_augmented_with_the_label():
  src = _fake_source(4)
  noisy = np.stack([s["label"] for s in src])  # identical: must stay identical after warping
  ds = pipeline.train_dataset(_records(src, noisy=noisy), batch_size=2, seed=0)
  b = next(iter(ds))
  np.testing.assert_array_equal(b["label"], b["noisy_label"])


@pytest.fixture(scope="module")
def synthetic_splits(tmp_path_factory):
  cfg = configs.default_config().data
  cfg.update(
    name="synthetic",
    data_dir=str(tmp_path_factory.mktemp("data")),
    size=32,
    n_train=40,
    n_val=4,
    n_test=6,
    meta_fraction=0.02,
  )
  cfg.noise.update(kind="l2b60", seed=1, calibrate=False)
  return cfg, pipeline.prepare_data(cfg, meta_batch_size=2)


def test_prepare_data_meta_is_clean_and_train_is_noisy(synthetic_splits):
  cfg, splits = synthetic_splits
  assert len(splits.meta) == 2 and len(splits.train) == 38
  assert not set(splits.meta.indices) & set(splits.train.indices)
  for i in range(len(splits.meta)):
    ex = splits.meta[i]
    np.testing.assert_array_equal(ex["label"], ex["noisy_label"])
  differs = [
    not np.array_equal(splits.train[i]["label"], splits.train[i]["noisy_label"])
    for i in range(len(splits.train))
  ]
  assert np.mean(differs) > 0.3
  assert splits.info["noise"]["corruption_mean"] > 0.05
  # Same config and seed -> same noisy labels (served from the cache or rebuilt).
  again = pipeline.prepare_data(cfg, meta_batch_size=2)
  np.testing.assert_array_equal(again.train.noisy_labels, splits.train.noisy_labels)
  np.testing.assert_array_equal(again.meta.indices, splits.meta.indices)


def test_prepare_data_rejects_empty_split(synthetic_splits, monkeypatch):
  cfg, _ = synthetic_splits
  fake = {"train": _fake_source(8), "val": [], "test": _fake_source(2)}
  monkeypatch.setattr(pipeline, "open_built", lambda data, **_: pipeline.Opened(fake, "fake", {}))
  with pytest.raises(ValueError, match="fake\\): split 'val' is empty"):
    pipeline.prepare_data(cfg, meta_batch_size=2)
