"""The corruption command: builds the cache once, reports 1 - Dice per kind, reruns reuse it."""

import pathlib

import numpy as np

from experiments.configs import tiny
from experiments.corrupt_labels import corruption_table
from metadcseg_jax import noise
from metadcseg_jax.data import pipeline


def test_table_matches_the_cache_training_reads(tmp_path):
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path)
  table = corruption_table(config, ["l2b20", "l2b60"])
  rows = [l for l in table.splitlines() if l.startswith("| l2b")]
  assert len(rows) == 2
  sources, key, _ = pipeline.load_sources(config.data)
  cache = pathlib.Path(pipeline.noise_cache_dir(config.data, key))
  files = sorted(p.name for p in cache.glob("noisy_*.npy"))
  assert files == ["noisy_l2b20_seed0.npy", "noisy_l2b60_seed0.npy"]
  clean = pipeline.load_labels(sources["train"], key, 2)
  for row, kind in zip(rows, ("l2b20", "l2b60")):
    noisy = np.load(cache / f"noisy_{kind}_seed0.npy")
    want = noise.measured_corruption(clean, noisy).mean()
    assert row.split("|")[3].strip() == f"{want:.3f}"
  # The stronger level corrupts more, and a rerun reuses the files untouched.
  assert float(rows[1].split("|")[3]) > float(rows[0].split("|")[3])
  mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("noisy_*.npy")}
  assert corruption_table(config, ["l2b20", "l2b60"]) == table
  assert {p: p.stat().st_mtime_ns for p in cache.glob("noisy_*.npy")} == mtimes
