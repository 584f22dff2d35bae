r"""`metadcseg-corrupt`: corrupt a dataset's training labels once, cache them, print 1 - Dice.

    metadcseg-corrupt --config=experiments/configs/synthetic.py --kinds=l2b20,l2b40,l2b60
    metadcseg-corrupt --config=experiments/configs/kvasir_seg.py \
        --config.data.manual_dir=/data/Kvasir-SEG --kinds=l2b20,l2b40,l2b60

The cache (noisy_{kind}_seed{seed}.npy + manifest.json) lives where training reads it,
`<data_dir>/noisy_labels/<dataset build>/`; a rerun reuses it (`corruption.corruption_table`).
"""

from absl import flags
from ml_collections import config_flags

from metadcseg_jax import cli
from metadcseg_jax.benchmark import corruption

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (listed below) of the dataset and its noise.", lock_config=True
)
_KINDS = flags.DEFINE_list("kinds", ["l2b20", "l2b40", "l2b60"], "Noise kinds to build.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  print(corruption.corruption_table(_CONFIG.value, _KINDS.value), flush=True)


def run():
  """Console-script entry (pyproject `metadcseg-corrupt`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
