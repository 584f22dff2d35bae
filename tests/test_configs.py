"""The default config and Table 8 in the library; the config files that ship build on them."""

import ast
import pathlib

import pytest

from metadcseg_jax import configs
from metadcseg_jax import methods

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
