"""Every setting is checked before any work: each bad value gets a sentence naming it."""

import pathlib
import re
import types

import jax
import numpy as np
import pytest

from experiments.configs import default
from experiments.configs import tiny
from metadcseg_jax import check_settings
from metadcseg_jax import methods
from metadcseg_jax.errors import ConfigError

LIBRARY_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "library.md"


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints must be >= 1, got 0"),
    ("train.eval_every_epochs", 0, "config.train.eval_every_epochs must be >= 1"),
    ("train.checkpoint_every_epochs", 0, "config.train.checkpoint_every_epochs must be >= 1"),
    ("train.batch_size", 0, "config.train.batch_size must be >= 1"),
    ("train.meta_batch_size", 0, "config.train.meta_batch_size must be >= 1"),
    ("train.num_epochs", -3, "config.train.num_epochs must be >= 1"),
    ("train.lr", 0.0, "config.train.lr must be > 0.0"),
    ("train.lr", float("nan"), "config.train.lr must be a finite number"),
    ("train.momentum", 1.0, "config.train.momentum must be < 1.0"),
    ("train.ema_decay", -0.1, "config.train.ema_decay must be >= 0.0"),
    ("train.grad_clip", -1.0, "config.train.grad_clip must be >= 0.0"),
    ("data.size", 8, "config.data.size must be >= 16"),
    ("data.num_classes", 1, "config.data.num_classes must be >= 2"),
    ("data.meta_fraction", 1.0, "config.data.meta_fraction must be < 1.0"),
    ("data.name", "kvasir", "config.data.name must be one of ('synthetic', 'kvasir_seg'"),
    ("data.noise.kind", "l2b50", "config.data.noise.kind must be one of ('none', 'l2b20'"),
    ("method", "dice", "config.method must be one of ('ce'"),
    ("meta.route", "forward", "config.meta.route must be one of"),
    ("meta.eta", 0.0, "config.meta.eta must be > 0.0"),
    ("dcd.tau", 0.5, "config.dcd.tau must be > 0.5"),
    ("dcd.edge_top_fraction", 1.5, "config.dcd.edge_top_fraction must be <= 1.0"),
    ("loss.gce_q", 0.0, "config.loss.gce_q must be > 0.0"),
    ("model.width", 0, "config.model.width must be >= 1"),
    ("model.dtype", "float64", "config.model.dtype must be one of"),
    ("audit.meta_images", -1, "config.audit.meta_images must be >= 0"),
    ("seed", -1, "config.seed must be >= 0"),
  ],
)
def test_each_bad_value_is_named(key, value, message):
  config = tiny.get_config()
  section, _, field = key.rpartition(".")
  node = config
  for part in section.split(".") if section else []:
    node = node[part]
  node[field] = value
  with pytest.raises(ConfigError) as e:
    check_settings.check_config(config)
  assert message in str(e.value)


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"data.size": 40}, "must be divisible by 16"),
    ({"train.warmup_epochs": 5, "train.num_epochs": 2}, "warmup_epochs=5 exceeds"),
    ({"train.optimizer": "adam"}, "route='jvp' needs an update linear in the gradient"),
    ({"model.name": "unet", "model.deep_supervision": True}, "deep_supervision needs"),
    ({"data.name": "kvasir_seg"}, "needs config.data.manual_dir"),
    ({"data.name": "kvasir_seg", "data.manual_dir": "/no/such/folder"}, "is not a folder"),
    ({"data.n_train": 3}, "smaller than one training batch"),
  ],
)
def test_incompatible_combinations(changes, message, tmp_path):
  config = tiny.get_config()
  for key, value in changes.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(ConfigError, match=message):
    check_settings.check_config(config)


def test_folder_settings(tmp_path):
  config = tiny.get_config()
  config.data.name, config.data.manual_dir = "folder", str(tmp_path)
  config.data.channels = 2
  with pytest.raises(ConfigError, match="read as 1 .grey. or 3"):
    check_settings.check_config(config)
  config.data.channels, config.data.num_classes, config.data.mask_threshold = 3, 3, 127
  with pytest.raises(ConfigError, match=r"mask_threshold=127 must be .*config.data.num_classes=2"):
    check_settings.check_config(config)
  config.data.num_classes = 2
  check_settings.check_config(config)
  config.data.name = "kvasir_seg"
  with pytest.raises(ConfigError, match="mask_threshold applies to"):
    check_settings.check_config(config)


def test_all_problems_in_one_message_before_any_work(tmp_path):
  config = default.get_config()
  config.data.data_dir = str(tmp_path / "data")
  config.train.batch_size = 0
  config.train.keep_checkpoints = 0
  with pytest.raises(ConfigError, match=r"^2 settings are wrong: .*batch_size.*keep_checkpoints"):
    check_settings.check_config(config)
  assert not (tmp_path / "data").exists()  # nothing built, nothing written
  assert check_settings.problems(default.get_config()) == []


def _readme_method() -> types.ModuleType:
  """docs/library.md's "Adding a method" file, as a module."""
  source = re.search(
    r"```python\n(# metadcseg_jax/methods/focal\.py\n.*?)```", LIBRARY_DOC.read_text(), re.S
  )
  module = types.ModuleType("focal")
  exec(compile(source.group(1), "focal.py", "exec"), module.__dict__)
  return module


def test_a_method_with_its_own_settings_is_one_file_and_one_registry_line(monkeypatch):
  """docs/library.md's example: its file and one line in the registry, and nothing else, give the
  default config its section, check it before any work, and train."""
  focal = _readme_method()
  monkeypatch.setitem(methods.REGISTRY, "focal", focal.Focal)  # the registry line
  config = tiny.get_config()
  assert config.focal.gamma == 2.0
  config.method = "focal"
  config.model.name = "unet"  # compiles faster; the method does not care
  check_settings.check_config(config)
  config.focal.gamma = -1.0
  with pytest.raises(ConfigError) as e:
    check_settings.check_config(config)
  assert str(e.value) == "config.focal.gamma must be >= 0.0, got -1.0"

  config.focal.gamma = 1.0
  method = methods.create(config, steps_per_epoch=1)
  state = method.init_state(jax.random.PRNGKey(0))
  feed = methods.example_feed(method, size=config.data.size, channels=1, batch=2)
  step = jax.jit(method.train_step(method.phase(0)))
  _, metrics = step(state, feed, jax.random.PRNGKey(1))
  assert np.isfinite(metrics["loss"])
