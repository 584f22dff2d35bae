r"""`metadcseg-train --config=CONFIG --workdir=DIR [--config.x=y ...]`: train and evaluate.

    metadcseg-train --config=experiments/configs/synthetic.py --workdir=runs/synthetic
    metadcseg-train --config=experiments/configs/kvasir_seg.py \
        --config.data.manual_dir=/data/Kvasir-SEG --workdir=runs/kvasir

Rerunning a command resumes its run. Watch a run, or compare several, with
`tensorboard --logdir runs/`.
"""

from absl import flags
from ml_collections import config_flags

from metadcseg_jax import cli
from metadcseg_jax.training import summaries
from metadcseg_jax.training import train

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Training configuration: a config file (listed below), FILE:ARG passes ARG to its get_config().",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "The run's folder (created): checkpoints, results.json, metrics.jsonl, TensorBoard events, "
  "figures. An existing run there is resumed.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if "test" in results:  # process 0 of a multi-process run, or the only one
    print(train.summary(results), flush=True)
    print(f"tensorboard: {summaries.command(results['workdir'])}", flush=True)


def run():
  """Console-script entry (pyproject `metadcseg-train`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
