r"""Images/s, peak device memory and MFU of each method's train step (`metadcseg-throughput`).

For each method and batch size: the trainer's jitted step (state donated) timed after
compilation (median of --repeats), its images/s, the device's peak memory in use (GPUs; the
CPU reports none), its FLOPs from XLA's cost analysis of the same step compiled for the CPU
(a GPU's cost analysis leaves out cuDNN convolutions), and the model FLOPs utilisation
MFU = FLOPs / time / peak FLOP/s of the device (--peak_tflops, or `throughput.PEAK_TFLOPS`). With
torch installed, also the PyTorch L2B-style step (`metadcseg_jax.tools.torch_ref`) on the same device.
--max_batch searches the largest batch whose step fits in device memory (doubling, then
bisection).

    # the table on a GPU (H100: peak bf16/tf32 dense 989/494 TFLOP/s, fp32 67):
    metadcseg-throughput --size=256 --width=32 --channels=3 --batches=8,32 \
        --methods=ce,l2b,metadcseg,coteaching,jocor --max_batch
    # a quick look on a CPU:
    metadcseg-throughput --size=64 --width=8 --channels=1 --batches=4 --methods=ce,l2b
    # and the trainer on the benchmark preset as it runs (validations, audit passes included),
    # with the label audit's functions per batch:
    metadcseg-throughput --size=64 --width=8 --channels=1 --batches=4 --methods=ce,l2b \
        --notorch --audit --trainer_config=experiments/configs/benchmark.py
"""

from absl import flags
import jax
from ml_collections import config_flags

from metadcseg_jax import cli
from metadcseg_jax.tools import throughput

try:  # the extra `bench`
  from metadcseg_jax.tools import torch_ref
except ImportError:
  torch_ref = None

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  flags.DEFINE_list("methods", ["ce", "l2b", "metadcseg"], "Methods to time.")
  flags.DEFINE_list("batches", ["8", "32"], "Batch sizes (training and meta).")
  flags.DEFINE_integer("size", 256, "Image size.")
  flags.DEFINE_integer("width", 32, "U-Net++ base width.")
  flags.DEFINE_integer("channels", 3, "Input channels.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "config.model.dtype.")
  flags.DEFINE_integer("repeats", 10, "Timed steps (median reported).")
  flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak TFLOP/s for the MFU (0: from the device kind, if known)."
  )
  flags.DEFINE_bool("max_batch", False, "Search the largest batch that fits (GPU).")
  flags.DEFINE_bool("torch", True, "Also time the PyTorch L2B step if torch imports.")
  flags.DEFINE_bool(
    "audit",
    False,
    "Also time the label audit's functions per batch (methods with meta-weights, first batch "
    "size): the whole meta step, and the meta batch's direction with the JVP along it.",
  )
  flags.DEFINE_integer(
    "trainer_steps",
    0,
    "Also run the trainer (metadcseg-train's loop: input pipeline, prefetch, diagnostics, "
    "logging, checkpoints) for 4 epochs of this many steps on the synthetic set at the first "
    "batch size, and report its images/s beside the bare step's on the same settings "
    "(0: skip).",
  )
  flags.DEFINE_string("data_dir", "~/metadcseg_data", "Data folder for --trainer_steps.")
  flags.DEFINE_integer(
    "trainer_runs",
    2,
    "Trainer runs per method; the last is measured (a run after the first finds every "
    "function compiled, as a benchmark's later runs do).",
  )
  config_flags.DEFINE_config_file(
    "trainer_config",
    None,
    "Also run the trainer on this config as it is (its data, batch, epochs, validations and "
    "audit passes; each of --methods in turn) and report its images/s beside the bare "
    "step's, e.g. experiments/configs/benchmark.py.",
  )


def main(argv):
  del argv
  size, width, ch, dtype = FLAGS.size, FLAGS.width, FLAGS.channels, FLAGS.dtype
  peak = throughput.peak_tflops(dtype, FLAGS.peak_tflops)
  device = jax.devices()[0]
  print(
    f"device: {device.device_kind} ({jax.default_backend()}), {size}px, width {width}, {ch} ch, "
    f"{dtype}, peak {peak or '?'} TFLOP/s"
  )
  print(
    "| method | batch | ms/step | CPU ms/step | images/s | peak memory (GiB) "
    "| GFLOP/step (CPU XLA) | MFU |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for method in FLAGS.methods:
    for batch in map(int, FLAGS.batches):
      config = throughput.config_for(method, size, width, ch, batch, dtype)
      r = throughput.time_step(config, FLAGS.repeats)
      flops = throughput.cpu_flops(config)
      mfu = flops / r["seconds"] / (peak * 1e12) if flops and peak else None
      mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "–"
      print(
        f"| {method} | {batch} | {r['seconds'] * 1e3:.1f} | {r['cpu_seconds'] * 1e3:.1f} "
        f"| {r['images_per_s']:.1f} | {mem} | "
        f"{flops / 1e9 if flops else float('nan'):.1f} | {f'{mfu:.1%}' if mfu else '–'} |",
        flush=True,
      )
  if FLAGS.torch and torch_ref is not None:
    for batch in map(int, FLAGS.batches):
      t = torch_ref.time_steps(size, width, ch, batch, FLAGS.repeats)
      print(
        f"| torch plain | {batch} | {t['plain'] * 1e3:.1f} | | {batch / t['plain']:.1f} | | | |\n"
        f"| torch L2B | {batch} | {t['l2b'] * 1e3:.1f} | | {batch / t['l2b']:.1f} | | | |",
        flush=True,
      )
  if FLAGS.audit:
    for method in FLAGS.methods:
      config = throughput.config_for(method, size, width, ch, int(FLAGS.batches[0]), dtype)
      r = throughput.time_audit(config, FLAGS.repeats)
      if r:
        shared = (
          f"; shared direction {r['direction'] * 1e3:.1f} ms per meta batch, then "
          f"{r['along'] * 1e3:.1f} ms per batch"
          if "along" in r
          else ""
        )
        print(
          f"audit, {method}, batch {config.train.batch_size}: whole meta step "
          f"{r['maps'] * 1e3:.1f} ms per batch{shared}",
          flush=True,
        )
  trainer_runs = []
  if FLAGS.trainer_steps:
    base = lambda m: throughput.config_for(m, size, width, ch, int(FLAGS.batches[0]), dtype)
    trainer_runs.append(
      lambda m: throughput.trainer_config(base(m), FLAGS.trainer_steps, FLAGS.data_dir)
    )
  if FLAGS.trainer_config is not None:
    trainer_runs.append(lambda m: _with_method(FLAGS.trainer_config, m))
  for make in trainer_runs:
    for method in FLAGS.methods:
      config = make(method)
      r = throughput.trainer_rates(config, FLAGS.repeats, runs=FLAGS.trainer_runs)
      print(
        f"trainer vs step, {method}, batch {config.train.batch_size}, {config.data.size}px "
        f"{config.data.name}: epochs {r['epochs']:.1f} images/s ({r['epochs'] / r['step']:.0%} "
        f"of the step's {r['step']:.1f}); whole run {r['run']:.1f} images/s, validations, "
        f"audit passes and checkpoints included ({r['run_share']:.0%} of it in bare steps)",
        flush=True,
      )
  if FLAGS.max_batch:
    for method in FLAGS.methods:
      largest = throughput.max_batch(method, size, width, ch, dtype)
      print(f"largest batch at {size}px: {method} {largest}")


def _with_method(config, method: str):
  copy = config.copy_and_resolve_references()
  copy.method = method
  return copy


def run():
  """Console-script entry (pyproject `metadcseg-throughput`)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
