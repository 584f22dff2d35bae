"""The default config and Table 8 in the library; the config files that ship build on them."""

import ast
import json
import pathlib

import pytest

from metadcseg_jax import configs
from metadcseg_jax import methods
from metadcseg_jax.data import pipeline
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import preemption
from metadcseg_jax.training import runs
from metadcseg_jax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "experiments" / "configs").glob("*.py"))


def test_default_config_holds_every_section():
  config = configs.default_config()
  assert config.method in methods.NAMES
  for section in ("model", "data", "train", "meta", "dcd", "coteach", "gsdnet", "dale", "audit"):
    assert section in config, section
  # A user's masks are never corrupted unless a setting says so.
  assert config.data.noise.kind == "none" and config.train.ema_batch_stats == "best_val"


# The configs whose results are published set their label noise themselves: the quick start,
# the benchmark presets' base, the paper's datasets and the tests' tiny run.
NOISY_CONFIGS = {
  "synthetic.py": "l2b60",
  "benchmark.py": "l2b40",
  "kvasir_cpu.py": "l2b40",
  "kvasir_seg.py": "l2b40",
  "promise12.py": "l2b40",
  "msd_brain.py": "l2b40",
  "msd_heart.py": "l2b40",
  "tiny.py": "l2b40",
}


@pytest.mark.parametrize("name", sorted(NOISY_CONFIGS))
def test_published_configs_set_their_noise(name):
  config = configs.from_file(ROOT / "experiments" / "configs" / name)
  assert config.data.noise.kind == NOISY_CONFIGS[name]


@pytest.mark.parametrize("name", sorted(configs.TABLE8))
def test_table8_config_reads_its_row(name):
  size, channels, batch, meta_batch, epochs, warmup, lr, wd, bd, dice, clip, _ = configs.TABLE8[
    name
  ]
  config = configs.table8_config(name)
  assert (config.data.name, config.data.size, config.data.channels) == (name, size, channels)
  assert (config.train.batch_size, config.train.meta_batch_size) == (batch, meta_batch)
  assert (config.train.num_epochs, config.train.warmup_epochs) == (epochs, warmup)
  assert (config.train.lr, config.train.weight_decay, config.train.grad_clip) == (lr, wd, clip)
  assert (config.dcd.lambda_bd, config.dcd.lambda_dice) == (bd, dice)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_files_import_only_the_library(path):
  """So that `--config=experiments/configs/X.py` loads where `experiments` is not installed."""
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [node.module or ""]
    assert not [n for n in names if n.split(".")[0] == "experiments"], (path.name, names)


@pytest.mark.parametrize(
  "path", [p for p in CONFIG_FILES if p.name != "__init__.py"], ids=lambda p: p.name
)
def test_every_config_file_loads_by_its_path(path):
  config = configs.from_file(path)
  assert config.method in methods.NAMES


def test_a_config_file_builds_on_another():
  folder = ROOT / "experiments" / "configs"
  bench, synthetic = (
    configs.from_file(folder / "benchmark.py"),
    configs.from_file(folder / "synthetic.py"),
  )
  # synthetic.py's settings, with benchmark.py's own on top.
  assert bench.model.width == synthetic.model.width != configs.default_config().model.width
  assert bench.data.n_test == 500 != synthetic.data.n_test


def _without(settings: dict, *dotted: str) -> dict:
  for key in dotted:
    *path, field = key.split(".")
    node = settings
    for part in path:
      node = node[part]
    del node[field]
  return settings


def test_a_run_folder_older_than_the_options_reads_as_what_it_did(tmp_path):
  """config.json of a run made before some options existed is brought up to date where it is
  read (`configs.upgrade`, through `Workdir.first_config` and `runs.run_config`): each missing
  field takes the value that reproduces that run, and the code reads fields directly."""
  old = _without(
    configs.default_config().to_dict(),
    "train.ema_batch_stats",
    "train.checkpoint_every_minutes",
    "train.checkpoint_every_steps",
    "audit",
    "meta.precision",
    "data.noise.calibrate",
    "distributed",
  )
  old["train"]["lr"] = 0.01  # a setting the run gave is kept
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = runs.run_config(tmp_path)
  assert config.train.lr == 0.01
  assert config.train.ema_batch_stats == "ema"  # the EMA of the statistics, not "best_val"
  assert (config.train.checkpoint_every_minutes, config.train.checkpoint_every_steps) == (0.0, 0)
  assert (config.audit.epochs, config.audit.meta_images) == (0, 0)
  assert config.meta.precision == "default" and config.data.noise.calibrate is False
  assert config.distributed.initialize == "off"
  # ... and behaves as such a run did: no audit pass, the EMA statistics, no timed checkpoints.
  method = methods.create(config, steps_per_epoch=4)
  assert not any(
    audit_passes.is_due(method, config, e) for e in range(1, config.train.num_epochs + 1)
  )
  assert train.chosen_ema_stats(None, config.train.ema_batch_stats) == "ema"
  schedule = preemption.Schedule(
    config.train.checkpoint_every_steps,
    config.train.checkpoint_every_minutes,
    preemption.StopSignals(),
  )
  assert schedule.check(1) == (False, False)
  assert pipeline.noise_options(config.data.noise) == {}  # noise kind "none"
  config.data.noise.kind = "l2b40"
  assert pipeline.noise_options(config.data.noise)["calibrate"] is False
  # A current run's config.json reads as written.
  current = configs.default_config().to_dict()
  assert configs.upgrade(current) == current
