"""Using a trained model: predict in the input's geometry, export, evaluate, and the saved
weights reproduce results.json."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import nibabel as nib
import numpy as np
from PIL import Image
import pytest

from experiments.configs import tiny
from metadcseg_jax import methods
from metadcseg_jax import metrics
from metadcseg_jax.data import pipeline
from metadcseg_jax.data import preprocess
from metadcseg_jax.data import readers
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.inference import evaluate_folder
from metadcseg_jax.inference import export
from metadcseg_jax.inference import model as model_lib
from metadcseg_jax.inference import original_size
from metadcseg_jax.inference import predict
from metadcseg_jax.training import runs
from metadcseg_jax.training import train
from tests import folders

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
  """CE for one epoch on a folder of 32 px PNGs, 12 of 24 masks verified in trusted/."""
  root = tmp_path_factory.mktemp("folder_run")
  folders.write_folder(root / "raw", n=24, trusted=tuple(range(0, 24, 2)))
  config = folders.folder_config(root / "raw", root / "data")
  config.model.name = "unet"
  config.train.num_epochs = 1
  config.train.warmup_epochs = 0
  config.train.diagnostics_every_steps = 0
  config.train.num_panel_images = 1
  config.audit.epochs = 0
  # Recomputed statistics for the EMA weights: what the saved model must then carry.
  config.train.ema_batch_stats = "recompute"
  results = train.train_and_evaluate(config, str(root / "run"))
  return root, config, results


def test_the_runs_own_model_reproduces_its_ema_scores(folder_run):
  root, _, results = folder_run
  assert results["ema_batch_stats"] == "recompute"
  run = runs.open_run(root / "run")
  model = model_lib.load_model(root / "run")
  test = run.splits.test
  x = np.stack([test[i]["image"] for i in range(len(test))])
  y = np.stack([test[i]["label"] for i in range(len(test))])
  for variant in ("raw", "ema"):
    pred = model.probabilities(x, variant=variant).argmax(-1)
    again = metrics.summarize(metrics.batch_case_metrics(pred, y))
    assert again["dice"] == pytest.approx(results["test"][variant]["dice"], abs=1e-12), variant


def _test_cases(results, root):
  return json.loads((root / "run" / train.CASES_FILE).read_text())["test"]["raw"]["case_ids"]


def test_results_record_the_trusted_reference_and_the_split(folder_run):
  root, _, results = folder_run
  assert results["reference"] == "trusted" and results["reference_trusted"] is True
  assert results["noise_injected"] is False and results["noise"]["kind"] == "none"
  assert set(_test_cases(results, root)) <= set(results["split"]["trusted"])
  assert results["split"]["trusted_source"] == "trusted/ folder"
  # The images are at the training size: at their own size the scores are the same.
  for variant in ("raw", "ema"):
    assert results["test_original"][variant]["dice"] == pytest.approx(
      results["test"][variant]["dice"], abs=1e-12
    )


def test_predict_then_evaluate_give_the_results_test_scores(folder_run, tmp_path):
  root, _, results = folder_run
  cases = _test_cases(results, root)
  inputs = [str(root / "raw" / "images" / f"{c}.png") for c in cases]
  ref = tmp_path / "ref"
  ref.mkdir()
  for c in cases:  # the test split is scored against the verified masks
    shutil.copy(root / "raw" / "trusted" / f"{c}.png", ref / f"{c}.png")
  model = model_lib.load_model(root / "run")
  for variant in ("raw", "ema"):
    out = tmp_path / variant
    written = predict.predict_paths(model, inputs, out, variant=variant, echo=lambda _: None)
    assert len(written.written) == len(cases) and not written.failures
    scored = evaluate_folder.summary(evaluate_folder.evaluate_folder(out, ref))
    for key in ("dice", "iou", "hd95", "asd"):
      assert scored["foreground_mean"][key]["mean"] == pytest.approx(
        results["test"][variant][key], abs=1e-6
      ), (variant, key)


def test_the_export_travels_without_the_training_data(folder_run, tmp_path):
  root, _, _ = folder_run
  images = tmp_path / "images"
  shutil.copytree(root / "raw" / "images", images)
  exported = export.export(root / "run", tmp_path / "model")
  with pytest.raises(ConfigError, match="holds a model already"):
    export.export(root / "run", tmp_path / "model")
  from_run = model_lib.load_model(root / "run")
  masks = {p.name: from_run.predict(p) for p in sorted(images.glob("*.png"))[:6]}
  moved = tmp_path / "elsewhere"
  shutil.move(root / "raw", moved)  # the training data is gone from where the run saw it
  try:
    model = model_lib.load_model(exported)
    for name, mask in masks.items():
      np.testing.assert_array_equal(model.predict(images / name), mask)
  finally:
    shutil.move(moved, root / "raw")


@pytest.mark.parametrize("choice", ["ema", "recompute", "best_val"])
def test_saved_weights_reproduce_the_ema_scores_under_every_choice(folder_run, tmp_path, choice):
  root, _, results = folder_run
  run = runs.open_run(root / "run")
  ckpt = run.checkpointer()
  state = run.restore(ckpt)
  ckpt.close()
  cfg = run.config.copy_and_resolve_references()
  cfg.train.ema_batch_stats = choice
  compiled = train.compiled_for(cfg, run.steps_per_epoch)
  scores, _, chosen = train._final_evaluation(compiled, state, run.splits, cfg)
  if choice == results["ema_batch_stats"] or choice == "best_val":
    assert scores["test"]["ema"]["dice"] == pytest.approx(results["test"]["ema"]["dice"])
  model_lib.save(
    tmp_path / choice,
    config=cfg,
    state=chosen,
    pre=model_lib.preprocessing(cfg, run.splits.info),
    ema_batch_stats=scores["ema_batch_stats"],
  )
  model = model_lib.load_model(tmp_path / choice)
  test = run.splits.test
  x = np.stack([test[i]["image"] for i in range(len(test))])
  y = np.stack([test[i]["label"] for i in range(len(test))])
  pred = model.probabilities(x, variant="ema").argmax(-1)
  again = metrics.summarize(metrics.batch_case_metrics(pred, y))
  assert again["dice"] == pytest.approx(scores["test"]["ema"]["dice"], abs=1e-12)
  assert again["hd95"] == pytest.approx(scores["test"]["ema"]["hd95"], abs=1e-12)


# ------------------------------------------------------------------ geometry, without training


@pytest.fixture(scope="module")
def untrained():
  """Models with initial weights (shapes and geometry need no training): a 2D grey one and a
  volume one, both U-Net width 4 at 16 px."""
  out = {}
  for kind, name in (("image", "folder"), ("volume", "decathlon")):
    config = tiny.get_config()
    config.method = "ce"
    config.model.name = "unet"
    config.data.size = 16
    config.data.name = name
    config.data.num_classes = 3 if kind == "volume" else 2
    method = methods.create(config, steps_per_epoch=1)
    state = jax.device_get(method.init_state(jax.random.PRNGKey(0)))
    pre = preprocess.for_data(config.data)
    out[kind] = model_lib.Model(config, method, state, pre, {"default_variant": "ema"})
  return out


def test_pngs_of_three_sizes_come_back_at_their_size_and_a_bad_file_is_one_line(
  untrained, tmp_path
):
  src = tmp_path / "in"
  src.mkdir()
  sizes = {"a": (16, 16), "b": (37, 20), "c": (9, 50)}
  rng = np.random.default_rng(0)
  for stem, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(src / f"{stem}.png")
  (src / "broken.png").write_bytes(b"\x89PNG not really")
  lines = []
  result = predict.predict_paths(
    untrained["image"], [str(src)], tmp_path / "out", probabilities=True, echo=lines.append
  )
  assert [f for f, _ in result.failures] == [str(src / "broken.png")]
  assert [l for l in lines if l.startswith("error:")] == [
    next(l for l in lines if "broken.png" in l)
  ]
  for stem, shape in sizes.items():
    mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
    probs = np.load(tmp_path / "out" / f"{stem}_probabilities.npy")
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
    assert probs.shape == shape + (2,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(mask, np.where(probs.argmax(-1) == 1, 255, 0))
  with pytest.raises(ConfigError, match="outputs exist.*--overwrite"):
    predict.predict_paths(untrained["image"], [str(src)], tmp_path / "out", echo=lines.append)


def test_a_nifti_volume_comes_back_with_its_shape_and_affine(untrained, tmp_path):
  affine = np.array(
    [[0.0, -0.7, 0.0, 12.0], [0.9, 0.0, 0.0, -3.0], [0.0, 0.0, 3.0, 40.0], [0, 0, 0, 1]]
  )
  volume = np.random.default_rng(1).normal(size=(20, 24, 5)).astype(np.float32)
  nib.save(nib.Nifti1Image(volume, affine), tmp_path / "scan.nii.gz")
  result = predict.predict_paths(
    untrained["volume"],
    [str(tmp_path / "scan.nii.gz")],
    tmp_path / "out",
    probabilities=True,
    echo=lambda _: None,
  )
  assert not result.failures
  mask = nib.load(tmp_path / "out" / "scan.nii.gz")
  probs = nib.load(tmp_path / "out" / "scan_probabilities.nii.gz")
  assert mask.shape == volume.shape and probs.shape == volume.shape + (3,)
  np.testing.assert_allclose(mask.affine, affine)
  np.testing.assert_allclose(probs.affine, affine)
  np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-5)
  data = np.asarray(mask.dataobj)
  np.testing.assert_array_equal(data, np.asarray(probs.dataobj).argmax(-1))
  # Slice by slice along the last axis: the same as the Python call on the array.
  np.testing.assert_array_equal(untrained["volume"].predict(volume), data)
  # A 2D model refuses the volume in one line, naming it.
  lines = []
  with pytest.raises(ConfigError, match="no input"):
    predict.predict_paths(untrained["image"], [str(tmp_path / "nothing*")], tmp_path / "o2")
  bad = predict.predict_paths(
    untrained["image"], [str(tmp_path / "scan.nii.gz")], tmp_path / "o3", echo=lines.append
  )
  assert len(bad.failures) == 1 and "segments 2D images" in lines[0]


def test_the_predict_command_writes_the_rest_and_exits_1_on_a_bad_file(folder_run, tmp_path):
  root, _, _ = folder_run
  src = tmp_path / "in"
  src.mkdir()
  shutil.copy(root / "raw" / "images" / "case00.png", src / "good.png")
  (src / "bad.jpg").write_text("no image")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "metadcseg_jax.commands.predict",
      f"--model={root / 'run'}",
      f"--input={src}",
      f"--output={tmp_path / 'out'}",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert out.returncode == 1, out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "bad.jpg" in errors[0]
  assert (tmp_path / "out" / "good.png").is_file() and "wrote 1 masks" in out.stdout


def test_channel_files_of_a_case_give_one_mask_of_the_models_modality(tmp_path):
  """nnU-Net's channel files: a case's `_0000`, `_0001` are one input; a model of the second
  channel alone reads that one (the output named by the case), and a case without it is one
  line."""
  labels, affine = folders.write_decathlon(tmp_path / "raw", n=2, v2=True)
  config = tiny.get_config()
  config.method = "ce"
  config.model.name = "unet"
  config.data.size = 16
  config.data.name = "decathlon"
  config.data.num_classes = 3
  method = methods.create(config, steps_per_epoch=1)
  state = jax.device_get(method.init_state(jax.random.PRNGKey(0)))
  pre = preprocess.for_data(config.data, modalities=(1,), channel_files=True)
  model = model_lib.Model(config, method, state, pre, {"default_variant": "ema"})
  (tmp_path / "raw" / "imagesTr" / "vol_001_0001.nii.gz").unlink()
  lines = []
  result = predict.predict_paths(
    model, [str(tmp_path / "raw" / "imagesTr")], tmp_path / "out", echo=lines.append
  )
  assert [p.name for p in result.written] == ["vol_000.nii.gz"]
  assert len(result.failures) == 1 and "vol_001" in result.failures[0][1]
  out = nib.load(tmp_path / "out" / "vol_000.nii.gz")
  assert out.shape == labels["vol_000"].shape
  np.testing.assert_allclose(out.affine, affine)
  # The mask is the one of the second channel's file alone.
  alone = model.predict([tmp_path / "raw" / "imagesTr" / "vol_000_0001.nii.gz"])
  np.testing.assert_array_equal(np.asarray(out.dataobj), alone)


def test_the_predictions_never_replace_or_join_the_inputs(untrained, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  Image.fromarray(np.zeros((20, 20), np.uint8)).save(src / "a.png")
  with pytest.raises(ConfigError, match="is an input folder"):
    predict.predict_paths(untrained["image"], [str(src)], src, overwrite=True)
  assert np.asarray(Image.open(src / "a.png")).shape == (20, 20)


class _Thresholds:
  """A stand-in model whose foreground probability is the input's first channel (its own
  preprocessing, the folder run's): the geometry of the original-size path, without training."""

  def __init__(self, pre):
    self.preprocessing = pre

  def probabilities(self, x, *, variant):
    del variant
    p = 1.0 / (1.0 + np.exp(-(x[..., 0] - 0.4) * 20.0))
    return np.stack([1.0 - p, p], axis=-1).astype(np.float32)


def test_original_size_scores_map_predictions_back_to_each_images_size(tmp_path):
  sizes = {i: ((40, 48) if i % 2 else (24, 36)) for i in range(12)}
  truth = folders.write_folder(tmp_path / "raw", n=12, trusted=tuple(range(12)), sizes=sizes)
  config = folders.folder_config(
    tmp_path / "raw",
    tmp_path / "data",
    trusted_split=ml_collections.ConfigDict({"meta": 0.2, "val": 0.2, "test": 0.4}),
  )
  data = pipeline.prepare_data(config.data, meta_batch_size=2, workdir=tmp_path)
  stand_in = _Thresholds(model_lib.preprocessing(config, data.info))
  ids, cases = original_size.score_split(stand_in, data.test, data.info, config.data, variant="ema")
  assert ids == [data.test.case_id(i) for i in range(len(data.test))]
  for case_id, case in zip(ids, cases):
    image, _ = readers.read_image(tmp_path / "raw" / "images" / f"{case_id}.png", channels=1)
    probs = stand_in.probabilities(stand_in.preprocessing.image_input(image)[None], variant="")
    pred = stand_in.preprocessing.restore(probs, image.shape[:2])[0].argmax(-1)
    assert pred.shape == truth[case_id][0].shape  # the image's own size, not 32 x 32
    ref = metrics.case_metrics(pred, truth[case_id][0])  # the verified mask, at its size
    assert case["dice"] == pytest.approx(ref["dice"]) and case["hd95"] == pytest.approx(ref["hd95"])


def test_a_run_folder_without_a_model_says_how_to_export(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(Exception, match="metadcseg-export --workdir="):
    model_lib.load_model(tmp_path)
