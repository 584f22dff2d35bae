r"""Where the training step's time goes on this machine, per kind of XLA operation.

    python -m experiments.profile_step --methods=ce,l2b,metadcseg --size=64 --width=8 \
        --channels=1 --batch=4

For each method: one jitted step (the benchmark preset's shapes by default) profiled with
`metadcseg_jax.tools.profiling` (XLA's per-operation trace), a table of milliseconds per step by
scope (meta-gradient, DCD, the rest of the step) and kind (convolution forward/backward,
BatchNorm, relayout, other), with the convolutions' FLOP rate, the memory each category
touches, and its floor: the least time its FLOPs and bytes could take at this core's measured
peak (a large matrix product) and copy bandwidth (`profiling.roofline`).
"""

import os

from absl import app
from absl import flags
import jax

from metadcseg_jax.tools import profiling
from metadcseg_jax.tools import throughput

_METHODS = flags.DEFINE_list("methods", ["ce", "l2b", "metadcseg"], "Methods to profile.")
_SIZE = flags.DEFINE_integer("size", 64, "Image size.")
_WIDTH = flags.DEFINE_integer("width", 8, "U-Net++ base width.")
_CHANNELS = flags.DEFINE_integer("channels", 1, "Input channels.")
_BATCH = flags.DEFINE_integer("batch", 4, "Training (and meta) batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Profiled steps.")


def main(argv):
  del argv
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} devices={jax.devices()}")
  roof = profiling.roofline()
  print(
    f"This device: {roof['peak_gflops']:.1f} GFLOP/s (float32 matrix product), "
    f"{roof['copy_gbps']:.1f} GB/s (copy)\n",
    flush=True,
  )
  for method in _METHODS.value:
    config = throughput.config_for(
      method, _SIZE.value, _WIDTH.value, _CHANNELS.value, _BATCH.value, "float32"
    )
    m, step, feed = throughput.step_and_inputs(config)
    state = m.init_state(jax.random.PRNGKey(0))
    profile = profiling.profile_step(step, state, jax.device_put(feed), repeats=_REPEATS.value)
    title = f"{method}, {_SIZE.value} px, width {_WIDTH.value}, batch {_BATCH.value}"
    print(profiling.markdown(title, profile, roof), "\n", flush=True)


if __name__ == "__main__":
  app.run(main)
