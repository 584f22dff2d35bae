"""Command-line entry point: `metadcseg-train --config=CONFIG --workdir=DIR [--config.x=y ...]`.

    metadcseg-train --config=experiments/configs/synthetic.py --workdir=/tmp/metadcseg_synth
    metadcseg-train --config=experiments/configs/kvasir_seg.py \
        --config.data.manual_dir=/data/Kvasir-SEG --workdir=/tmp/kvasir
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (ml_collections).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from metadcseg_jax import train  # pylint: disable=g-import-not-at-top  (fast --help)
  logging.set_verbosity(logging.INFO)
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  ema = results["test"]["ema"]
  raw = results["test"]["raw"]
  print(f"\nfinal test Dice: raw {raw['dice']:.4f}, EMA {ema['dice']:.4f} "
        f"(IoU {ema['iou']:.4f}, HD95 {ema['hd95']:.2f})")
  print(f"results: {results['workdir']}/results.json   metrics: {results['workdir']}/metrics.jsonl"
        f"   panel: {results['workdir']}/panel.png")
  sys.stdout.flush()


def run():
  """Console-script entry (pyproject `metadcseg-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
