r"""Checks that data parallel training is one-device training on the global batch.

For each method: a few train steps from the same state on the same global batches, once on a
1-device mesh and once on all devices (the trainer's own jitted steps,
`train.compiled_for(..., parallel)`), then the relative difference ||a - b|| / ||b|| of every
parameter, BatchNorm statistic and optimizer buffer, of each step's metrics and of the
method's per-pixel maps (`explain`: MetaDCSeg's and L2B's meta-weights, DCD weights).

    # 4 CPU devices (tests/test_parallel.py runs this):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.parallel_check
    # on a machine with several GPUs, at a real size:
    python -m experiments.parallel_check --size=128 --width=16 --batch=16

Prints one line per method and, with --json_out, writes {method: {"params": e, "metrics": e,
"maps": e, "devices": n}} (the largest relative difference of each kind). The comparison is
`metadcseg_jax.tools.parallel_check.check`.
"""

import json
import pathlib
import time

from absl import flags
import jax

from metadcseg_jax import cli
from metadcseg_jax import methods
from metadcseg_jax.tools import parallel_check

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  flags.DEFINE_list("methods", list(methods.NAMES), "Methods to check.")
  flags.DEFINE_integer("size", 32, "Image size.")
  flags.DEFINE_integer("width", 4, "U-Net++ base width.")
  flags.DEFINE_integer("batch", 8, "Global batch and meta batch.")
  flags.DEFINE_integer("steps", 2, "Train steps compared.")
  flags.DEFINE_enum("model", "unet++", ["unet++", "unet"], "Network.")
  flags.DEFINE_bool(
    "x64",
    False,
    "Float64 throughout: only the order of sums differs between the meshes, so the differences "
    "are rounding (~1e-15); in float32 the meta-weights amplify it "
    '(BUILD_NOTES.md, "Several devices and processes against one").',
  )
  flags.DEFINE_string("json_out", None, "Write the differences here as JSON.")


def main(argv):
  del argv
  if FLAGS.x64:
    jax.config.update("jax_enable_x64", True)
  print(f"{jax.device_count()} devices ({jax.default_backend()})", flush=True)
  out = {}
  for method in FLAGS.methods:
    t0 = time.perf_counter()
    out[method] = parallel_check.check(
      method,
      size=FLAGS.size,
      width=FLAGS.width,
      batch=FLAGS.batch,
      steps=FLAGS.steps,
      model=FLAGS.model,
      x64=FLAGS.x64,
    )
    out[method]["seconds"] = round(time.perf_counter() - t0, 1)
    print(
      f"{method}: "
      + ", ".join(
        f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in out[method].items()
      ),
      flush=True,
    )
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
