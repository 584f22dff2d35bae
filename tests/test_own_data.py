"""A user's own folder: trusted masks, the split file, no noise unless asked, classes, volumes."""

import json
import shutil

import ml_collections
import numpy as np
import pytest

from experiments.configs import tiny
from metadcseg_jax import check_settings
from metadcseg_jax import configs
from metadcseg_jax import metrics
from metadcseg_jax.data import pipeline
from metadcseg_jax.data import splits
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError
from metadcseg_jax.inference import io
from metadcseg_jax.inference import model as model_lib
from metadcseg_jax.training import runs
from metadcseg_jax.training import train
from tests import folders


def _records(records):
  return {records.case_id(i): records[i] for i in range(len(records))}


def test_trusted_folder_gives_trusted_meta_val_test_and_verified_training_masks(tmp_path):
  trusted = tuple(range(0, 24, 2))  # 12 verified of 24
  truth = folders.write_folder(tmp_path / "raw", trusted=trusted)
  config = folders.folder_config(tmp_path / "raw", tmp_path / "data")
  wd = tmp_path / "run"
  wd.mkdir()
  data = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=wd)
  names = {f"case{i:02d}" for i in trusted}
  split = data.info["split"]
  assert split["trusted_source"] == "trusted/ folder" and set(split["trusted"]) == names
  for part in (data.meta, data.val, data.test):
    assert set(_records(part)) <= names
  assert len(data.meta) >= 2 and len(data.val) >= 1 and len(data.test) >= 1
  # meta 0.3, val 0.2, test 0.5 of the 12 trusted: 4, 2, 6; none of them left to train.
  assert (len(data.meta), len(data.val), len(data.test), len(data.train)) == (4, 2, 6, 12)
  for part in (data.meta, data.val, data.test):
    for stem, rec in _records(part).items():
      np.testing.assert_array_equal(rec["label"], truth[stem][0])  # scored on verified masks
  for stem, rec in _records(data.train).items():
    assert stem not in names
    np.testing.assert_array_equal(rec["noisy_label"], truth[stem][1])  # the mask as given
  assert data.info["reference"] == "trusted" and data.info["noise"]["kind"] == "none"
  # The user's masks against the verified ones, by hand: 1 - Dice of the shifted discs.
  hand = np.mean(
    [1 - 2 * (t & g).sum() / (t.sum() + g.sum()) for s, (t, g) in truth.items() if s in names]
  )
  assert data.info["given_vs_trusted"]["n"] == 12
  assert data.info["given_vs_trusted"]["one_minus_dice_mean"] == pytest.approx(hand)
  # The split made is written in the run's folder, and read back as written next time.
  written = json.loads((wd / splits.SPLIT_FILE).read_text())
  assert {k: sorted(v) for k, v in written.items() if k in splits.LISTS} == split_lists(data)
  again = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=wd)
  assert again.info["split"]["split_generated"] is False and split_lists(again) == split_lists(data)


def split_lists(data):
  return {
    "train": sorted(_records(data.train)),
    "meta": sorted(_records(data.meta)),
    "val": sorted(_records(data.val)),
    "test": sorted(_records(data.test)),
  }


def test_trusted_training_images_train_on_their_verified_mask_and_noise_spares_them(tmp_path):
  # 10 trusted, shares leaving 4 of them to train; L2B noise injected into the rest.
  truth = folders.write_folder(tmp_path / "raw", n=20, trusted=tuple(range(10)))
  config = folders.folder_config(
    tmp_path / "raw",
    tmp_path / "data",
    trusted_split=ml_collections.ConfigDict({"meta": 0.2, "val": 0.2, "test": 0.2}),
  )
  config.data.noise.kind = "l2b60"
  data = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path)
  trusted = {f"case{i:02d}" for i in range(10)}
  train_records = _records(data.train)
  kept = [s for s in train_records if s in trusted]
  assert len(kept) == 4
  for stem in kept:  # a verified mask is what a trusted image trains on, noise or not
    np.testing.assert_array_equal(train_records[stem]["noisy_label"], truth[stem][0])
  for stem, rec in _records(data.meta).items():
    np.testing.assert_array_equal(rec["noisy_label"], truth[stem][0])
  corrupted = [
    s
    for s, r in train_records.items()
    if s not in trusted and not np.array_equal(r["noisy_label"], r["label"])
  ]
  assert corrupted  # the noise reached the untrusted masks, and only those
  assert data.info["noise"]["kind"] == "l2b60" and data.info["n_trusted_train"] == 4


def test_the_default_config_injects_nothing_and_says_the_reference_is_untrusted(tmp_path):
  truth = folders.write_folder(tmp_path / "raw", n=12)
  config = folders.folder_config(tmp_path / "raw", tmp_path / "data")
  config.data.noise = configs.default_config().data.noise  # the default, whatever it is
  data = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path)
  for part in (data.train, data.meta, data.val, data.test):
    for stem, rec in _records(part).items():
      np.testing.assert_array_equal(rec["noisy_label"], truth[stem][1])
      np.testing.assert_array_equal(rec["label"], truth[stem][1])
  assert data.info["noise"] == {"kind": "none"} and data.info["reference"] == "untrusted"


def test_a_trusted_list_names_verified_masks_in_masks(tmp_path):
  truth = folders.write_folder(tmp_path / "raw", n=16)
  listed = [f"case{i:02d}" for i in (1, 3, 5, 7, 9, 11, 13, 15)]
  (tmp_path / "trusted.txt").write_text("# verified by Dr. X\n" + "\n".join(listed) + "\n")
  config = folders.folder_config(
    tmp_path / "raw", tmp_path / "data", trusted_list=str(tmp_path / "trusted.txt")
  )
  data = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path)
  for part in (data.meta, data.val, data.test):
    for stem, rec in _records(part).items():
      assert stem in listed
      np.testing.assert_array_equal(rec["label"], truth[stem][1])
  assert data.info["split"]["trusted_source"].startswith("list ")


def test_a_split_file_is_used_as_written(tmp_path):
  folders.write_folder(tmp_path / "raw", n=10, trusted=(0, 1, 2, 3, 4))
  lists = {
    "train": ["case05", "case06", "case07", "case08", "case09", "case00"],
    "meta": ["case01", "case02"],
    "val": ["case03"],
    "test": ["case04"],
  }
  (tmp_path / "raw" / splits.SPLIT_FILE).write_text(json.dumps(lists))
  config = folders.folder_config(tmp_path / "raw", tmp_path / "data")
  data = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path / "run")
  assert split_lists(data) == {k: sorted(v) for k, v in lists.items()}
  assert data.info["split"]["split_generated"] is False
  assert not (tmp_path / "run" / splits.SPLIT_FILE).exists()  # nothing written: it was given


# Each bad split file (on a folder whose cases 0-4 are trusted) and the one line it gives.
BAD_SPLITS = [
  ("not json", "{train: [", "cannot read it as JSON"),
  ("unknown list", {"train": [], "val": ["case01"], "test": ["case02"], "dev": []}, "'dev'"),
  ("unknown stem", {"val": ["case01"], "test": ["case99"]}, "'case99', which is not in the folder"),
  ("in two lists", {"val": ["case01"], "test": ["case01"]}, "'case01' is listed in both"),
  ("twice in one", {"val": ["case01", "case01"], "test": ["case02"]}, "listed twice in 'val'"),
  (
    "untrusted meta",
    {"meta": ["case01", "case07"], "val": ["case02"], "test": ["case03"]},
    "'case07', whose mask is not trusted",
  ),
  (
    "untrusted val",
    {"meta": ["case00", "case01"], "val": ["case07"], "test": ["case03"]},
    "'val' lists 'case07', whose mask is not trusted",
  ),
  (
    "untrusted test",
    {"meta": ["case00", "case01"], "val": ["case02"], "test": ["case09"]},
    "'test' lists 'case09', whose mask is not trusted",
  ),
  ("empty val", {"meta": ["case00", "case04"], "test": ["case03"]}, "the 'val' list is empty"),
  ("empty test", {"meta": ["case00", "case04"], "val": ["case03"]}, "the 'test' list is empty"),
  (
    "short meta",
    {"meta": ["case00"], "val": ["case02"], "test": ["case03"]},
    "fewer than one meta",
  ),
  ("not a list", {"val": "case01", "test": ["case02"]}, "'val' must be a list of stems"),
]


@pytest.fixture(scope="module")
def bad_split_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_split")
  folders.write_folder(root / "raw", n=10, trusted=(0, 1, 2, 3, 4))
  return root


@pytest.mark.parametrize("name,content,message", BAD_SPLITS, ids=[b[0] for b in BAD_SPLITS])
def test_a_bad_split_file_is_a_one_line_error(bad_split_folder, tmp_path, name, content, message):
  del name
  path = tmp_path / "split.json"
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  config = folders.folder_config(
    bad_split_folder / "raw", bad_split_folder / "data", split_file=str(path)
  )
  with pytest.raises(DataError, match=message) as e:
    pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path)
  assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_meta_method_without_a_clean_source_stops_before_any_work(tmp_path):
  folders.write_folder(tmp_path / "raw", n=8)
  config = folders.folder_config(tmp_path / "raw", tmp_path / "data")
  check_settings.check_config(config)  # CE trains on the masks as given
  config.method = "metadcseg"
  with pytest.raises(
    ConfigError, match="learns from a clean meta set.*trusted/.*trusted_list"
  ) as e:
    check_settings.check_config(config)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "data").exists()  # nothing built
  (tmp_path / "raw" / "trusted").mkdir()
  with pytest.raises(ConfigError, match="clean meta set"):  # an empty trusted/ is not
    check_settings.check_config(config)
  shutil.copy(tmp_path / "raw" / "images" / "case00.png", tmp_path / "raw" / "trusted" / "x.png")
  check_settings.check_config(config)  # a trusted/ folder with masks is a clean source
  (tmp_path / "raw" / "trusted" / "x.png").unlink()
  (tmp_path / "raw" / "trusted").rmdir()
  config.data.noise.kind = "l2b40"  # so is injected noise (the benchmark's case)
  check_settings.check_config(config)


# ---------------------------------------------------------------------------- volumes


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("decathlon")
  labels, affine = folders.write_decathlon(root / "raw")
  lists = {
    "train": ["vol_000", "vol_001"],
    "meta": ["vol_002"],
    "val": ["vol_003"],
    "test": ["vol_004"],
  }
  (root / "raw" / splits.SPLIT_FILE).write_text(json.dumps(lists))
  config = tiny.get_config()
  config.method = "ce"
  config.model.name = "unet"
  config.data.name = "decathlon"
  config.data.manual_dir = str(root / "raw")
  config.data.data_dir = str(root / "data")
  config.data.size = 16
  config.data.num_classes = 3
  config.data.trusted_list = "all"
  config.data.noise.kind = "none"
  config.train.num_epochs = 1
  config.train.warmup_epochs = 0
  config.train.diagnostics_every_steps = 0
  config.train.num_panel_images = 1
  config.audit.epochs = 0
  results = train.train_and_evaluate(config, str(root / "run"))
  return root, labels, affine, results


def _dice(p, t):
  s = p.sum() + t.sum()
  return 1.0 if s == 0 else 2.0 * (p & t).sum() / s


def test_a_decathlon_folder_with_three_classes_reports_per_class_dice(volume_run):
  root, labels, affine, results = volume_run
  assert results["class_names"] == list(folders.CLASSES) and results["reference"] == "trusted"
  model = model_lib.load_model(root / "run")
  truth = labels["vol_004"]
  x, y, z = folders.ZOOMS
  for variant in ("raw", "ema"):
    # metadcseg-predict's path: the file in, a mask of the file's (X, Y, Z) shape out.
    mask = model.predict(root / "raw" / "imagesTr" / "vol_004.nii.gz", variant=variant)
    assert mask.shape == truth.shape
    scores = results["test_original"][variant]
    for c, name in enumerate(folders.CLASSES[1:], start=1):
      hand = _dice(mask == c, truth == c)
      assert scores["per_class"][name]["dice"] == pytest.approx(hand, abs=1e-9)
    hand = np.mean([_dice(mask == c, truth == c) for c in (1, 2)])
    assert scores["dice"] == pytest.approx(hand, abs=1e-9)
    # Distances in mm of the file's own voxels, (slice, row, col) = (Z, Y, X) spacing.
    ref = metrics.case_metrics(
      mask.transpose(2, 1, 0), truth.transpose(2, 1, 0), num_classes=3, spacing=(z, y, x)
    )
    assert scores["hd95"] == pytest.approx(ref["hd95"], abs=1e-9)
    # At the network's 16 x 16, the mean over the foreground classes of the per-class scores.
    test = results["test"][variant]
    assert test["dice"] == pytest.approx(np.mean([v["dice"] for v in test["per_class"].values()]))


def test_the_networks_input_is_the_same_in_training_and_prediction(volume_run):
  root, *_ = volume_run
  run = runs.open_run(root / "run")
  model = model_lib.load_model(root / "run")
  records = run.splits.test
  trained_on = np.stack([records[i]["image"] for i in range(len(records))])
  item = io.read_input(root / "raw" / "imagesTr" / "vol_004.nii.gz", model.preprocessing)
  np.testing.assert_array_equal(item.x, trained_on)


def test_a_volume_run_records_its_spacing_and_trusted_cases(volume_run):
  root, *_ = volume_run
  info = json.loads((root / "run" / runs.DATA_INFO).read_text())
  # (slice, row, col) of the network's 16 x 16 slices: rows 12 -> 16, columns 16 -> 16.
  x, y, z = folders.ZOOMS
  assert info["spacing"]["vol_004"] == pytest.approx([z, y * 12 / 16, x])
  assert info["split"]["trusted_source"] == "all" and info["split"]["n_trusted"] == 5
  assert info["class_names"] == list(folders.CLASSES)


def _decathlon_config(root, data_dir, **data):
  config = tiny.get_config()
  config.method = "ce"
  config.data.name = "decathlon"
  config.data.manual_dir = str(root)
  config.data.data_dir = str(data_dir)
  config.data.size = 16
  config.data.num_classes = 3
  config.data.noise.kind = "none"
  config.data.update(data)
  return config


def test_nnunet_layout_with_trusted_volumes_and_one_modality(tmp_path):
  """nnU-Net v2's layout: channel files, {"name": value} labels; the second channel chosen by
  name; trusted/ label volumes replace labelsTr/ for their cases, and only they are scored."""
  labels, _ = folders.write_decathlon(tmp_path / "raw", n=6, v2=True, trusted=(0, 1, 2, 3))
  options = ml_collections.ConfigDict({"modality": "T2", "train_slices": None, "mask_suffix": ""})
  config = _decathlon_config(
    tmp_path / "raw",
    tmp_path / "data",
    options=options,
    trusted_split=ml_collections.ConfigDict({"meta": 0.25, "val": 0.25, "test": 0.5}),
  )
  data = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path)
  trusted = {f"vol_{i:03d}" for i in range(4)}
  assert data.info["split"]["trusted_source"] == "trusted/ folder"
  assert data.info["modalities"] == [1] and data.info["channel_files"] is True
  for part in (data.meta, data.val, data.test):
    by_case = {}
    for i in range(len(part)):
      by_case.setdefault(part.case_id(i), []).append(part[i]["label"])
    assert set(by_case) <= trusted
    for case, slices in by_case.items():
      # The verified volume (with its core class), not labelsTr/'s (core dropped).
      assert {2} <= set(np.unique(np.stack(slices)))
  # labelsTr/ of the trusted cases dropped the core: how far they were off, measured.
  assert data.info["given_vs_trusted"]["n"] == 4
  assert data.info["given_vs_trusted"]["one_minus_dice_mean"] == 0.0  # foreground unchanged
  assert data.info["class_names"] == list(folders.CLASSES)


def test_an_empty_trusted_folder_of_volumes_is_an_error(tmp_path):
  folders.write_decathlon(tmp_path / "raw", n=4)
  (tmp_path / "raw" / "trusted").mkdir()
  (tmp_path / "raw" / "trusted" / "notes.txt").write_text("to do")
  config = _decathlon_config(tmp_path / "raw", tmp_path / "data")
  with pytest.raises(DataError, match="trusted/ holds no mask"):
    pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path)


@pytest.mark.parametrize("folder", ["labelsTr", "trusted"])
def test_a_mask_of_another_voxel_size_names_both_files(tmp_path, folder):
  nib = pytest.importorskip("nibabel")
  folders.write_decathlon(tmp_path / "raw", n=6, trusted=(0, 1, 2, 3))
  path = tmp_path / "raw" / folder / "vol_001.nii.gz"
  mask = nib.load(str(path))
  affine = mask.affine.copy()
  affine[2, 2] *= 2.0  # the right shape, resampled to twice the slice distance
  nib.save(nib.Nifti1Image(np.asarray(mask.dataobj), affine), path)
  config = _decathlon_config(tmp_path / "raw", tmp_path / "data")
  with pytest.raises(DataError, match=r"voxel size mismatch: image .*vol_001.* mask .*vol_001"):
    pipeline.prepare_data(config.data, meta_batch_size=1, workdir=tmp_path)
