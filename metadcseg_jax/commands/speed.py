r"""`metadcseg-speed`: how fast each method's training step runs, and what it costs.

For every image shape (--sizes x --widths x --channels), every method and every batch size: the
trainer's jitted step (state donated) timed after compilation (median of --repeats), this
process's CPU time per step, images/s, the device's peak memory in use (GPUs; the CPU reports
none), the step's FLOPs from XLA's cost analysis of the same step compiled for the CPU (a GPU's
cost analysis leaves out cuDNN convolutions; --noflops skips it) and the model FLOPs utilisation
MFU = FLOPs / time / peak FLOP/s of the device (--peak_tflops, or `throughput.PEAK_TFLOPS`).
--methods takes method names and the two routes of L2B's meta step, `l2b_jvp` and `l2b_reverse`
(a method's meta step otherwise takes `config.meta.route`'s default, jvp). With torch installed,
PyTorch's plain and L2B-style steps (`metadcseg_jax.tools.torch_ref`) on the same device beside
them; then each step's time against plain CE's (and PyTorch's), and `meta/plain ratio: X` for
l2b_jvp against ce at 128 px, 3 channels, width 32 (or the last shape measured).

    # a quick look on a CPU:
    metadcseg-speed --sizes=64 --widths=8 --channels=1 --batches=4 --methods=ce,l2b
    # the meta step against plain CE and PyTorch, at two widths and both routes:
    metadcseg-speed --sizes=128 --widths=16,32 --channels=1,3 --batches=2 \
        --methods=ce,l2b_jvp,l2b_reverse,metadcseg --noflops
    # the table on a GPU (H100: peak bf16/tf32 dense 989/494 TFLOP/s, fp32 67), the largest batch:
    metadcseg-speed --sizes=256 --widths=32 --channels=3 --batches=8,32 \
        --methods=ce,l2b,metadcseg,coteaching,jocor --max_batch
    # the trainer on the benchmark preset as it runs (validations, audit passes included),
    # with the label audit's functions per batch:
    metadcseg-speed --sizes=64 --widths=8 --channels=1 --batches=4 --methods=ce,l2b \
        --notorch --audit --trainer_config=experiments/configs/benchmark.py

--max_batch searches the largest batch whose step fits in device memory (doubling, then
bisection); --trainer_steps and --trainer_config run the trainer itself and report its images/s
beside the bare step's (`throughput.trainer_rates`).
"""

import os
import shlex
import sys
from typing import Any, Mapping, Sequence

from absl import flags
import jax
from ml_collections import config_flags

from metadcseg_jax import cli
from metadcseg_jax import methods
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.tools import throughput

try:  # the extra `bench`
  from metadcseg_jax.tools import torch_ref
except ImportError:
  torch_ref = None

FLAGS = flags.FLAGS
# The steps --methods takes: every method (its meta step, if any, on the default route) and L2B's
# step on each route.
ROUTED = {"l2b_jvp": ("l2b", "jvp"), "l2b_reverse": ("l2b", "reverse")}


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  flags.DEFINE_list(
    "methods", ["ce", "l2b", "metadcseg"], f"Steps to time: methods or {sorted(ROUTED)}."
  )
  flags.DEFINE_list("batches", ["8", "32"], "Batch sizes (training and meta).")
  flags.DEFINE_list("sizes", ["256"], "Image sizes.")
  flags.DEFINE_list("widths", ["32"], "U-Net++ base widths.")
  flags.DEFINE_list("channels", ["3"], "Input channels.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "config.model.dtype.")
  flags.DEFINE_integer("repeats", 10, "Timed steps (median reported).")
  flags.DEFINE_bool("flops", True, "FLOPs and MFU from XLA's cost analysis of a CPU compile.")
  flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak TFLOP/s for the MFU (0: from the device kind, if known)."
  )
  flags.DEFINE_bool("max_batch", False, "Search the largest batch that fits (GPU).")
  flags.DEFINE_bool("torch", True, "Also time PyTorch's plain and L2B steps if torch imports.")
  flags.DEFINE_bool(
    "audit",
    False,
    "Also time the label audit's functions per batch (methods with meta-weights, first shape "
    "and batch size): the whole meta step, and the meta batch's direction with the JVP along it.",
  )
  flags.DEFINE_integer(
    "trainer_steps",
    0,
    "Also run the trainer (metadcseg-train's loop: input pipeline, prefetch, diagnostics, "
    "logging, checkpoints) for 4 epochs of this many steps on the synthetic set at the first "
    "shape and batch size, and report its images/s beside the bare step's (0: skip).",
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


def _step(name: str) -> tuple[str, str]:
  """(method, meta route) of a --methods entry."""
  return ROUTED.get(name, (name, "jvp"))


def _config(name: str, size: int, width: int, channels: int, batch: int):
  method, route = _step(name)
  return throughput.config_for(method, size, width, channels, batch, FLAGS.dtype, route=route)


def _shapes() -> list[tuple[int, int, int]]:
  return [
    (int(s), int(w), int(c)) for s in FLAGS.sizes for w in FLAGS.widths for c in FLAGS.channels
  ]


def _step_rows(shape: tuple[int, int, int], peak: float | None) -> dict[tuple[str, int], float]:
  """The table's rows of one shape (printed as they come); {(step, batch): seconds}."""
  seconds = {}
  for name in FLAGS.methods:
    for batch in map(int, FLAGS.batches):
      config = _config(name, *shape, batch)
      r = throughput.time_step(config, FLAGS.repeats)
      seconds[name, batch] = r["seconds"]
      flops = throughput.cpu_flops(config) if FLAGS.flops else None
      mfu = flops / r["seconds"] / (peak * 1e12) if flops and peak else None
      mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "–"
      gflop = f"{flops / 1e9:.1f}" if flops else ("nan" if FLAGS.flops else "–")
      print(
        f"| {name} | {batch} | {r['seconds'] * 1e3:.1f} | {r['cpu_seconds'] * 1e3:.1f} "
        f"| {r['images_per_s']:.1f} | {mem} | {gflop} | {f'{mfu:.1%}' if mfu else '–'} |",
        flush=True,
      )
  return seconds


def _torch_rows(shape: tuple[int, int, int]) -> dict[int, dict[str, float]]:
  """PyTorch's plain and L2B steps at each batch (printed); {batch: {"plain", "l2b": s}}."""
  out = {}
  for batch in map(int, FLAGS.batches):
    t = out[batch] = torch_ref.time_steps(*shape, batch, FLAGS.repeats)
    print(
      f"| torch plain | {batch} | {t['plain'] * 1e3:.1f} | | {batch / t['plain']:.1f} | | | |\n"
      f"| torch L2B | {batch} | {t['l2b'] * 1e3:.1f} | | {batch / t['l2b']:.1f} | | | |",
      flush=True,
    )
  return out


def ratio_lines(shape, seconds: dict[tuple[str, int], float], torch_s) -> list[str]:
  """Each step's time against plain CE's and PyTorch's at one shape, a line per batch.

  Args:
    shape: (size, width, channels).
    seconds: {(step, batch): seconds} of the JAX steps.
    torch_s: {batch: {"plain", "l2b": seconds}} of PyTorch's steps, or None.
  """
  lines = []
  for batch in sorted({b for _, b in seconds}):
    row = {name: s for (name, b), s in seconds.items() if b == batch}
    parts = [f"{n}/ce {s / row['ce']:.2f}" for n, s in row.items() if n != "ce" and "ce" in row]
    if torch_s:
      if "l2b_jvp" in row:
        parts.append(f"torch L2B / JAX l2b_jvp {torch_s[batch]['l2b'] / row['l2b_jvp']:.2f}")
      if "ce" in row:
        parts.append(f"torch plain / JAX ce {torch_s[batch]['plain'] / row['ce']:.2f}")
    if parts:
      lines.append(
        f"size {shape[0]} width {shape[1]} ch {shape[2]} batch {batch}: " + ", ".join(parts)
      )
  return lines


def _audit_lines(shape: tuple[int, int, int]) -> None:
  for name in FLAGS.methods:
    config = _config(name, *shape, int(FLAGS.batches[0]))
    r = throughput.time_audit(config, FLAGS.repeats)
    if r:
      shared = (
        f"; shared direction {r['direction'] * 1e3:.1f} ms per meta batch, then "
        f"{r['along'] * 1e3:.1f} ms per batch"
        if "along" in r
        else ""
      )
      print(
        f"audit, {name}, batch {config.train.batch_size}: whole meta step "
        f"{r['maps'] * 1e3:.1f} ms per batch{shared}",
        flush=True,
      )


def _trainer_lines(shape: tuple[int, int, int]) -> None:
  makers = []
  if FLAGS.trainer_steps:
    makers.append(
      lambda name: throughput.trainer_config(
        _config(name, *shape, int(FLAGS.batches[0])), FLAGS.trainer_steps, FLAGS.data_dir
      )
    )
  if FLAGS.trainer_config is not None:
    makers.append(lambda name: _with_method(FLAGS.trainer_config, name))
  for make in makers:
    for name in FLAGS.methods:
      config = make(name)
      r = throughput.trainer_rates(config, FLAGS.repeats, runs=FLAGS.trainer_runs)
      print(
        f"trainer vs step, {name}, batch {config.train.batch_size}, {config.data.size}px "
        f"{config.data.name}: epochs {r['epochs']:.1f} images/s ({r['epochs'] / r['step']:.0%} "
        f"of the step's {r['step']:.1f}); whole run {r['run']:.1f} images/s, validations, "
        f"audit passes and checkpoints included ({r['run_share']:.0%} of it in bare steps)",
        flush=True,
      )


def _with_method(config, name: str):
  copy = config.copy_and_resolve_references()
  copy.method, copy.meta.route = _step(name)
  return copy


def _check_flags() -> None:
  known = set(methods.NAMES) | set(ROUTED)
  unknown = sorted(set(FLAGS.methods) - known)
  if unknown or not FLAGS.methods:
    raise ConfigError(f"--methods: unknown {unknown or 'empty list'}, choose from {sorted(known)}")
  for name in ("batches", "sizes", "widths", "channels"):
    if not FLAGS[name].value or not all(v.isdigit() and int(v) > 0 for v in FLAGS[name].value):
      raise ConfigError(f"--{name}: positive integers, got {FLAGS[name].value}")


def main(argv):
  del argv
  _check_flags()
  peak = throughput.peak_tflops(FLAGS.dtype, FLAGS.peak_tflops)
  with_torch = FLAGS.torch and torch_ref is not None
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {FLAGS.dtype}, "
    f"median of {FLAGS.repeats}, peak {peak or '?'} TFLOP/s"
  )
  measured: list[tuple[Any, dict, Any]] = []
  for shape in _shapes():
    print(f"\n{shape[0]}px, width {shape[1]}, {shape[2]} ch, {FLAGS.dtype}\n")
    print(
      "| method | batch | ms/step | CPU ms/step | images/s | peak memory (GiB) "
      "| GFLOP/step (CPU XLA) | MFU |\n|---|---|---|---|---|---|---|---|"
    )
    seconds = _step_rows(shape, peak)
    measured.append((shape, seconds, _torch_rows(shape) if with_torch else None))
  print()
  for shape, seconds, torch_s in measured:
    for line in ratio_lines(shape, seconds, torch_s):
      print(line)
  target = next((m for m in measured if m[0] == (128, 32, 3)), measured[-1])
  batch = int(FLAGS.batches[0])
  if ("ce", batch) in target[1] and ("l2b_jvp", batch) in target[1]:
    print(f"meta/plain ratio: {target[1]['l2b_jvp', batch] / target[1]['ce', batch]:.2f}")
  if FLAGS.audit:
    _audit_lines(_shapes()[0])
  _trainer_lines(_shapes()[0])
  if FLAGS.max_batch:
    for name in FLAGS.methods:
      method, _ = _step(name)
      for size, width, ch in _shapes():
        largest = throughput.max_batch(method, size, width, ch, FLAGS.dtype)
        print(f"largest batch at {size}px, width {width}, {ch} ch: {name} {largest}")


def run():
  """Console-script entry (pyproject `metadcseg-speed`)."""
  define_flags()
  cli.run(main)


def translate(
  args: Sequence[str], renamed: Mapping[str, str], defaults: Sequence[str] = ()
) -> list[str]:
  """An old command's arguments as `metadcseg-speed`'s: flags renamed, and its own defaults
  where they differ from this command's, for the flags not given.

  >>> translate(["--size=64", "--notorch"], {"size": "sizes"}, ["--sizes=128", "--noflops"])
  ['--sizes=64', '--notorch', '--noflops']
  """
  out, given = [], set()
  for arg in args:
    name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
    if name:
      bare = name[2:] if name.startswith("no") and name[2:] in renamed.values() else name
      given.add(renamed.get(bare, bare))
      arg = f"--{renamed.get(name, name)}{sep}{value}"
    out.append(arg)
  for default in defaults:
    name = default[2:].partition("=")[0]
    if name not in given and not (name.startswith("no") and name[2:] in given):
      out.append(default)
  return out


def run_renamed(old: str, renamed: Mapping[str, str], defaults: Sequence[str] = ()) -> None:
  """The entry of an old command name: one line on stderr, then `metadcseg-speed` with the
  equivalent flags (`translate`)."""
  args = translate(sys.argv[1:], renamed, defaults)
  print(
    f"{old} is now metadcseg-speed (the old name goes in the next release): "
    + " ".join(["metadcseg-speed", *map(shlex.quote, args)]),
    file=sys.stderr,
    flush=True,
  )
  sys.argv = [os.path.join(os.path.dirname(sys.argv[0]), "metadcseg-speed"), *args]
  run()


if __name__ == "__main__":
  run()
