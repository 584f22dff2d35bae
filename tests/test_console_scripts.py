"""`metadcseg-throughput` (metadcseg-speed under its old name) and `metadcseg-audit` run as the
console scripts pip installed: each on the smallest input that exercises its whole main path, its
output read back."""

import csv
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from experiments.configs import tiny
from metadcseg_jax.data import pipeline
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
  path = pathlib.Path(sys.executable).parent / name
  found = str(path) if path.exists() else shutil.which(name)
  assert found, f"{name} is not installed: pip install -e . first"
  return found


def _run(args, *, fast_compile=False):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  env.pop("XLA_FLAGS", None)
  if fast_compile:  # the step runs twice: compiling it is nearly all the cost
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_throughput_command():
  out = _run(
    [
      _script("metadcseg-throughput"),
      "--size=16",
      "--width=2",
      "--channels=1",
      "--batches=2",
      "--methods=ce",
      "--repeats=1",
      "--notorch",
    ],
    fast_compile=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  # The old name: one line saying the new one, then metadcseg-speed with the flags renamed.
  notice = "metadcseg-throughput is now metadcseg-speed (the old name goes in the next release): "
  new = notice + "metadcseg-speed --sizes=16 --widths=2 --channels=1 "
  assert any(line.startswith(new) for line in out.stderr.splitlines()), out.stderr[:1000]
  assert "16px, width 2, 1 ch, float32" in out.stdout
  (row,) = [line for line in out.stdout.splitlines() if line.startswith("| ce | 2 |")]
  cells = [c.strip() for c in row.strip("|").split("|")]
  ms, cpu_ms, images_per_s = float(cells[2]), float(cells[3]), float(cells[4])
  assert ms > 0 and abs(images_per_s - 2e3 / ms) <= 0.01 * images_per_s + 0.1
  assert cpu_ms > 0
  assert cells[6] != "nan"  # XLA's cost analysis gave the step's FLOPs


def _user_folder_run(tmp_path):
  """A run folder over a folder dataset of 12 masks with one audit pass recorded, where the
  model's mask disagrees with image 2's everywhere (as test_audit's report test builds it)."""
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    (tmp_path / "raw" / sub).mkdir(parents=True)
  for i in range(12):
    mask = np.zeros((32, 32), np.uint8)
    mask[4 + i : 14 + i, 6:20] = 255
    image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "raw" / "images" / f"patient{i:02d}.png")
    Image.fromarray(mask).save(tmp_path / "raw" / "masks" / f"patient{i:02d}.png")
  config = tiny.get_config()
  config.data.name, config.data.manual_dir = "folder", str(tmp_path / "raw")
  config.data.data_dir, config.data.noise.kind = str(tmp_path / "data"), "none"
  run = tmp_path / "run"
  run.mkdir()
  workdir_lib.Workdir(run).record_config(config)
  train = pipeline.prepare_data(config.data, meta_batch_size=config.train.meta_batch_size).train
  given = np.stack([train[k]["noisy_label"] for k in range(len(train))])
  pseudo = given.copy()
  pseudo[2] = 1 - pseudo[2]
  suspicion = np.where(given != pseudo, 0.9, 0.0).astype(np.float16)
  audit_passes.save_pass(
    run,
    3,
    {
      "index": np.asarray(train.indices),
      "suspicion": suspicion,
      "pseudo": pseudo.astype(np.uint8),
      "score": audit_passes.image_scores(suspicion.astype(np.float32), given, pseudo),
      "meta_images": np.asarray(0),
    },
  )
  return run, train


def test_audit_command(tmp_path):
  run, train = _user_folder_run(tmp_path)
  out = _run([_script("metadcseg-audit"), f"--workdir={run}", "--top=2"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"audited {len(train)} training masks (passes of epochs [3]" in out.stdout
  rows = list(csv.DictReader((run / "audit" / "audit.csv").open()))
  assert len(rows) == len(train)
  assert rows[0]["case_id"] == train.case_id(2)  # the one mask the model disagrees with
  assert (run / "audit" / "gallery.png").stat().st_size > 0


def test_audit_command_refuses_a_folder_that_is_no_run(tmp_path):
  out = _run([_script("metadcseg-audit"), f"--workdir={tmp_path}"])
  assert out.returncode != 0
  assert "not a metadcseg-train run folder" in out.stderr
  assert "Traceback" not in out.stderr  # a user error is one line, not a stack trace
