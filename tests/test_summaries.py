"""TensorBoard event files: written beside metrics.jsonl, read back, rewritten on resume.

A whole run's events (the scalars and figures of a tiny training, a resume after a kill) are
checked in test_cli.py, on the quick start's run.
"""

import collections
import io

import numpy as np
from PIL import Image
import pytest

from metadcseg_jax import metrics
from metadcseg_jax.training import summaries
from metadcseg_jax.training import workdir as workdir_lib


def _records(epochs, steps_per_epoch=5):
  for epoch in epochs:
    step = epoch * steps_per_epoch
    yield {"epoch": epoch, "step": step - 5, "split": "diagnostics", "grad_norm_total": 1.5}
    yield {
      "epoch": epoch,
      "step": step,
      "split": "train",
      "phase": "main",
      "loss": 1.0 / epoch,
      "ce_term": 0.5,
      "lr": 0.01,
      "images_per_s": 100.0,
    }
    for params in ("raw", "ema"):
      yield {
        "epoch": epoch,
        "step": step,
        "split": "val",
        "params": params,
        "dice": 0.5 + epoch / 10,
        "hd95": 3.0,
      }


def _duplicates(logdir):
  counts = collections.Counter((e["tag"], e["step"]) for e in summaries.read(logdir))
  return [key for key, n in counts.items() if n > 1]


def test_tags_of_a_record():
  record = {"epoch": 2, "step": 10, "split": "val", "params": "ema", "dice": 0.7, "ok": True}
  assert summaries.tag_values(record) == {"val/ema/dice": 0.7}
  record = {"epoch": 2, "step": 10, "split": "train", "phase": "warmup", "loss": 1, "lr": 0.1}
  assert summaries.tag_values(record) == {"train/loss": 1.0, "train/lr": 0.1}


def test_per_class_scores_get_a_tag_per_class(tmp_path):
  # A validation record of three classes as the trainer logs it: metrics.summarize's dict.
  t = np.array([[0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 2]])
  p = np.array([[0, 1, 0, 0], [0, 1, 2, 2], [0, 2, 2, 2]])
  summary = metrics.summarize(
    [metrics.case_metrics(p, t, num_classes=3)], class_names=["organ", "lesion"]
  )
  record = {"epoch": 1, "step": 5, "split": "val", "params": "ema", **summary}
  tags = summaries.tag_values(record)
  for name in ("organ", "lesion"):
    for metric in ("dice", "iou", "hd95", "hd", "asd"):
      assert tags[f"val/ema/{metric}/{name}"] == summary["per_class"][name][metric]
  assert tags["val/ema/dice"] == summary["dice"]
  assert tags["val/ema/dice/organ"] != tags["val/ema/dice/lesion"]  # not the headline copied
  assert not [tag for tag in tags if "per_class" in tag]
  writer = summaries.Summaries(tmp_path)
  writer.write_record(record)
  writer.close()
  series = summaries.scalars(tmp_path)
  assert series["val/ema/hd95/lesion"] == [
    (5, pytest.approx(summary["per_class"]["lesion"]["hd95"]))
  ]


def test_metrics_log_mirrors_every_record_and_a_resume_writes_no_step_twice(tmp_path):
  wd = workdir_lib.Workdir(tmp_path / "run")
  for record in _records([1, 2, 3]):
    wd.metrics.append(record)
  series = summaries.scalars(wd.path)
  assert [s for s, _ in series["train/loss"]] == [5, 10, 15]
  np.testing.assert_allclose([v for _, v in series["train/loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
  assert [s for s, _ in series["val/ema/dice"]] == [5, 10, 15]
  assert {"train/lr", "train/images_per_s", "train/ce_term", "val/raw/hd95"} <= set(series)
  assert [s for s, _ in series["diagnostics/grad_norm_total"]] == [0, 5, 10]

  # A run killed after logging epoch 3 resumes from its epoch-2 checkpoint (in a new process:
  # a new Workdir), then logs epochs 3 and 4.
  wd.release()
  wd = workdir_lib.Workdir(tmp_path / "run")
  wd.metrics.truncate_after(2)
  for record in _records([3, 4]):
    wd.metrics.append(record)
  wd.release()
  assert _duplicates(wd.path) == []
  assert len(list(wd.path.glob(summaries.EVENTS_GLOB))) == 1
  series = summaries.scalars(wd.path)
  assert [s for s, _ in series["train/loss"]] == [5, 10, 15, 20]
  assert [s for s, _ in series["diagnostics/grad_norm_total"]] == [0, 5, 10, 15]


def test_images_read_back_byte_for_byte(tmp_path):
  png = tmp_path / "panel.png"
  Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(png)
  writer = summaries.Summaries(tmp_path)
  writer.write_images([png, tmp_path / "dcd.png"], step=7)  # dcd.png was not written: skipped
  writer.close()
  (image,) = [e for e in summaries.read(tmp_path) if "image" in e]
  assert (image["tag"], image["step"], image["width"], image["height"]) == (
    "figures/panel",
    7,
    64,
    48,
  )
  assert image["image"] == png.read_bytes()
  assert Image.open(io.BytesIO(image["image"])).size == (64, 48)


def test_a_torn_last_record_is_dropped(tmp_path):
  writer = summaries.Summaries(tmp_path)
  for record in _records([1, 2]):
    writer.write_record(record)
  writer.close()
  (path,) = tmp_path.glob(summaries.EVENTS_GLOB)
  data = path.read_bytes()
  path.write_bytes(data[:-7])  # a writer killed inside its last record
  series = summaries.scalars(tmp_path)
  assert [s for s, _ in series["val/ema/dice"]] == [5]  # the torn record: epoch 2's EMA scores
  assert [s for s, _ in series["val/raw/dice"]] == [5, 10]
  assert series["train/loss"] == [(5, 1.0), (10, 0.5)]


def test_the_command_names_the_folder(tmp_path):
  assert summaries.command(tmp_path) == f"tensorboard --logdir {tmp_path}"
