"""Default configuration: MetaDCSeg (L2B meta step + DCD) on the synthetic set, U-Net++.

The settings, each with what it does, are `metadcseg_jax.configs.default_config`; variant
configs start from it and override only what differs. Every field can be overridden on the
command line, e.g. `--config.method=ce --config.train.num_epochs=5`.

    metadcseg-train --config=experiments/configs/default.py --workdir=/tmp/metadcseg
"""

from metadcseg_jax import configs


def get_config():
  return configs.default_config()
