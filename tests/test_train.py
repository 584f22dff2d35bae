"""The trainer end to end on the tiny config: outputs, resume after a kill or a stop signal,
step checkpoints, NaN stop, CLI."""

import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import types

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import pytest

from experiments import audit_select
from experiments.configs import tiny
from metadcseg_jax import check_settings
from metadcseg_jax import configs
from metadcseg_jax.audit import report as audit_report
from metadcseg_jax.audit import scores as audit_scores
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.errors import Preempted
from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import checkpoint
from metadcseg_jax.training import evaluate
from metadcseg_jax.training import runs
from metadcseg_jax.training import train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path_factory.mktemp("data"))
  return config


@pytest.fixture(scope="module")
def full_run(tiny_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  done = []  # what each epoch had left behind when `after_epoch` was called
  after = lambda epoch: done.append(
    (
      epoch,
      sorted(p.name for p in (workdir / "audit").glob("*.npz")),
      _lines(workdir / "metrics.jsonl"),
    )
  )
  results = train.train_and_evaluate(tiny_config, str(workdir), after_epoch=after)
  return workdir, results, done


def test_audit_ranks_the_runs_training_masks(full_run, tiny_config, tmp_path):
  workdir, *_ = full_run
  # The meta method scored every training mask in its last config.audit.epochs (2) epochs.
  assert sorted(p.name for p in (workdir / "audit").iterdir()) == [
    "epoch_0001.npz",
    "epoch_0002.npz",
  ]
  r = audit_report.report(workdir, out=tmp_path, top=3)
  rows = list(csv.DictReader((tmp_path / "audit.csv").open()))
  n_train = tiny_config.data.n_train - 2  # the meta split holds 2
  assert r["epochs"] == [1, 2] and len(rows) == n_train
  assert [int(row["rank"]) for row in rows] == list(range(1, n_train + 1))
  scores = [float(row["score"]) for row in rows]
  assert scores == sorted(scores, reverse=True)
  assert sorted(int(row["index"]) for row in rows) == sorted(set(int(row["index"]) for row in rows))
  assert all(0.0 <= float(row["corruption"]) <= 1.0 for row in rows)  # injected noise: known
  assert np.load(tmp_path / "suspicion.npy").shape == (n_train, 32, 32)
  assert (tmp_path / "gallery.png").stat().st_size > 1000
  assert (tmp_path / "roc.png").stat().st_size > 1000  # injected noise: the ROC curves
  measured = json.loads((tmp_path / "measured.json").read_text())
  for name in (
    "meta suspicion",
    "disagreement 1 - Dice(y, model)",
    "soft disagreement 1 - soft Dice(y, model)",
  ):
    assert set(measured[name]) == {"image_auroc", "image_ap", "spearman", "pixel_ap"}
  # The score selection reads the same run: its meta suspicion is the CSV's ranking measure.
  by_name, meta_images = audit_select.measure_run(workdir)
  assert meta_images == 0 and len(by_name) == 6
  assert by_name["meta suspicion"][1] == pytest.approx(
    measured["meta suspicion"]["image_auroc"]["0.3"], nan_ok=True
  )


def test_audit_of_a_users_masks_ranks_the_untrusted_ones_only(full_run, tmp_path):
  """Without injected noise nothing is known to be wrong: the CSV and the gallery, saying so;
  the trusted training masks are left out of the ranking."""
  workdir, *_ = full_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints"))
  config = json.loads((copy / "config.json").read_text())
  config["data"]["noise"]["kind"] = "none"  # the masks as a user gave them
  (copy / "config.json").write_text(json.dumps(config))
  info = json.loads((copy / runs.DATA_INFO).read_text())
  train_split = runs.open_run(copy).splits.train
  trusted = [train_split.case_id(i) for i in (0, 3, 5)]
  info["split"] = {"trusted": trusted}
  (copy / runs.DATA_INFO).write_text(json.dumps(info))
  r = audit_report.report(copy, out=tmp_path / "audit", top=2)
  rows = list(csv.DictReader((tmp_path / "audit" / "audit.csv").open()))
  assert r["n_trusted_left_out"] == 3 and len(rows) == len(train_split) - 3
  assert not {row["case_id"] for row in rows} & set(trusted)
  assert "corruption" not in rows[0] and not (tmp_path / "audit" / "measured.json").exists()
  lines = audit_report.summary_lines(r)
  assert any("3 training masks are trusted" in l for l in lines)
  assert any("no noise was injected" in l for l in lines)


def test_audit_recomputed_from_checkpoints_matches_the_trainers(full_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(full_run[0], run)
  trained = {e: dict(np.load(run / "audit" / f"epoch_{e:04d}.npz")) for e in (1, 2)}
  assert audit_report.recompute(run, meta_images=0) == [1, 2]  # the kept checkpoints
  for e, before in trained.items():
    after = dict(np.load(run / "audit" / f"epoch_{e:04d}.npz"))
    np.testing.assert_array_equal(after["index"], before["index"])
    np.testing.assert_array_equal(after["pseudo"], before["pseudo"])
    np.testing.assert_allclose(
      after["suspicion"].astype(np.float32), before["suspicion"].astype(np.float32), atol=2e-3
    )
  # Nothing written before is lost: the trainer's passes are kept aside.
  (aside,) = (run / "audit").glob("replaced-*")
  assert sorted(p.name for p in aside.iterdir()) == ["epoch_0001.npz", "epoch_0002.npz"]
  # Those passes take the meta batch's part once per meta batch
  # (`audit_passes.Functions.direction`); the meta step as the training step takes it, whole for
  # every batch, gives the same maps.
  opened = runs.open_run(run)
  compiled = train.compiled_for(opened.config, opened.steps_per_epoch)
  assert compiled.audit.direction is not None
  ckpt = opened.checkpointer()
  try:
    state = opened.restore(ckpt, 2)
  finally:
    ckpt.close()
  whole = audit_passes.run_pass(
    compiled.method,
    state,
    opened.splits,
    opened.config,
    fns=audit_passes.Functions(compiled.audit.maps),
  )
  shared = dict(np.load(run / "audit" / "epoch_0002.npz"))
  np.testing.assert_array_equal(whole["pseudo"], shared["pseudo"])
  assert np.mean(shared["suspicion"] > 0) > 0.01
  np.testing.assert_allclose(
    whole["suspicion"].astype(np.float32), shared["suspicion"].astype(np.float32), atol=2e-3
  )
  np.testing.assert_allclose(whole["score"], shared["score"], rtol=1e-3, atol=1e-5)


def test_open_run_restores_the_trainers_final_state(full_run, tiny_config):
  workdir, results, _ = full_run
  run = runs.open_run(workdir)  # from config.json, as the audit and the checks open it
  assert run.steps_per_epoch == (tiny_config.data.n_train - 2) // tiny_config.train.batch_size
  assert run.data_settings == results["settings_from_data"]
  assert len(run.splits.test) == tiny_config.data.n_test
  ckpt = run.checkpointer()
  try:
    state = run.restore(ckpt)  # the newest epoch checkpoint
  finally:
    ckpt.close()
  assert int(state.step) // run.steps_per_epoch == results["epoch"] == 2
  # The final evaluation's scores come back from the restored parameters.
  predictor = train.compiled_for(run.config, run.steps_per_epoch).predictor
  scores = evaluate.evaluate(
    predictor,
    state,
    run.splits.test,
    batch_size=tiny_config.train.eval_batch_size,
    num_classes=tiny_config.data.num_classes,
  )
  # (`evaluate` scores the EMA weights with the EMA of the statistics, one of the two kept.)
  for variant, kept in (("raw", results["test"]["raw"]), ("ema", results["test"]["ema_bn"]["ema"])):
    assert scores[variant]["dice"] == pytest.approx(kept["dice"], abs=1e-6)


def test_open_run_refuses_a_folder_that_is_no_run(tmp_path):
  with pytest.raises(WorkdirError, match="not a metadcseg-train run folder"):
    runs.open_run(tmp_path)


class _Checkpoints:
  """What the NaN policy reads of a `checkpoint.Checkpointer`."""

  def __init__(self, epoch, step):
    self.directory = pathlib.Path("/runs/r/checkpoints")
    self.steps_dir = self.directory / "steps"
    self.steps_per_epoch = 5
    self.epoch, self.step = epoch, step

  def latest_epoch(self):
    return self.epoch

  def latest_step_checkpoint(self):
    return self.step


def test_nan_policy_names_the_first_bad_step_and_the_last_good_checkpoint():
  losses = np.array([0.9, 0.8, np.nan, np.inf])
  train.check_finite(losses[:2], 10, 2, _Checkpoints(2, None))  # finite: nothing happens
  with pytest.raises(NonFiniteLossError, match=r"at step 12 \(epoch 3\).*\(epoch 2\) is kept in "):
    train.check_finite(losses, 10, 2, _Checkpoints(2, None))
  # A step checkpoint newer than the last epoch checkpoint is the one named.
  with pytest.raises(NonFiniteLossError, match=r"\(step 12\) is kept in /runs/r/checkpoints/steps"):
    train.check_finite(losses, 10, 2, _Checkpoints(2, 12))
  with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
    train.check_finite(losses, 0, 0, _Checkpoints(None, None))


class _Audited:
  """A method with meta-weights, as the audit hook sees it: its jitted `audit` function here
  marks every pixel where the given label is foreground as half suspicious."""

  audits = True
  example_transform = None

  @staticmethod
  def audit(state, feed):
    del state
    y = feed["noisy_label"]
    return {"suspicion": np.where(y > 0, 0.5, 0.0), "pseudo": np.zeros_like(y)}


def test_audit_hook_writes_a_pass_in_the_last_epochs_only(tiny_config, tmp_path):
  config = ml_collections.ConfigDict(tiny_config.to_dict())
  config.audit.epochs = 1
  run = runs.prepare(config, tmp_path)
  compiled = types.SimpleNamespace(method=_Audited, audit=audit_passes.Functions(_Audited.audit))
  assert train.audit_hook(compiled, None, run, 1) is None  # before the last epoch
  assert not (tmp_path / "audit").exists()
  path = train.audit_hook(compiled, None, run, 2)
  assert path == tmp_path / "audit" / "epoch_0002.npz"
  scores = audit_scores.load(tmp_path)
  assert sorted(scores["index"]) == sorted(int(i) for i in run.splits.train.indices)
  assert scores["epochs"] == [2] and np.all(scores["score"] >= 0.0)
  # A method without meta-weights, or the settings of a run older than the audit (read back
  # from its folder, `configs.upgrade`): no pass.
  plain = types.SimpleNamespace(method=types.SimpleNamespace(audits=False), audit=None)
  assert train.audit_hook(plain, None, run, 2) is None
  older = config.to_dict()
  del older["audit"]
  assert not audit_passes.is_due(_Audited, ml_collections.ConfigDict(configs.upgrade(older)), 2)


def _lines(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def test_after_epoch_comes_once_each_epoch_is_done(full_run, tiny_config):
  _, _, done = full_run
  assert [epoch for epoch, _, _ in done] == [1, 2]
  for epoch, audits, lines in done:
    # That epoch's line, its validation (every epoch here) and its audit pass were written.
    assert [l["epoch"] for l in lines if l["split"] == "train"][-1] == epoch
    assert [l["epoch"] for l in lines if l["split"] == "val"][-1] == epoch
    assert audits[-1] == f"epoch_{epoch:04d}.npz"
    assert not [l for l in lines if l["split"] == "test"]  # before the final evaluation


def test_run_writes_metrics_results_panel_and_checkpoints(full_run, tiny_config):
  workdir, results, _ = full_run
  assert (workdir / "results.json").exists() and (workdir / "panel.png").stat().st_size > 1000
  assert (workdir / "dcd.png").stat().st_size > 1000  # the paper's Fig. 3 picture
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["test"]["ema"]["dice"] == pytest.approx(results["test"]["ema"]["dice"])
  lines = _lines(workdir / "metrics.jsonl")
  train_lines = [l for l in lines if l["split"] == "train"]
  val_lines = [l for l in lines if l["split"] == "val"]
  # The test split is read once, at the end: never in the log.
  assert not [l for l in lines if l["split"] == "test"]
  assert [l["epoch"] for l in train_lines] == [1, 2]
  assert {l["params"] for l in val_lines} == {"raw", "ema"}
  assert results["val"]["ema"]["n_cases"] == tiny_config.data.n_val
  # Diagnostics every 3 steps (tiny config): gradient norm per loss term, cosine, DCD support.
  diag = [l for l in lines if l["split"] == "diagnostics"]
  assert [l["step"] for l in diag] == [0, 3, 6, 9]
  for key in (
    "grad_norm_ce_term",
    "grad_norm_bd_term",
    "grad_norm_dice_term",
    "cos_total_ce",
    "alpha_share_disagree",
    "weight_zero_frac",
    "effective_pixel_frac",
    "feature_norm",
  ):
    assert np.isfinite(diag[-1][key]), key
  assert 0.0 <= diag[-1]["effective_pixel_frac"] <= 1.0
  assert -1.0 <= diag[-1]["cos_total_ce"] <= 1.0 and diag[-1]["dcd_support"] >= 1.0
  for l in train_lines:
    assert np.isfinite(l["loss"]) and l["images_per_s"] > 0 and l["lr"] > 0
  # The second epoch is past warm-up: the meta step ran and logged its measurements.
  assert "meta_loss" in train_lines[1] and "meta_loss" not in train_lines[0]
  assert "bd_term" in train_lines[1]
  for k in ("dice", "iou", "miou", "hd95", "asd", "n_cases"):
    assert k in results["test"]["ema"]
  assert results["test"]["ema"]["n_cases"] == tiny_config.data.n_test
  # The EMA weights scored with both choices of BatchNorm statistics, "ema" the one chosen by
  # the configured rule (on validation only); every case's scores kept for paired statistics.
  chosen = results["ema_batch_stats"]
  rule = tiny_config.train.ema_batch_stats
  assert chosen == train.chosen_ema_stats(results["val"]["ema_bn"], rule)
  for split in ("val", "test"):
    assert results[split]["ema"] == results[split]["ema_bn"][chosen]
  cases = json.loads((workdir / train.CASES_FILE).read_text())
  for split in ("val", "test"):
    for params in ("raw", "ema"):
      dice = cases[split][params]["dice"]
      assert len(dice) == len(cases[split][params]["case_ids"]) == results[split]["raw"]["n_cases"]
      assert np.mean(dice) == pytest.approx(results[split][params]["dice"])
    for bn in train.EMA_BATCH_STATS:
      want = results[split]["ema_bn"][bn]["dice"]
      assert np.mean(cases[split]["ema_bn"][bn]["dice"]) == pytest.approx(want)
  ckpts = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert ckpts == ["1", "2"]
  history = _lines(workdir / "config_history.jsonl")
  assert len(history) == 1 and history[0]["config"]["method"] == "metadcseg"
  info = json.loads((workdir / "data_info.json").read_text())
  assert info["n_meta"] == 2 and info["noise"]["kind"] == "l2b40"


class _Crash(RuntimeError):
  pass


def _crash_after_saving(monkeypatch):
  """Makes every checkpoint save end the run (a kill right after it); returns the real save."""
  original = checkpoint.Checkpointer.save

  def save_then_crash(self, epoch, state, data_state):
    original(self, epoch, state, data_state)
    self.manager.wait_until_finished()
    raise _Crash(f"killed after epoch {epoch}")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_crash)
  return original


def test_killed_run_resumes_to_identical_metrics(full_run, tiny_config, tmp_path, monkeypatch):
  _, want, _ = full_run
  original = _crash_after_saving(monkeypatch)
  with pytest.raises(_Crash):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert [l["epoch"] for l in _lines(tmp_path / "metrics.jsonl") if l["split"] == "train"] == [1]
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"epoch": 2, "split": "tr')  # a kill in the middle of writing a line
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
  got = train.train_and_evaluate(tiny_config, str(tmp_path))
  for params in ("raw", "ema"):
    for split in ("val", "test"):
      for k, v in want[split][params].items():
        np.testing.assert_allclose(got[split][params][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  assert [l["epoch"] for l in _lines(tmp_path / "metrics.jsonl") if l["split"] == "train"] == [1, 2]


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(
  tiny_config, tmp_path, monkeypatch
):
  original = pipeline.train_dataset
  calls = {"n": 0}

  class Poisoned:
    """Wraps the training iterator; batch number 7 (epoch 2) carries a NaN image."""

    def __init__(self, it):
      self.it, self.n = it, 0

    def __next__(self):
      batch = dict(next(self.it))
      if self.n == 7:
        batch["image"] = np.full_like(batch["image"], np.nan)
      self.n += 1
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, s):
      self.it.set_state(s)

  class PoisonedDataset:
    def __init__(self, ds):
      self.ds = ds

    def __iter__(self):
      return Poisoned(iter(self.ds))

  def poisoned(records, **kw):
    calls["n"] += 1
    ds = original(records, **kw)
    return PoisonedDataset(ds) if calls["n"] == 1 else ds  # the first is the training stream

  monkeypatch.setattr(pipeline, "train_dataset", poisoned)
  steps_per_epoch = (tiny_config.data.n_train - 2) // tiny_config.train.batch_size
  assert steps_per_epoch < 7 < 2 * steps_per_epoch
  with pytest.raises(NonFiniteLossError, match=r"step 7 \(epoch 2\).*epoch 1"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


@pytest.mark.skipif(
  os.environ.get("METADCSEG_SLOW") != "1",
  reason="tests/test_reference_steps.py checks these steps against float64 references in CI; "
  "this U-Net++ step of each meta method runs with METADCSEG_SLOW=1",
)
def test_one_step_of_each_meta_method_is_finite_and_moves_params(tiny_config):
  config = ml_collections.ConfigDict(tiny_config.to_dict())
  rng = np.random.default_rng(0)
  size = config.data.size
  label = (np.add.outer(np.arange(size), np.arange(size)) % 17 < 7).astype(np.int32)
  batch = {
    "image": jnp.asarray(rng.standard_normal((4, size, size, 1)), jnp.float32),
    "noisy_label": jnp.asarray(np.stack([label] * 4)),
    "meta_image": jnp.asarray(rng.standard_normal((2, size, size, 1)), jnp.float32),
    "meta_label": jnp.asarray(np.stack([label] * 2)),
  }
  for method in ("l2b", "metadcseg"):
    config.method = method
    compiled = train.compiled_for(config, 5)
    step = compiled.step("main")
    if compiled.method.example_transform is not None:  # MetaDCSeg's Canny edges
      images = np.asarray(batch["image"])
      batch["edges"] = np.stack(
        [compiled.method.example_transform({"image": im})["edges"] for im in images]
      )
    state = compiled.method.init_state(jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, state.params)
    new_state, m = step(state, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert np.isfinite(float(m["meta_loss"]))
    moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new_state.params, before))
    assert float(moved) > 0, method
    assert int(new_state.step) == 1
    if method == "metadcseg":
      assert np.isfinite(np.asarray(new_state.extra["dcd_centers"])).all()


def _parse(argv):
  """Parses argv the way `metadcseg-train` does (locked config, overrides)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_unknown_config_key_and_bad_values_are_refused(tiny_config):
  tiny_py = f"--config={CONFIG_DIR / 'tiny.py'}"
  with pytest.raises(Exception, match="no_such_key"):
    _parse(["prog", tiny_py, "--config.train.no_such_key=1"])
  assert _parse(["prog", tiny_py, "--config.method=ce"]).method == "ce"
  bad = ml_collections.ConfigDict(tiny_config.to_dict())
  bad.method = "nope"
  with pytest.raises(ConfigError, match="config.method must be one of"):
    check_settings.check_config(bad)
  bad.method = "l2b"
  bad.data.size = 40
  with pytest.raises(ConfigError, match="divisible by 16"):
    check_settings.check_config(bad)


@pytest.mark.parametrize(
  "name", ["default", "tiny", "synthetic", "kvasir_seg", "promise12", "msd_heart", "msd_brain"]
)
def test_every_config_loads_and_passes_checks(name, tmp_path):
  config = _parse(["prog", f"--config={CONFIG_DIR / (name + '.py')}"])
  if config.data.name != "synthetic":
    with pytest.raises(ConfigError, match="manual_dir"):
      check_settings.check_config(config)
    config.data.manual_dir = str(tmp_path)
  check_settings.check_config(config)
  doc = (CONFIG_DIR / (name + ".py")).read_text()
  assert "metadcseg-train --config=experiments/configs/" + name in doc


# The methods added after the trainer: each must run under it unchanged, with checkpoints that
# resume a killed run to the same numbers and the same outputs as the one-network methods.
NEW_METHODS = ["coteaching", "jocor", "gsdnet", "dale"]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_other_methods_train_write_outputs_and_resume(method, tiny_config, tmp_path, monkeypatch):
  config = ml_collections.ConfigDict(tiny_config.to_dict())
  config.method = method
  config.model.name = "unet"  # compiles in a fraction of the U-Net++'s time
  config.train.diagnostics_every_steps = 0
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  for name in ("results.json", "metrics.jsonl", "panel.png", "curves.png", "config.json"):
    assert (tmp_path / "whole" / name).is_file(), name
  assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["1", "2"]
  if method == "coteaching":  # no meta-weights: the audit says so in one line
    with pytest.raises(
      audit_scores.AuditError, match=r"no meta scores \(its method is 'coteaching'"
    ):
      audit_report.report(tmp_path / "whole")
    with pytest.raises(audit_scores.AuditError, match=r"'coteaching', which has no meta-weights"):
      audit_report.recompute(tmp_path / "whole")
  if method in ("coteaching", "jocor", "gsdnet"):
    # τ is the measured share of flipped training pixels (auto_forget_rate).
    info = json.loads((tmp_path / "whole" / "data_info.json").read_text())
    rate = info["noise"]["pixel_error_rate"]
    assert 0.01 < rate < 0.5
    assert whole["settings_from_data"] == {"coteach.forget_rate": pytest.approx(rate)}
  original = _crash_after_saving(monkeypatch)
  with pytest.raises(_Crash):
    train.train_and_evaluate(config, str(tmp_path / "killed"))
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
  resumed = train.train_and_evaluate(config, str(tmp_path / "killed"))
  for params in ("raw", "ema"):
    for k, v in whole["test"][params].items():
      np.testing.assert_allclose(resumed["test"][params][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


_UPDATE = train.Progress.update


def _at_logged_step(monkeypatch, step, action):
  """Runs `action()` right after the progress line of global step `step` (tiny: every 2)."""

  def update(self, at, loss):
    _UPDATE(self, at, loss)
    if at == step:
      action()

  monkeypatch.setattr(train.Progress, "update", update)


def test_step_checkpoints_and_a_stop_signal_resume_to_identical_results(
  full_run, tiny_config, tmp_path, monkeypatch
):
  workdir, want, _ = full_run
  config = ml_collections.ConfigDict(tiny_config.to_dict())
  config.train.checkpoint_every_steps = 3  # 5 steps per epoch: inside the epochs
  # A kill between two step checkpoints (step 4, after the one of step 3)...
  _at_logged_step(monkeypatch, 4, lambda: (_ for _ in ()).throw(_Crash("killed at step 4")))
  with pytest.raises(_Crash):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "steps").iterdir()) == ["3"]
  # ... resumes inside epoch 1; then a SIGTERM during step 8 stops after it, checkpointed.
  _at_logged_step(monkeypatch, 8, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with pytest.raises(Preempted, match=r"SIGTERM after step 8 \(epoch 2, step 3/5\)"):
    train.train_and_evaluate(config, str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers put back
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "steps").iterdir()) == ["8"]
  monkeypatch.undo()
  got = train.train_and_evaluate(config, str(tmp_path))
  for split in ("val", "test"):
    assert got[split] == want[split]  # bit for bit
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  # The log is that of the uninterrupted run: each epoch's line averages all its steps.
  drop = ("images_per_s",)
  lines = [
    {k: v for k, v in r.items() if k not in drop} for r in _lines(tmp_path / "metrics.jsonl")
  ]
  assert lines == [
    {k: v for k, v in r.items() if k not in drop} for r in _lines(workdir / "metrics.jsonl")
  ]


def test_sigterm_to_the_command_stops_after_the_step_with_status_75(tiny_config, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if jax.config.jax_compilation_cache_dir:  # the programs the runs above compiled
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  run = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "experiments.main",
      f"--config={CONFIG_DIR / 'tiny.py'}",
      f"--config.data.data_dir={tiny_config.data.data_dir}",
      "--config.train.diagnostics_every_steps=0",  # one function fewer to compile
      f"--workdir={tmp_path}",
    ],
    stderr=subprocess.PIPE,
    text=True,
    cwd=CONFIG_DIR.parents[1],
    env=env,
  )
  logged = None
  for line in run.stderr:
    if "epoch 1/2 step 2/5" in line:  # a step has been logged: stop the run
      logged = 2
      run.send_signal(signal.SIGTERM)
      break
  rest = run.stderr.read()
  assert run.wait(timeout=600) == 75, rest[-3000:]
  assert logged is not None
  last = rest.strip().splitlines()[-1]
  step = int(last.split("after step ")[1].split()[0])
  assert last.startswith("stopped: stopped by SIGTERM after step") and "rerun" in last
  assert 2 <= step < 10  # at most the step in progress when the signal came is redone
  assert (tmp_path / "checkpoints" / "steps" / str(step)).is_dir()
  assert "Traceback" not in rest


def test_ema_statistics_chosen_on_validation_dice():
  val = lambda ema, rec: {"ema": {"dice": ema}, "recompute": {"dice": rec}}
  assert train.chosen_ema_stats(val(0.50, 0.52), "best_val") == "recompute"
  assert train.chosen_ema_stats(val(0.52, 0.50), "best_val") == "ema"
  assert train.chosen_ema_stats(val(0.50, 0.50), "best_val") == "ema"  # a tie keeps the EMA's
  assert train.chosen_ema_stats(val(0.50, float("nan")), "best_val") == "ema"
  assert train.chosen_ema_stats(None, "best_val") == "ema"  # a run that scored one kind
  for fixed in train.EMA_BATCH_STATS:  # a fixed choice whatever validation says
    assert train.chosen_ema_stats(val(0.1, 0.9), fixed) == fixed
    assert train.chosen_ema_stats(val(0.9, 0.1), fixed) == fixed
