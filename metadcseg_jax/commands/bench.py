"""Times one training step of each method after compilation (`metadcseg-bench`).

    metadcseg-bench                       # the full table (CPU: ~10-20 min)
    metadcseg-bench --sizes=64 --widths=8 --channels=1 --repeats=3   # quick look

Prints a markdown table (median of --repeats timed runs, after one compile+warm-up call per
function), then the ratios; the last line is `meta/plain ratio: X` for the default route
(jvp) at 128x128, 3 channels, width 32 (or the last configuration measured if that one was not).
If torch is importable, also times an L2B-style PyTorch step on an identically shaped U-Net++
(`metadcseg_jax.tools.torch_ref`) and prints the JAX/PyTorch ratio per configuration.
"""

from absl import flags
import jax

from metadcseg_jax import cli
from metadcseg_jax import methods
from metadcseg_jax.tools import throughput
from metadcseg_jax.errors import ConfigError

try:  # the extra `bench`
  from metadcseg_jax.tools import torch_ref
except ImportError:
  torch_ref = None

_SIZES = flags.DEFINE_list("sizes", ["128"], "Image sizes.")
_WIDTHS = flags.DEFINE_list("widths", ["16", "32"], "U-Net++ base widths.")
_CHANNELS = flags.DEFINE_list("channels", ["1", "3"], "Input channels.")
_BATCH = flags.DEFINE_integer("batch", 2, "Training (and meta) batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per function (median reported).")
_STEPS = flags.DEFINE_list(
  "steps",
  ["ce", "l2b_jvp", "l2b_reverse", "metadcseg"],
  f"Which steps to time: any of {sorted(('l2b_jvp', 'l2b_reverse', *methods.NAMES))}.",
)
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch L2B step if torch imports.")


def time_jax_step(method, route, size, width, channels, batch, repeats):
  """Median seconds of one jitted train step (state donated, as in training)."""
  config = throughput.config_for(method, size, width, channels, batch, route=route)
  r = throughput.time_step(config, repeats)
  return r["seconds"], r["compile_s"]


def main(argv):
  del argv
  reference = torch_ref if _TORCH.value else None  # the PyTorch step, if asked for and installed
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"batch {_BATCH.value}, median of {_REPEATS.value}"
  )
  names = {n: (n, "jvp") for n in methods.NAMES}
  names.update(l2b_jvp=("l2b", "jvp"), l2b_reverse=("l2b", "reverse"))
  unknown = sorted(set(_STEPS.value) - set(names))
  if unknown:
    raise ConfigError(f"--steps: unknown {unknown}, choose from {sorted(names)}")
  header = "| size | width | ch | " + " | ".join(f"{s} (s)" for s in _STEPS.value)
  header += " | torch plain (s) | torch L2B (s) |" if reference else " |"
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  ratios = []
  for size in map(int, _SIZES.value):
    for width in map(int, _WIDTHS.value):
      for ch in map(int, _CHANNELS.value):
        row = {}
        for s in _STEPS.value:
          row[s], _ = time_jax_step(*names[s], size, width, ch, _BATCH.value, _REPEATS.value)
        cells = [f"{row[s]:.3f}" for s in _STEPS.value]
        torch_row = None
        if reference:
          torch_row = reference.time_steps(size, width, ch, _BATCH.value, _REPEATS.value)
          cells += [f"{torch_row['plain']:.3f}", f"{torch_row['l2b']:.3f}"]
        print(f"| {size} | {width} | {ch} | " + " | ".join(cells) + " |", flush=True)
        ratios.append(((size, width, ch), row, torch_row))
  print()
  target = next((r for r in ratios if r[0] == (128, 32, 3)), ratios[-1])
  for key, row, torch_row in ratios:
    parts = [f"{s}/ce {row[s] / row['ce']:.2f}" for s in _STEPS.value if s != "ce" and "ce" in row]
    if torch_row:
      if "l2b_jvp" in row:
        parts.append(f"torch L2B / JAX l2b_jvp {torch_row['l2b'] / row['l2b_jvp']:.2f}")
      if "ce" in row:
        parts.append(f"torch plain / JAX ce {torch_row['plain'] / row['ce']:.2f}")
    print(f"size {key[0]} width {key[1]} ch {key[2]}: " + ", ".join(parts))
  _, row, _ = target
  if "ce" in row and "l2b_jvp" in row:
    print(f"meta/plain ratio: {row['l2b_jvp'] / row['ce']:.2f}")


def run():
  """Console-script entry (pyproject `metadcseg-bench`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
