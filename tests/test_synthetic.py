"""Tests of the synthetic dataset (metadcseg_jax.data.synthetic) and its TFDS builder."""

import copy
import dataclasses
import os
import pickle
import socket

import numpy as np
import pytest
from scipy import ndimage

from metadcseg_jax.data import builders
from metadcseg_jax.data import synthetic

TINY = dict(size=32, channels=1, n_train=6, n_val=3, n_test=3, seed=5)


def _signed_distance(mask):
  """Rounded distance to the boundary: >= 1 outside, <= -1 inside."""
  return np.round(
    ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
  ).astype(int)


# --- Generation --------------------------------------------------------------


def test_make_example_is_a_function_of_the_generator():
  a = synthetic.make_example(np.random.default_rng(11), size=32, channels=3)
  b = synthetic.make_example(np.random.default_rng(11), size=32, channels=3)
  c = synthetic.make_example(np.random.default_rng(12), size=32, channels=3)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert not np.array_equal(a[1], c[1])


def test_make_split_deterministic_and_seed_dependent():
  x0, y0 = synthetic.make_split(0, "train", 4, 32, 1)
  x0b, y0b = synthetic.make_split(0, "train", 4, 32, 1)
  x1, y1 = synthetic.make_split(1, "train", 4, 32, 1)
  np.testing.assert_array_equal(x0, x0b)
  np.testing.assert_array_equal(y0, y0b)
  for i in range(4):
    assert not np.array_equal(x0[i], x1[i])
    assert not np.array_equal(y0[i], y1[i])


def test_single_example_regenerates_split_entry():
  xs, ys = synthetic.make_split(3, "val", 5, 32, 3)
  for i in (0, 4, 2):
    x, y = synthetic.split_example(3, "val", i, size=32, channels=3)
    np.testing.assert_array_equal(x, xs[i])
    np.testing.assert_array_equal(y, ys[i])


def test_splits_share_no_example():
  labels = {s: synthetic.make_split(0, s, 15, 16, 1)[1] for s in ("train", "val", "test")}
  seen = {}
  for split, ys in labels.items():
    for i, y in enumerate(ys):
      key = y.tobytes()
      assert key not in seen, (split, i, seen.get(key))
      seen[key] = (split, i)
  assert synthetic.split_id("validation") not in (0, 1, 2)


@pytest.mark.parametrize("size,channels", [(16, 1), (32, 3), (48, 1), (64, 3)])
def test_shapes_dtypes_normalisation(size, channels):
  x, y = synthetic.make_split(0, "train", 3, size, channels)
  assert x.shape == (3, size, size, channels) and x.dtype == np.float32
  assert y.shape == (3, size, size) and y.dtype == np.uint8
  assert np.all(np.isfinite(x))
  assert set(np.unique(y)) == {0, 1}
  np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1.0, atol=1e-4)
  if channels > 1:  # correlated but distinct channels
    for xi in x:
      r = np.corrcoef(xi.reshape(-1, channels).T)[np.triu_indices(channels, 1)]
      assert np.all(r > 0.3) and np.all(r < 0.95), r


@pytest.fixture(scope="module")
def examples64():
  return synthetic.make_split(7, "train", 50, 64, 1)


def test_foreground_fraction_and_blob_count(examples64):
  _, y = examples64
  frac = y.mean(axis=(1, 2))
  lo, hi = synthetic.FOREGROUND_FRACTION_RANGE
  assert np.all(frac >= lo) and np.all(frac <= hi), (frac.min(), frac.max())
  assert frac.std() > 0.03  # sizes vary
  n_blobs = {ndimage.label(m)[1] for m in y}
  assert {1, 2} <= n_blobs and max(n_blobs) <= 3


def test_foreground_is_low_contrast_with_soft_boundary(examples64):
  x, y = examples64
  contrasts, aucs, profiles = [], [], []
  for img, lab in zip(x[..., 0], y.astype(bool)):
    fg, bg = img[lab], img[~lab]
    c = (fg.mean() - bg.mean()) / bg.std()
    sign = np.sign(c)
    contrasts.append(abs(c))
    # AUC: chance that a fg pixel is brighter (sign-corrected) than a bg pixel.
    ranks = np.argsort(np.argsort(np.r_[fg, bg] * sign))
    aucs.append((ranks[: fg.size].sum() - fg.size * (fg.size - 1) / 2) / (fg.size * bg.size))
    d = _signed_distance(lab)
    profiles.append([(img[d == k] * sign).mean() for k in (-3, -1, 1, 4)])
  contrasts, aucs = np.array(contrasts), np.array(aucs)
  assert np.all(contrasts > 0.05) and np.all(contrasts < 3.0)
  assert 0.8 < np.median(contrasts) < 2.0
  # Overlapping intensity distributions: far from separable by a threshold.
  assert np.all(aucs > 0.5) and 0.7 < np.median(aucs) < 0.93
  deep_in, edge_in, edge_out, far_out = np.mean(profiles, axis=0)
  step = deep_in - far_out
  assert step > 0.5
  # Blurred edge: the pixels next to the boundary sit partway up the step.
  assert deep_in - edge_in > 0.12 * step
  assert edge_out - far_out > 0.12 * step


@pytest.mark.parametrize(
  "kwargs", [dict(size=8, channels=1), dict(size=32, channels=0), dict(size=32.0, channels=1)]
)
def test_make_example_rejects_bad_shapes(kwargs):
  with pytest.raises(ValueError, match="size|channels"):
    synthetic.make_example(np.random.default_rng(0), **kwargs)


def test_make_split_rejects_bad_arguments():
  with pytest.raises(ValueError, match="seed"):
    synthetic.make_split(-1, "train", 2, 32, 1)
  with pytest.raises(ValueError, match="n must"):
    synthetic.make_split(0, "train", -2, 32, 1)
  with pytest.raises(ValueError, match="split"):
    synthetic.make_split(0, "", 2, 32, 1)


# --- TFDS builder --------------------------------------------------------------


def _tree_state(root):
  """{relative path: (mtime_ns, size)} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      st = os.stat(p)
      out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size)
  return out


def _read_split(source):
  records = [source[i] for i in range(len(source))]
  return records, np.stack([r["image"] for r in records]), np.stack([r["label"] for r in records])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A tiny config built with every network call refused (and recorded)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network disabled in test")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)
    sources = synthetic.load_synthetic(data_dir=data_dir, **TINY)
  return data_dir, sources, attempts, _tree_state(data_dir)


def test_build_makes_no_network_call(built):
  _, _, attempts, _ = built
  assert attempts == []


def test_builder_round_trip_equals_make_split(built):
  _, sources, _, _ = built
  sizes = {"train": TINY["n_train"], "val": TINY["n_val"], "test": TINY["n_test"]}
  assert set(sources) == set(sizes)
  for split, n in sizes.items():
    assert len(sources[split]) == n
    records, images, labels = _read_split(sources[split])
    x, y = synthetic.make_split(TINY["seed"], split, n, TINY["size"], TINY["channels"])
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    # Text comes back as bytes; slice_index as a plain integer.
    assert [r["case_id"] for r in records] == [
      f"synthetic-{split}-{i:05d}".encode() for i in range(n)
    ]
    assert all(int(r["slice_index"]) == 0 for r in records)


def test_builder_splits_disjoint(built):
  _, sources, _, _ = built
  keys = [
    r["image"].tobytes() for s in ("train", "val", "test") for r in _read_split(sources[s])[0]
  ]
  assert len(set(keys)) == len(keys)


def test_second_load_reuses_files(built):
  data_dir, sources, _, state = built
  again = synthetic.load_synthetic(data_dir=data_dir, **TINY)
  assert _tree_state(data_dir) == state
  np.testing.assert_array_equal(again["train"][2]["image"], sources["train"][2]["image"])


def test_data_source_survives_pickling(built):
  # grain's worker processes receive the sources pickled.
  _, sources, _, _ = built
  clone = pickle.loads(pickle.dumps(sources["val"]))
  assert len(clone) == TINY["n_val"]
  np.testing.assert_array_equal(clone[1]["label"], sources["val"][1]["label"])


def test_build_deterministic_across_directories(built, tmp_path):
  data_dir, _, _, _ = built
  synthetic.load_synthetic(data_dir=tmp_path, **TINY)
  name = synthetic.synthetic_config_name(**TINY)
  a = data_dir / "synthetic_segmentation" / name
  b = tmp_path / "synthetic_segmentation" / name
  files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  assert any(str(f).endswith(".array_record-00000-of-00001") for f in files)
  for f in files:
    assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_config_names_unique_and_predefined_reused(tmp_path):
  name = synthetic.synthetic_config_name(64, 1, 400, 50, 50, 0)
  assert name == "s64_c1_n400-50-50_seed0"
  cfg = synthetic.synthetic_builder_config(64, 1, 400, 50, 50, 0)
  assert cfg is synthetic.SyntheticSegmentation.builder_configs[name]
  variants = {
    synthetic.synthetic_builder_config(*args).name
    for args in [
      (64, 1, 400, 50, 50, 0),
      (64, 3, 400, 50, 50, 0),
      (32, 1, 400, 50, 50, 0),
      (64, 1, 40, 50, 50, 0),
      (64, 1, 400, 5, 50, 0),
      (64, 1, 400, 50, 5, 0),
      (64, 1, 400, 50, 50, 1),
    ]
  }
  assert len(variants) == 7
  # A copy of a predefined config (what unpickling makes) is taken by name;
  # a different config under a predefined name is refused.
  builder = synthetic.SyntheticSegmentation(data_dir=tmp_path, config=copy.copy(cfg))
  assert builder.builder_config is cfg
  with pytest.raises(ValueError, match="differs from the predefined"):
    synthetic.SyntheticSegmentation(data_dir=tmp_path, config=dataclasses.replace(cfg, seed=3))


def test_bad_configs_and_examples_rejected(built):
  data_dir, _, _, _ = built
  with pytest.raises(ValueError, match="n_val"):
    synthetic.synthetic_builder_config(32, 1, 4, 0, 2, 0)
  with pytest.raises(ValueError, match="size"):
    synthetic.synthetic_builder_config(8, 1, 4, 2, 2, 0)
  with pytest.raises(ValueError, match="data_dir"):
    synthetic.load_synthetic(data_dir=None, **TINY)
  builder = synthetic.SyntheticSegmentation(
    data_dir=data_dir, config=synthetic.synthetic_builder_config(**TINY)
  )
  image = np.zeros((32, 32, 1), np.float32)
  label = np.zeros((32, 32), np.uint8)
  ok = builder.encode_example(image=image, label=label, case_id="a")
  assert ok["case_id"] == "a" and ok["slice_index"] == 0
  with pytest.raises(ValueError, match="case 'a'.*image shape"):
    builder.encode_example(image=image[..., 0], label=label, case_id="a")
  with pytest.raises(ValueError, match="label values"):
    builder.encode_example(image=image, label=label + 2, case_id="a")
  with pytest.raises(ValueError, match="non-finite"):
    builder.encode_example(image=image * np.nan, label=label, case_id="a")
  with pytest.raises(TypeError):  # abstract base
    builders.SegmentationBuilder(data_dir=data_dir)
