"""Training methods by name: `config.method` selects one from `REGISTRY`.

Each method is one module behind the interface of `methods/base.py`; adding one is a new module
and one line here.
"""

import ml_collections

from metadcseg_jax.errors import ConfigError
from metadcseg_jax.methods import base
from metadcseg_jax.methods import l2b
from metadcseg_jax.methods import metadcseg
from metadcseg_jax.methods import plain

REGISTRY: dict[str, type[base.Method]] = {
  "ce": plain.CE,
  "gce": plain.GCE,
  "sce": plain.SCE,
  "l2b": l2b.L2B,
  "metadcseg": metadcseg.MetaDCSeg,
}
# Every method name, in the order of the paper's tables (baselines first).
NAMES = tuple(REGISTRY)


def create(config: ml_collections.ConfigDict, *, steps_per_epoch: int) -> base.Method:
  """The method `config.method`, built for `steps_per_epoch` optimizer steps per epoch."""
  if config.method not in REGISTRY:
    raise ConfigError(f"config.method={config.method!r}: unknown, choose one of {NAMES}")
  return REGISTRY[config.method](config, steps_per_epoch=steps_per_epoch)
