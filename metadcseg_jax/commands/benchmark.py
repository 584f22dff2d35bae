r"""`metadcseg-benchmark`: methods (or ablation variants) x noise levels x seeds, paper tables.

    metadcseg-benchmark --config=experiments/configs/benchmark.py --workdir=runs/bench \
        --preset=main
    metadcseg-benchmark --config=experiments/configs/benchmark.py --workdir=runs/ablation \
        --preset=ablation
    metadcseg-benchmark --config=experiments/configs/synthetic.py --workdir=runs/mine \
        --methods=ce,l2b,metadcseg --noise=none,l2b40 --seeds=0,1,2

A preset fixes rows, noise levels and seeds (`metadcseg_jax.benchmark._all.PRESETS`); --methods,
--noise and --seeds override its parts. The logic and the outputs (benchmark.md,
benchmark.json, dice_vs_noise.png) are `metadcseg_jax.benchmark._all`'s; at the end it prints the
paired comparisons and which row to choose at each noise level (the best mean test Dice, and
every other row's paired difference to it with its interval and verdict).
"""

import sys

from absl import flags
from ml_collections import config_flags

from metadcseg_jax import cli
from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import report
from metadcseg_jax.benchmark import runner
from metadcseg_jax.training import summaries
from metadcseg_jax.training import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training configuration file (listed below) of every run.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Root folder of the benchmark: tables, plot, runs in <noise>/<method>/seed<k>."
)
_PRESET = flags.DEFINE_enum("preset", "main", list(presets.PRESETS), "Rows, noise, seeds.")
_METHODS = flags.DEFINE_list("methods", None, "Methods (rows) instead of the preset's.")
_NOISE = flags.DEFINE_list(
  "noise", None, "Noise kinds (none = clean) instead of the preset's; tables order them by level."
)
_SEEDS = flags.DEFINE_list("seeds", None, "Training seeds (config.seed) instead of the preset's.")
_LABELS = flags.DEFINE_enum(
  "labels",
  None,
  list(presets.LABEL_MODES),
  "per_seed: each seed also draws the noise realisation and the meta split; fixed: the "
  "config's. Default: the preset's (per_seed).",
)
_PROCESSES = flags.DEFINE_integer(
  "processes",
  0,
  "Runs trained at once, each in its own process; 0: the measured best for this machine "
  "(2 on a 2-core CPU, else 1).",
  lower_bound=0,
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  root = workdir_lib.make_dir(_WORKDIR.value)  # an unwritable folder fails before any run
  preset = presets.PRESETS[_PRESET.value]
  rows = presets.method_rows(_METHODS.value) if _METHODS.value else preset["rows"]
  runner.run_benchmark(
    _CONFIG.value,
    _WORKDIR.value,
    rows=rows,
    noises=_NOISE.value or preset["noises"],
    seeds=presets.parse_seeds(_SEEDS.value or preset["seeds"]),
    labels=_LABELS.value or preset["labels"],
    command=report.command_line(sys.argv),
    echo=lambda line: print(line, flush=True),
    processes=_PROCESSES.value or runner.default_processes(),
  )
  print(f"every run's curves, side by side: {summaries.command(root)}", flush=True)


def run():
  """Console-script entry (pyproject `metadcseg-benchmark`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
