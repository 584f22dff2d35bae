"""Where the time of an `l2b` step goes: its parts timed separately.

    python -m experiments.profile_meta --sizes=128 --widths=32 --channels=3

Times (median of --repeats, after compilation): the train-mode forward on the training batch,
its forward+backward (the plain step without the optimizer), the virtual step + meta
forward/backward at θ̂ (on the meta batch), the JVP of the training forward, `meta_weights`
(jvp route: forward + meta + JVP) and the whole l2b step; plus XLA's FLOP count of the plain and
the l2b step.
"""

import functools
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from metadcseg_jax import methods
from metadcseg_jax.core import losses
from metadcseg_jax.core import meta
from metadcseg_jax.tools import throughput

# metadcseg-speed's shape flags (--sizes, --widths, --channels; the first value of each list is
# profiled), the batch and the repeats.
flags.DEFINE_list("sizes", ["128"], "Image sizes (the first is profiled).")
flags.DEFINE_list("widths", ["32"], "U-Net++ base widths (the first is profiled).")
flags.DEFINE_list("channels", ["3"], "Input channels (the first is profiled).")
flags.DEFINE_integer("batch", 2, "Training (and meta) batch size.")
flags.DEFINE_integer("repeats", 5, "Timed runs per function (median reported).")
FLAGS = flags.FLAGS


def _time(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _flops(fn, *args):
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get("flops", float("nan"))


def main(argv):
  del argv
  config = throughput.config_for(
    "l2b", int(FLAGS.sizes[0]), int(FLAGS.widths[0]), int(FLAGS.channels[0]), FLAGS.batch
  )
  method = methods.create(config, steps_per_epoch=100)
  model, optimizer = method.model, method.optimizer
  state = method.init_state(jax.random.PRNGKey(0))
  batch = jax.tree.map(
    jnp.asarray,
    methods.example_feed(
      method, size=int(FLAGS.sizes[0]), channels=int(FLAGS.channels[0]), batch=FLAGS.batch
    ),
  )
  x, y, xv, yv = batch["image"], batch["noisy_label"], batch["meta_image"], batch["meta_label"]
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def fwd(p, x):
    return model.apply(
      {"params": p, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    )[0][0]

  def ce(p, x, y):
    return losses.mean_ce(fwd(p, x), y)

  def meta_part(p, opt_state):
    upd, _ = optimizer.base.update(
      jax.tree.map(jnp.zeros_like, p), optimizer.base_state(opt_state), p
    )
    return jax.grad(ce)(optax.apply_updates(p, upd), xv, yv)

  def jvp_part(p, v):
    return jax.jvp(functools.partial(fwd, x=x), (p,), (v,))[1]

  mw = functools.partial(
    meta.meta_weights, model.apply, optimizer=optimizer, options=meta.MetaOptions(route="jvp")
  )
  parts = {
    "train forward": (jax.jit(fwd), (state.params, x)),
    "train forward+backward": (jax.jit(jax.grad(ce)), (state.params, x, y)),
    "virtual step + meta fwd/bwd": (jax.jit(meta_part), (state.params, state.opt_state)),
    "JVP of train forward": (jax.jit(jvp_part), (state.params, state.params)),
    "meta_weights (jvp route)": (
      jax.jit(lambda v, s: mw(v, opt_state=s, x=x, y=y, xv=xv, yv=yv)),
      (variables, state.opt_state),
    ),
  }
  size, width, channels = int(FLAGS.sizes[0]), int(FLAGS.widths[0]), int(FLAGS.channels[0])
  print(
    f"U-Net++ width {width}, {size}x{size}x{channels}, batch {FLAGS.batch}, "
    f"median of {FLAGS.repeats}, {jax.devices()[0].device_kind}"
  )
  print("| part | seconds |\n|---|---|")
  for name, (fn, args) in parts.items():
    print(f"| {name} | {_time(fn, *args):.3f} |", flush=True)
  for name in ("ce", "l2b"):
    config.method = name
    step = jax.jit(methods.create(config, steps_per_epoch=100).train_step("main"))
    args = (state, batch, jax.random.PRNGKey(0))
    print(f"| full {name} step | {_time(step, *args):.3f} |  GFLOP {_flops(step, *args) / 1e9:.2f}")


if __name__ == "__main__":
  app.run(main)
