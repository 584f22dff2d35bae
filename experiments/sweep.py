r"""`metadcseg-sweep`: train methods x label-noise levels x seeds into one table.

    metadcseg-sweep --config=experiments/configs/synthetic.py --workdir=runs/sweep \
        --methods=ce,l2b,metadcseg --noise=none,l2b20,l2b40,l2b60 --seeds=0,1,2

The logic and the outputs (sweep.md, sweep.json, sweep.png) are `metadcseg_jax.benchmark`'s.
"""

import sys

from absl import flags
from ml_collections import config_flags

from metadcseg_jax import benchmark
from metadcseg_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training configuration file (ml_collections).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of the sweep.")
_METHODS = flags.DEFINE_list(
  "methods", ["ce", "l2b", "metadcseg"], f"Methods to train, from {benchmark.METHOD_ORDER}."
)
_NOISE = flags.DEFINE_list(
  "noise",
  ["none", "l2b20", "l2b40", "l2b60"],
  "Label-noise kinds (config.data.noise.kind); none = clean.",
)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds (config.seed), integers.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  benchmark.run_sweep(
    _CONFIG.value,
    _WORKDIR.value,
    methods=_METHODS.value,
    noises=_NOISE.value,
    seeds=benchmark.parse_seeds(_SEEDS.value),
    command=benchmark.command_line(sys.argv),
    echo=lambda line: print(line, flush=True),
  )


def run():
  """Console-script entry (pyproject `metadcseg-sweep`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
