"""Tests of the real-dataset builders (metadcseg_jax.data.real) on tiny fake raw folders."""

import json
import time

import numpy as np
from PIL import Image
import pytest

from metadcseg_jax.data import readers
from metadcseg_jax.data import real

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")


def _ids(source):
  return [source[i]["case_id"].decode() for i in range(len(source))]


def _check_splits(sources, all_ids):
  per_split = {s: set(_ids(src)) for s, src in sources.items()}
  assert set(per_split) == {"train", "val", "test"}
  assert all(per_split.values()), {s: len(v) for s, v in per_split.items()}
  assert not per_split["train"] & per_split["val"]
  assert not per_split["train"] & per_split["test"]
  assert not per_split["val"] & per_split["test"]
  assert set().union(*per_split.values()) == set(all_ids)
  return per_split


def _disc(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


# ---------------------------------------------------------------------------------------------
# 2D folders.


def _write_pairs(root, n, *, size=32, grey=False, ext="png", mask_ext="png", seed=0):
  """n random images with disc masks (0/255) under root/images, root/masks."""
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  truth = {}
  for i in range(n):
    stem = f"img{i:02d}"
    shape = (size, size) if grey else (size, size, 3)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = _disc(size, size, *rng.integers(10, size - 10, 2), rng.integers(4, 9))
    Image.fromarray(image).save(root / "images" / f"{stem}.{ext}")
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
    if mask_ext == "jpg":
      mask_img = mask_img.convert("RGB")  # Kvasir masks are RGB JPEGs
    mask_img.save(root / "masks" / f"{stem}.{mask_ext}")
    truth[stem] = (image, mask)
  return truth


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory):
  root = tmp_path_factory.mktemp("kvasir_raw")
  truth = _write_pairs(root / "Kvasir-SEG", 12, ext="jpg", mask_ext="jpg")
  data_dir = tmp_path_factory.mktemp("kvasir_data")
  sources = real.load_dataset("kvasir_seg", data_dir=data_dir, manual_dir=root, size=32)
  return root, data_dir, truth, sources


def test_kvasir_records_and_split(kvasir):
  root, data_dir, truth, sources = kvasir
  per_split = _check_splits(sources, truth)
  assert {s: len(v) for s, v in per_split.items()} == {"train": 9, "val": 1, "test": 2}
  record = sources["train"][0]
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.float32
  assert record["label"].shape == (32, 32) and record["label"].dtype == np.uint8
  assert int(record["slice_index"]) == 0
  for split, src in sources.items():
    for i in range(len(src)):
      rec = src[i]
      image, mask = truth[rec["case_id"].decode()]
      assert set(np.unique(rec["label"])) <= {0, 1}
      # JPEG masks: grey > 127 recovers the disc up to a few compressed edge pixels.
      assert (rec["label"].astype(bool) != mask).mean() < 0.02
      # Same size: no resampling, so the image is the decoded JPEG / 255.
      decoded = np.asarray(
        Image.open(root / "Kvasir-SEG" / "images" / f"{rec['case_id'].decode()}.jpg")
      )
      np.testing.assert_allclose(rec["image"], decoded / 255.0, atol=1e-6)
      assert np.abs(rec["image"] - image / 255.0).mean() < 0.3  # and it is that image
  content = json.loads((data_dir / "kvasir_seg" / "splits_seed0.json").read_text())
  assert content["seed"] == 0 and content["source"] == str(root.resolve())
  assert {s: set(v) for s, v in content["splits"].items()} == per_split


def test_kvasir_rerun_reads_split_file(kvasir):
  root, data_dir, truth, sources = kvasir
  path = data_dir / "kvasir_seg" / "splits_seed0.json"
  content = json.loads(path.read_text())
  moved = content["splits"]["train"].pop(0)
  content["splits"]["test"].append(moved)
  path.write_text(json.dumps(content))
  # A build at another size reuses the (edited) file instead of re-splitting.
  again = real.load_dataset("kvasir_seg", data_dir=data_dir, manual_dir=root, size=16)
  assert moved in _ids(again["test"]) and moved not in _ids(again["train"])
  assert again["val"][0]["image"].shape == (16, 16, 3)
  # A file that names cases the folder lacks is an error, never a silent re-split.
  content["splits"]["test"].append("ghost")
  path.write_text(json.dumps(content))
  with pytest.raises(ValueError, match="ghost"):
    real.load_dataset("kvasir_seg", data_dir=data_dir, manual_dir=root, size=24)


def test_split_rule_and_seed():
  ids = [f"c{i:03d}" for i in range(1000)]
  fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
  split = readers.make_splits(ids, fractions=fractions, seed=0)
  assert {s: len(v) for s, v in split.items()} == {"train": 800, "val": 100, "test": 100}
  assert split == readers.make_splits(ids[::-1], fractions=fractions, seed=0)
  assert split != readers.make_splits(ids, fractions=fractions, seed=1)
  assert readers.split_counts(484, fractions) == {"train": 387, "val": 48, "test": 49}
  assert readers.split_counts(50, real.Promise12.FRACTIONS) == {"train": 36, "val": 4, "test": 10}
  assert readers.split_counts(20, real.MsdHeart.FRACTIONS) == {"train": 14, "val": 2, "test": 4}
  assert readers.split_counts(5, fractions) == {"train": 3, "val": 1, "test": 1}
  with pytest.raises(ValueError, match="at least 3"):
    readers.split_counts(2, fractions)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder_raw")
  truth = _write_pairs(root, 10, grey=True)
  (root / "images" / ".DS_Store").write_bytes(b"\0\1")
  (root / "images" / "notes.txt").write_text("not an image")
  data_dir = tmp_path_factory.mktemp("folder_data")
  return root, data_dir, truth


def test_folder_lossless_and_skipped_files(folder):
  root, data_dir, truth = folder
  builder = real.get_dataset_builder("folder", data_dir=data_dir, manual_dir=root, size=32)
  assert "channels-1" in builder.builder_config.name  # all images grey: inferred 1 channel
  sources = real.load_dataset("folder", data_dir=data_dir, manual_dir=root, size=32)
  _check_splits(sources, truth)
  for src in sources.values():
    for i in range(len(src)):
      rec = src[i]
      image, mask = truth[rec["case_id"].decode()]
      np.testing.assert_array_equal(rec["label"], mask.astype(np.uint8))
      np.testing.assert_allclose(rec["image"][..., 0], image / 255.0, atol=1e-6)
  content = real.read_split_file(builder)
  assert content["num_skipped_files"] == 2
  assert sorted(content["skipped_files"]) == ["images/.DS_Store", "images/notes.txt"]


def test_folder_multiclass_rgb_and_resize(tmp_path):
  truth = _write_pairs(tmp_path / "raw", 5, size=40)
  for stem, (_, mask) in truth.items():  # class indices 0, 1, 2
    classes = np.where(mask, 2, (np.arange(40)[None, :] < 5).astype(np.uint8))
    Image.fromarray(classes.astype(np.uint8)).save(tmp_path / "raw" / "masks" / f"{stem}.png")
  with pytest.raises(ValueError, match=r"values \[2\]"):
    real.load_dataset("folder", data_dir=tmp_path / "d0", manual_dir=tmp_path / "raw", size=20)
  sources = real.load_dataset(
    "folder", data_dir=tmp_path / "d", manual_dir=tmp_path / "raw", size=20, num_classes=3
  )
  rec = sources["train"][0]
  assert rec["image"].shape == (20, 20, 3)
  assert set(np.unique(rec["label"])) <= {0, 1, 2} and (rec["label"] == 2).any()


def test_resize_is_antialiased_bilinear():
  ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))[..., None]
  small = readers.resize_image(ramp, 16)
  centres = (np.arange(16) + 0.5) * 4 - 0.5  # output pixel centres in input pixels
  np.testing.assert_allclose(
    small[4:-4, 4:-4, 0], np.tile(centres / 63, (16, 1))[4:-4, 4:-4], atol=1e-5
  )
  checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)[..., None]
  np.testing.assert_allclose(readers.resize_image(checker, 16)[2:-2, 2:-2], 0.5, atol=0.02)
  labels = np.repeat(np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4), 16, 0), 16, 1)
  np.testing.assert_array_equal(readers.resize_label(labels, 4), labels[::16, ::16])


def _bad_folder(tmp_path, n=4):
  root = tmp_path / "raw"
  _write_pairs(root, n)
  return root


def _build_folder(root, tmp_path, **options):
  return real.load_dataset(
    "folder", data_dir=tmp_path / "data", manual_dir=root, size=16, **options
  )


@pytest.mark.parametrize(
  "case",
  [
    "image_without_mask",
    "mask_without_image",
    "unreadable",
    "size_mismatch",
    "bad_values",
    "empty",
    "no_masks_dir",
  ],
)
def test_folder_bad_input_names_the_file(tmp_path, case):
  root = _bad_folder(tmp_path)
  if case == "image_without_mask":
    (root / "masks" / "img01.png").unlink()
    match = "image without a mask.*img01.png"
  elif case == "mask_without_image":
    (root / "images" / "img02.png").unlink()
    match = "mask without an image.*img02.png"
  elif case == "unreadable":
    (root / "images" / "img03.png").write_bytes(b"definitely not a png")
    match = "cannot read image file .*img03.png"
  elif case == "size_mismatch":
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "masks" / "img00.png")
    match = "size mismatch.*img00.png.*img00.png"
  elif case == "bad_values":
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(root / "masks" / "img01.png")
    match = r"img01.png has values \[7\]"
  elif case == "empty":
    for p in (root / "images").iterdir():
      p.unlink()
    match = "no image files"
  else:
    for p in (root / "masks").iterdir():
      p.unlink()
    (root / "masks").rmdir()
    match = "wrong layout.*masks"
  with pytest.raises(ValueError, match=match):
    _build_folder(root, tmp_path, channels=3)
  # A failed build leaves nothing half-made behind: no build folder, no split file.
  assert not (tmp_path / "data" / "folder").exists()


def test_folder_options_come_from_the_config(tmp_path):
  """Grey images read as 3 channels and masks with classes {0, 1, 2}, set from config.data."""
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  from metadcseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  truth = _write_pairs(tmp_path / "raw", 5, size=32, grey=True)
  for stem, (_, mask) in truth.items():
    classes = np.where(mask, 2, (np.arange(32)[None, :] < 5).astype(np.uint8))
    Image.fromarray(classes.astype(np.uint8)).save(tmp_path / "raw" / "masks" / f"{stem}.png")
  config = tiny.get_config()
  config.data.name, config.data.manual_dir = "folder", str(tmp_path / "raw")
  config.data.data_dir, config.data.size = str(tmp_path / "data"), 32
  config.data.channels, config.data.num_classes = 3, 3
  sources, key, _ = pipeline.open_dataset(config.data)
  rec = sources["train"][0]
  assert rec["image"].shape == (32, 32, 3) and (rec["label"] == 2).any()
  np.testing.assert_array_equal(rec["image"][..., 0], rec["image"][..., 2])  # grey, repeated
  assert key.startswith("folder/")


def test_registry_rejects_unknown_names_and_options(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset"):
    real.get_dataset_builder("nope", data_dir=tmp_path, manual_dir=tmp_path, size=16)
  with pytest.raises(ValueError, match="unknown options"):
    real.get_dataset_builder(
      "kvasir_seg", data_dir=tmp_path, manual_dir=tmp_path, size=16, modality="FLAIR"
    )
  with pytest.raises(ValueError, match="train_slices"):
    real.get_dataset_builder(
      "msd_heart", data_dir=tmp_path, manual_dir=tmp_path, size=16, train_slices="some"
    )


# ---------------------------------------------------------------------------------------------
# Volumes.


def _volume(rng, shape, offset=100.0):
  return (offset + 30.0 * rng.standard_normal(shape)).astype(np.float32)


def _labels(rng, shape, values=(1,)):
  """Foreground boxes in the middle slices only (first and last slices empty)."""
  lab = np.zeros(shape, np.uint8)
  s, h, w = shape[:3]
  for k in range(1, s - 1):
    y, x = rng.integers(2, h - 8), rng.integers(2, w - 8)
    lab[k, y : y + 6, x : x + 6] = rng.choice(values)
  return lab


@pytest.fixture(scope="module")
def promise(tmp_path_factory):
  root = tmp_path_factory.mktemp("promise_raw")
  rng = np.random.default_rng(1)
  volumes = {}
  for i, slices in enumerate((5, 6, 4, 5)):
    image = _volume(rng, (slices, 20, 20), offset=50.0 * (i + 1))
    label = _labels(rng, image.shape)
    for arr, name in ((image, f"Case{i:02d}"), (label, f"Case{i:02d}_segmentation")):
      vol = sitk.GetImageFromArray(arr)
      vol.SetSpacing((0.6, 0.7, 3.0 + i))  # (x, y, z)
      sitk.WriteImage(vol, str(root / f"{name}.mhd"))
    volumes[f"Case{i:02d}"] = (image, label)
  return root, volumes


def test_promise12_slices_normalisation_and_spacing(promise, tmp_path):
  root, volumes = promise
  sources = real.load_dataset("promise12", data_dir=tmp_path, manual_dir=root, size=20)
  builder = real.get_dataset_builder("promise12", data_dir=tmp_path, manual_dir=root, size=20)
  per_split = _check_splits(sources, volumes)
  assert {s: len(v) for s, v in per_split.items()} == {"train": 2, "val": 1, "test": 1}
  for src in sources.values():
    slices = {}
    for i in range(len(src)):
      rec = src[i]
      assert rec["image"].shape == (20, 20, 1)
      slices.setdefault(rec["case_id"].decode(), {})[int(rec["slice_index"])] = rec
    for case_id, recs in slices.items():
      image, label = volumes[case_id]
      assert sorted(recs) == list(range(image.shape[0]))  # every slice, in order
      stack = np.stack([recs[k]["image"][..., 0] for k in sorted(recs)])
      np.testing.assert_allclose([stack.mean(), stack.std()], [0, 1], atol=1e-4)  # per volume
      np.testing.assert_allclose(stack, (image - image.mean()) / image.std(), atol=1e-4)
      np.testing.assert_array_equal(np.stack([recs[k]["label"] for k in sorted(recs)]), label)
  content = real.read_split_file(builder)
  assert content["cases"]["Case02"]["spacing_mm"] == pytest.approx([0.7, 0.6, 5.0])
  assert content["cases"]["Case02"]["shape"] == [4, 20, 20]
  assert builder.info.metadata["pixel_spacing_mm"]["Case02"] == pytest.approx([0.7, 0.6, 5.0])
  assert (
    real.get_dataset_builder("promise12", data_dir=tmp_path, manual_dir=root, size=10).info.metadata
    == {}
  )  # not built at 10 yet


def test_promise12_foreground_slices_for_training_only(promise, tmp_path):
  root, volumes = promise
  sources = real.load_dataset(
    "promise12", data_dir=tmp_path, manual_dir=root, size=10, train_slices="foreground"
  )
  train_cases = set(_ids(sources["train"]))
  assert len(sources["train"]) == sum(volumes[c][0].shape[0] - 2 for c in train_cases)
  assert all(sources["train"][i]["label"].any() for i in range(len(sources["train"])))
  test_case = _ids(sources["test"])[0]
  assert len(sources["test"]) == volumes[test_case][0].shape[0]  # test keeps empty slices


def test_promise12_missing_segmentation(promise, tmp_path):
  root, _ = promise
  raw = tmp_path / "raw"
  raw.mkdir()
  for p in root.iterdir():
    if not p.name.startswith("Case01_segmentation"):
      (raw / p.name).symlink_to(p)
  with pytest.raises(ValueError, match="image without a mask.*Case01.mhd"):
    real.load_dataset("promise12", data_dir=tmp_path / "d", manual_dir=raw, size=10)


def _write_decathlon(root, volumes, modality, labels, *, affine_zooms=(0.9, 0.8, 2.5)):
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  affine = np.diag(list(affine_zooms) + [1.0])
  training = []
  for case_id, (image, label) in volumes.items():
    # Stored NIfTI-style (X, Y, Z[, M]) from our (Z, Y, X[, M]) arrays.
    image_xyz = np.moveaxis(image, (0, 1, 2), (2, 1, 0))
    nib.save(nib.Nifti1Image(image_xyz, affine), str(root / "imagesTr" / f"{case_id}.nii.gz"))
    nib.save(
      nib.Nifti1Image(label.transpose(2, 1, 0).astype(np.float32), affine),
      str(root / "labelsTr" / f"{case_id}.nii.gz"),
    )
    training.append(
      {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
    )
  (root / "dataset.json").write_text(
    json.dumps(
      {
        "name": "fake",
        "modality": modality,
        "labels": labels,
        "numTraining": len(volumes),
        "training": training,
      }
    )
  )


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
  root = tmp_path_factory.mktemp("brain_raw") / "Task01_BrainTumour"
  rng = np.random.default_rng(2)
  volumes = {}
  for i in range(4):
    image = _volume(rng, (6, 20, 20, 4))
    image[:, :3] = 0.0  # skull-stripped: zero background rows
    volumes[f"BRATS_{i:03d}"] = (image, _labels(rng, (6, 20, 20), values=(1, 2, 3)))
  _write_decathlon(
    root,
    volumes,
    {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"},
  )
  (root / "imagesTr" / "._BRATS_000.nii.gz").write_bytes(b"\0")  # macOS fork in the archive
  return root.parent, volumes


def test_msd_brain_modality_whole_tumour_and_nonzero_zscore(brain, tmp_path):
  root, volumes = brain
  builder = real.get_dataset_builder(
    "msd_brain", data_dir=tmp_path, manual_dir=root, size=20, modality="t2w"
  )
  sources = real.load_dataset(
    "msd_brain", data_dir=tmp_path, manual_dir=root, size=20, modality="t2w"
  )
  _check_splits(sources, volumes)
  src = sources["test"]
  case_id = _ids(src)[0]
  image, label = volumes[case_id]
  stack = np.stack([src[i]["image"][..., 0] for i in range(len(src))])
  brain_voxels = image[..., 3] != 0
  flair = image[..., 3]
  expected = np.where(
    brain_voxels, (flair - flair[brain_voxels].mean()) / flair[brain_voxels].std(), 0.0
  )
  np.testing.assert_allclose(stack, expected, atol=1e-4)  # T2w = modality index 3
  assert (stack[:, :3] == 0).all()
  labels = np.stack([src[i]["label"] for i in range(len(src))])
  np.testing.assert_array_equal(labels, (label > 0).astype(np.uint8))
  content = real.read_split_file(builder)
  assert content["cases"][case_id]["spacing_mm"] == pytest.approx([0.8, 0.9, 2.5])
  assert content["skipped_files"] == ["Task01_BrainTumour/imagesTr/._BRATS_000.nii.gz"]
  with pytest.raises(ValueError, match="modality 'PD' not in"):
    real.load_dataset("msd_brain", data_dir=tmp_path, manual_dir=root, size=20, modality="PD")


def test_msd_heart_and_layout_errors(tmp_path):
  rng = np.random.default_rng(3)
  volumes = {
    f"la_{i:03d}": (_volume(rng, (4, 16, 16)), _labels(rng, (4, 16, 16))) for i in range(3)
  }
  root = tmp_path / "heart"
  _write_decathlon(root, volumes, {"0": "MRI"}, {"0": "background", "1": "left atrium"})
  sources = real.load_dataset("msd_heart", data_dir=tmp_path / "d", manual_dir=root, size=8)
  _check_splits(sources, volumes)
  assert sources["val"][0]["image"].shape == (8, 8, 1)
  assert sum(len(s) for s in sources.values()) == 12
  # Label values outside dataset.json's labels are named with the file.
  bad = dict(volumes)
  bad["la_001"] = (volumes["la_001"][0], volumes["la_001"][1] * 2)
  _write_decathlon(tmp_path / "bad", bad, {"0": "MRI"}, {"0": "background", "1": "atrium"})
  with pytest.raises(ValueError, match=r"la_001.nii.gz has values \[2\]"):
    real.load_dataset("msd_heart", data_dir=tmp_path / "d2", manual_dir=tmp_path / "bad", size=8)
  # A label volume of another shape, an unreadable image: both named.
  bad_label = tmp_path / "bad" / "labelsTr" / "la_001.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((16, 15, 4), np.float32), np.eye(4)), str(bad_label))
  with pytest.raises(ValueError, match="size mismatch.*la_001.nii.gz"):
    real.load_dataset("msd_heart", data_dir=tmp_path / "d2", manual_dir=tmp_path / "bad", size=8)
  (tmp_path / "bad" / "imagesTr" / "la_001.nii.gz").write_bytes(b"not a nifti")
  with pytest.raises(ValueError, match="cannot read volume file .*imagesTr/la_001.nii.gz"):
    real.load_dataset("msd_heart", data_dir=tmp_path / "d2", manual_dir=tmp_path / "bad", size=8)
  (tmp_path / "bad" / "dataset.json").unlink()
  with pytest.raises(ValueError, match="wrong layout.*dataset.json"):
    real.load_dataset("msd_heart", data_dir=tmp_path / "d3", manual_dir=tmp_path / "bad", size=8)


# ---------------------------------------------------------------------------------------------
# Real samples in shared/data beside the checkout (skipped when absent).


def test_real_kvasir_sample(shared_data, tmp_path):
  manual_dir = shared_data / "kvasir_seg_sample"
  start = time.perf_counter()
  sources = real.load_dataset("kvasir_seg", data_dir=tmp_path, manual_dir=manual_dir, size=64)
  seconds = time.perf_counter() - start
  stems = [p.stem for p in (manual_dir / "Kvasir-SEG" / "images").glob("*.jpg")]
  per_split = _check_splits(sources, stems)
  assert {s: len(v) for s, v in per_split.items()} == {"train": 3, "val": 1, "test": 1}
  for src in sources.values():
    rec = src[0]
    assert rec["image"].shape == (64, 64, 3) and rec["image"].dtype == np.float32
    assert set(np.unique(rec["label"])) == {0, 1}
    assert 0.01 < rec["label"].mean() < 0.6  # a polyp, not noise or the whole frame
  print(f"kvasir sample at 64x64 built in {seconds:.2f} s")


def test_real_kvasir_256_folder(shared_data, tmp_path):
  # The 256-px copy of Kvasir-SEG the benchmark's Kvasir presets read: a handful of its pairs,
  # linked in its own layout (never copied), build and binarise as the full folder does.
  shared = shared_data / "kvasir_seg_256" / "Kvasir-SEG"
  if not shared.is_dir():
    pytest.skip(f"{shared} not present")
  stems = sorted(p.stem for p in (shared / "images").glob("*.jpg"))[:10]
  root = tmp_path / "raw" / "Kvasir-SEG"
  for sub in ("images", "masks"):
    (root / sub).mkdir(parents=True)
    for stem in stems:
      (root / sub / f"{stem}.jpg").symlink_to(shared / sub / f"{stem}.jpg")
  sources = real.load_dataset("kvasir_seg", data_dir=tmp_path, manual_dir=tmp_path / "raw", size=32)
  per_split = _check_splits(sources, stems)
  assert {s: len(v) for s, v in per_split.items()} == {"train": 8, "val": 1, "test": 1}
  for src in sources.values():
    for i in range(len(src)):
      rec = src[i]
      assert (
        rec["image"].shape == (32, 32, 3) and 0.0 <= rec["image"].min() <= rec["image"].max() <= 1.0
      )
      # A polyp mask thresholded at 127: two values, a plausible share (the folder's mean is 0.16).
      mask = np.asarray(
        Image.open(shared / "masks" / f"{rec['case_id'].decode()}.jpg").convert("L")
      )
      assert set(np.unique(rec["label"])) == {0, 1}
      assert abs(rec["label"].mean() - (mask > 127).mean()) < 0.05


@pytest.fixture
def brats_decathlon(shared_data, tmp_path):
  """The two BraTS cases (and a third name for the first) in the Decathlon layout, symlinked."""
  root = tmp_path / "Task01_BrainTumour"
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  cases = {
    "BRATS_001": "brats_2013_pat0005_1",
    "BRATS_002": "brats_2013_pat0006_1",
    "BRATS_003": "brats_2013_pat0005_1",
  }
  for case_id, folder in cases.items():
    src = shared_data / "brats_sample" / folder
    (root / "imagesTr" / f"{case_id}.nii.gz").symlink_to(src / "Flair_subtrMeanDivStd.nii.gz")
    (root / "labelsTr" / f"{case_id}.nii.gz").symlink_to(src / "OTMultiClass.nii.gz")
  (root / "dataset.json").write_text(
    json.dumps(
      {
        "modality": {"0": "FLAIR"},
        "labels": {
          str(i): name
          for i, name in enumerate(
            ["background", "necrosis", "edema", "non-enhancing", "enhancing"]
          )
        },
      }
    )
  )
  return root, cases


def test_real_brats_sample(brats_decathlon, tmp_path):
  root, cases = brats_decathlon
  sources = real.load_dataset("msd_brain", data_dir=tmp_path / "d", manual_dir=root.parent, size=64)
  _check_splits(sources, cases)
  for src in sources.values():
    assert len(src) == 155  # one case per split, every axial slice
    labels = np.stack([src[i]["label"] for i in range(len(src))])
    assert set(np.unique(labels)) == {0, 1}
    assert 50 < labels.reshape(155, -1).any(1).sum() < 100  # whole tumour on ~76 slices
    assert src[77]["image"].shape == (64, 64, 1) and np.isfinite(src[77]["image"]).all()
