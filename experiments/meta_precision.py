r"""Relative error of the meta-gradients and meta-weights against a float64 CPU reference.

The measurement is `metadcseg_jax.tools.precision.measure` (what it compares and why there);
this prints it as a table.

    python -m experiments.meta_precision                   # CPU: default = highest
    python -m experiments.meta_precision --size=256 --width=32 --channels=3 --batch=8   # GPU
"""

from absl import flags
import jax

from metadcseg_jax import cli
from metadcseg_jax.tools import precision

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  flags.DEFINE_integer("size", 64, "Image size.")
  flags.DEFINE_integer("width", 8, "U-Net++ base width.")
  flags.DEFINE_integer("channels", 1, "Input channels.")
  flags.DEFINE_integer("batch", 4, "Batch and meta batch size.")


def main(argv):
  del argv
  out = precision.measure(FLAGS.size, FLAGS.width, FLAGS.channels, FLAGS.batch)
  print(
    f"{jax.devices()[0].device_kind} ({jax.default_backend()}), U-Net++ width {FLAGS.width}, "
    f"{FLAGS.size}px, {FLAGS.channels} ch, batch {FLAGS.batch}; relative error vs float64 (CPU)"
  )
  print("| setting | Ga | Gb | â | b̂ |\n|---|---|---|---|---|")
  for label, errs in out.items():
    print(f"| {label} | " + " | ".join(f"{errs[k]:.2e}" for k in precision.FIELDS) + " |")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
