"""Training methods by name: `config.method` selects one from `REGISTRY`.

Each method is one module behind the interface of `methods/base.py`, its own settings included
(their defaults and checks: `default_settings`, `check_settings`); adding one is a new module and
one line here.
"""

from typing import Any

import ml_collections
import numpy as np

from metadcseg_jax.errors import ConfigError
from metadcseg_jax.methods import base
from metadcseg_jax.methods import coteaching
from metadcseg_jax.methods import dale
from metadcseg_jax.methods import gsdnet
from metadcseg_jax.methods import jocor
from metadcseg_jax.methods import l2b
from metadcseg_jax.methods import metadcseg
from metadcseg_jax.methods import plain

REGISTRY: dict[str, type[base.Method]] = {
  "ce": plain.CE,
  "gce": plain.GCE,
  "sce": plain.SCE,
  "coteaching": coteaching.CoTeaching,
  "jocor": jocor.JoCoR,
  "gsdnet": gsdnet.GSDNet,
  "dale": dale.DALE,
  "l2b": l2b.L2B,
  "metadcseg": metadcseg.MetaDCSeg,
}
# Every method name, in the order of the paper's tables (baselines first).
NAMES = tuple(REGISTRY)


def default_settings() -> dict[str, ml_collections.ConfigDict]:
  """The config sections of every registered method's own settings, {section: defaults}.

  In registry order; a section several methods share (Co-teaching's `coteach`, L2B's `meta`)
  comes once.
  """
  sections = {}
  for cls in REGISTRY.values():
    for name, section in cls.default_settings().items():
      sections.setdefault(name, section)
  return sections


def settings_problems(config: ml_collections.ConfigDict) -> list[str]:
  """What the registered methods find wrong with their settings in `config` (each once)."""
  return list(dict.fromkeys(p for cls in REGISTRY.values() for p in cls.check_settings(config)))


def with_data_settings(
  config: ml_collections.ConfigDict, data_info: dict[str, Any]
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """`config` with the settings `config.method` takes from the data (`settings_from_data`),
  and those settings; the config itself when there are none."""
  cls = REGISTRY.get(config.method)
  settings = cls.settings_from_data(config, data_info) if cls else {}
  if not settings:
    return config, {}
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(settings)
  return config, settings


def create(config: ml_collections.ConfigDict, *, steps_per_epoch: int) -> base.Method:
  """The method `config.method`, built for `steps_per_epoch` optimizer steps per epoch."""
  if config.method not in REGISTRY:
    raise ConfigError(f"config.method={config.method!r}: unknown, choose one of {NAMES}")
  return REGISTRY[config.method](config, steps_per_epoch=steps_per_epoch)


def example_feed(
  method: base.Method, *, size: int, channels: int, batch: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """A synthetic batch as the trainer feeds `method`'s step (for benchmarks and checks).

  Args:
    method: the method whose step is fed.
    size: the image size.
    channels: the input channels.
    batch: the batch (and meta batch) size.
    seed: the noise's seed.

  Returns:
    "image" (B,H,W,C) float32 noise, "noisy_label" (B,H,W) int32 (one disc), the same for
    "meta_image"/"meta_label", and what the method's `example_transform` adds per example
    (edges, distance maps, superpixels).
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  label = (((yy - size / 2) ** 2 + (xx - size / 3) ** 2) < (size / 4) ** 2).astype(np.int32)
  feed = {
    "image": rng.standard_normal((batch, size, size, channels)).astype(np.float32),
    "noisy_label": np.stack([label] * batch),
    "meta_image": rng.standard_normal((batch, size, size, channels)).astype(np.float32),
    "meta_label": np.stack([label] * batch),
  }
  if method.example_transform is None:
    return feed
  train_keys = [k for k in feed if not k.startswith("meta_")]
  examples = [method.example_transform({k: feed[k][i] for k in train_keys}) for i in range(batch)]
  feed.update({k: np.stack([e[k] for e in examples]) for k in examples[0] if k not in feed})
  return feed
