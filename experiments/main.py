r"""Command-line entry point: `metadcseg-train --config=CONFIG --workdir=DIR [--config.x=y ...]`.

    metadcseg-train --config=experiments/configs/synthetic.py --workdir=/tmp/metadcseg_synth
    metadcseg-train --config=experiments/configs/kvasir_seg.py \
        --config.data.manual_dir=/data/Kvasir-SEG --workdir=/tmp/kvasir
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (ml_collections).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, figures.")
flags.mark_flags_as_required(["config", "workdir"])


def _only_our_info(record) -> bool:
  # orbax and tfds log several INFO lines per checkpoint or build; keep their warnings only.
  return record.levelno >= std_logging.WARNING or "metadcseg_jax" in record.pathname or (
      "experiments" in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from metadcseg_jax import train  # pylint: disable=g-import-not-at-top  (fast --help)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_only_our_info)
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  ema = results["test"]["ema"]
  raw = results["test"]["raw"]
  print(f"\nfinal test Dice: raw {raw['dice']:.4f}, EMA {ema['dice']:.4f} "
        f"(IoU {ema['iou']:.4f}, HD95 {ema['hd95']:.2f})")
  wd = results["workdir"]
  print(f"results: {wd}/results.json\nmetrics: {wd}/metrics.jsonl (curves: {wd}/curves.png)\n"
        f"panel:   {wd}/panel.png" + (f"\nDCD:     {wd}/dcd.png" if results["method"] == "metadcseg"
                                      else ""))
  sys.stdout.flush()


def run():
  """Console-script entry (pyproject `metadcseg-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
