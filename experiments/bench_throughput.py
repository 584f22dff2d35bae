r"""Images/s, peak device memory and MFU of each method's train step (`metadcseg-throughput`).

For each method and batch size: the trainer's jitted step (state donated) timed after
compilation (median of --repeats), its images/s, the device's peak memory in use (GPUs; the
CPU reports none), its FLOPs from XLA's cost analysis of the same step compiled for the CPU
(a GPU's cost analysis leaves out cuDNN convolutions), and the model FLOPs utilisation
MFU = FLOPs / time / peak FLOP/s of the device (--peak_tflops, or the table below). With
torch installed, also the PyTorch L2B-style step (experiments/torch_ref.py) on the same device.
--max_batch searches the largest batch whose step fits in device memory (doubling, then
bisection).

    # the table on a GPU (H100: peak bf16/tf32 dense 989/494 TFLOP/s, fp32 67):
    metadcseg-throughput --size=256 --width=32 --channels=3 --batches=8,32 \
        --methods=ce,l2b,metadcseg,coteaching,jocor --max_batch
    # a quick look on a CPU:
    metadcseg-throughput --size=64 --width=8 --channels=1 --batches=4 --methods=ce,l2b
"""

import json
import statistics
import tempfile
import time

from absl import flags
import jax
import numpy as np

from experiments.configs import default as default_config
from metadcseg_jax import cli
from metadcseg_jax import methods
from metadcseg_jax import train

FLAGS = flags.FLAGS


# Dense peak TFLOP/s by device kind and the precision the step's convolutions run at (XLA's
# GPU default for float32 is TF32; config.meta.precision="highest" makes the meta path FP32).
PEAK_TFLOPS = {
  "NVIDIA H100 80GB HBM3": {"tf32": 494.0, "bf16": 989.0, "fp32": 67.0},
  "NVIDIA H100": {"tf32": 494.0, "bf16": 989.0, "fp32": 67.0},
  "NVIDIA H200": {"tf32": 494.0, "bf16": 989.0, "fp32": 67.0},
  "NVIDIA A100-SXM4-80GB": {"tf32": 156.0, "bf16": 312.0, "fp32": 19.5},
}


def config_for(method: str, size: int, width: int, channels: int, batch: int, dtype: str):
  config = default_config.get_config()
  config.method = method
  config.data.size, config.data.channels = size, channels
  config.model.width, config.model.dtype = width, dtype
  config.train.batch_size = config.train.meta_batch_size = batch
  return config


def _step_and_inputs(config):
  m = methods.create(config, steps_per_epoch=100)
  phase = m.phase(config.train.num_epochs - 1)  # the step a long run spends its time in
  feed = methods.example_feed(
    m, size=config.data.size, channels=config.data.channels, batch=config.train.batch_size
  )
  return m, m.train_step(phase), feed


def cpu_flops(config) -> float | None:
  """FLOPs of one step from XLA's cost analysis of its CPU compilation (nothing runs)."""
  m, step, feed = _step_and_inputs(config)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  state = jax.eval_shape(lambda: m.init_state(jax.random.PRNGKey(0)))
  abstract = lambda t: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), t
  )
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=cpu)
  compiled = jax.jit(step).lower(abstract(state), abstract(feed), rng).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


def time_step(config, repeats: int) -> dict[str, float | None]:
  """Median seconds per step (state donated, as in training) after the first call (compile
  and warm-up, `compile_s`), images/s and the device's peak memory (bytes, or None)."""
  m, step, feed = _step_and_inputs(config)
  step = jax.jit(step, donate_argnums=(0,))
  state = m.init_state(jax.random.PRNGKey(0))
  feed = jax.device_put(feed)
  t0 = time.perf_counter()
  state, out = step(state, feed, jax.random.PRNGKey(0))
  jax.block_until_ready((state, out))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    state, out = step(state, feed, jax.random.PRNGKey(i))
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "seconds": seconds,
    "compile_s": compile_s,
    "images_per_s": config.train.batch_size / seconds,
    "peak_bytes": stats.get("peak_bytes_in_use"),
  }


def fits(config) -> bool:
  try:
    time_step(config, repeats=1)
    return True
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError RESOURCE_EXHAUSTED)
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return False
    raise


def max_batch(method: str, size, width, channels, dtype, start: int = 8, limit: int = 4096) -> int:
  """The largest batch whose step runs (doubling from `start`, then bisection)."""
  ok, batch = 0, start
  while batch <= limit and fits(config_for(method, size, width, channels, batch, dtype)):
    ok, batch = batch, batch * 2
  lo, hi = ok, min(batch, limit + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(config_for(method, size, width, channels, mid, dtype)):
      lo = mid
    else:
      hi = mid
  return lo


def trainer_images_per_s(config, steps: int, data_dir: str) -> float:
  """The second epoch's images/s of `train_and_evaluate` (the first includes compilation)."""
  config.data.name = "synthetic"
  config.data.data_dir = data_dir
  config.data.n_train = (steps + 1) * config.train.batch_size  # + the meta split
  config.data.n_val, config.data.n_test = 8, 8
  config.train.num_epochs, config.train.warmup_epochs = 2, 0
  config.train.eval_every_epochs = 100
  config.train.log_every_steps = max(steps // 4, 1)
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    lines = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]
  return [r for r in lines if r["split"] == "train"][-1]["images_per_s"]


def peak_tflops(dtype: str) -> float | None:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  table = PEAK_TFLOPS.get(jax.devices()[0].device_kind)
  if not table:
    return None
  return table["bf16" if dtype == "bfloat16" else "tf32"]


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
  flags.DEFINE_integer(
    "trainer_steps",
    0,
    "Also run the trainer (metadcseg-train's loop: input pipeline, prefetch, logging) for 2 "
    "epochs of this many steps on the synthetic set at the first batch size, and report its "
    "second epoch's images/s beside the step's (0: skip).",
  )
  flags.DEFINE_string("data_dir", "~/metadcseg_data", "Data folder for --trainer_steps.")


def main(argv):
  del argv
  torch_ref = None
  if FLAGS.torch:
    try:
      from experiments import torch_ref  # pylint: disable=g-import-not-at-top
    except ImportError:
      torch_ref = None
  size, width, ch, dtype = FLAGS.size, FLAGS.width, FLAGS.channels, FLAGS.dtype
  peak = peak_tflops(dtype)
  device = jax.devices()[0]
  print(
    f"device: {device.device_kind} ({jax.default_backend()}), {size}px, width {width}, {ch} ch, "
    f"{dtype}, peak {peak or '?'} TFLOP/s"
  )
  print("| method | batch | ms/step | images/s | peak memory (GiB) | GFLOP/step (CPU XLA) | MFU |")
  print("|---|---|---|---|---|---|---|")
  for method in FLAGS.methods:
    for batch in map(int, FLAGS.batches):
      config = config_for(method, size, width, ch, batch, dtype)
      r = time_step(config, FLAGS.repeats)
      flops = cpu_flops(config)
      mfu = flops / r["seconds"] / (peak * 1e12) if flops and peak else None
      mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "–"
      print(
        f"| {method} | {batch} | {r['seconds'] * 1e3:.1f} | {r['images_per_s']:.1f} | {mem} | "
        f"{flops / 1e9 if flops else float('nan'):.1f} | {f'{mfu:.1%}' if mfu else '–'} |",
        flush=True,
      )
  if torch_ref:
    for batch in map(int, FLAGS.batches):
      t = torch_ref.time_steps(size, width, ch, batch, FLAGS.repeats)
      print(
        f"| torch plain | {batch} | {t['plain'] * 1e3:.1f} | {batch / t['plain']:.1f} | | | |\n"
        f"| torch L2B | {batch} | {t['l2b'] * 1e3:.1f} | {batch / t['l2b']:.1f} | | | |",
        flush=True,
      )
  if FLAGS.trainer_steps:
    batch = int(FLAGS.batches[0])
    for method in FLAGS.methods:
      config = config_for(method, size, width, ch, batch, dtype)
      step_rate = time_step(config, FLAGS.repeats)["images_per_s"]
      loop_rate = trainer_images_per_s(config, FLAGS.trainer_steps, FLAGS.data_dir)
      print(
        f"trainer vs step, {method}, batch {batch}: {loop_rate:.1f} vs {step_rate:.1f} images/s "
        f"({loop_rate / step_rate:.0%})",
        flush=True,
      )
  if FLAGS.max_batch:
    for method in FLAGS.methods:
      print(f"largest batch at {size}px: {method} {max_batch(method, size, width, ch, dtype)}")


def run():
  """Console-script entry (pyproject `metadcseg-throughput`)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
