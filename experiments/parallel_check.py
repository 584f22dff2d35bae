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
"maps": e, "devices": n}} (the largest relative difference of each kind).
"""

import json
import pathlib
import time

from absl import flags
import jax
import ml_collections
import numpy as np

from experiments.configs import default as default_config
from metadcseg_jax import cli
from metadcseg_jax import methods
from metadcseg_jax import parallel
from metadcseg_jax import train

FLAGS = flags.FLAGS


def config_for(
  method: str, size: int, width: int, batch: int, *, model: str = "unet++", x64: bool = False
) -> ml_collections.ConfigDict:
  config = default_config.get_config()
  config.method = method
  config.data.size = size
  config.model.name = model
  config.model.width = width
  config.model.dtype = "float64" if x64 else "float32"
  config.train.batch_size = config.train.meta_batch_size = batch
  config.train.num_epochs = 2
  config.train.warmup_epochs = 1
  # Two-network methods: drop pixels from the first step on, so the selection is compared.
  config.coteach.num_gradual = 1
  config.coteach.forget_rate = 0.2
  return config


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _tree_rel(tree_a, tree_b) -> float:
  """||a - b|| / ||b|| over all leaves together (a leaf that is ~0, such as the gradient of a
  bias before BatchNorm, is rounding noise on its own)."""
  diff = sum(
    float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))
  )
  norm = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(tree_b))
  return float(np.sqrt(diff) / max(np.sqrt(norm), 1e-30))


def _max_rel(tree_a, tree_b) -> float:
  errs = jax.tree.leaves(jax.tree.map(_rel, tree_a, tree_b))
  return max(errs, default=0.0)


def run_steps(config, par: parallel.Parallel, feeds, steps_per_epoch: int):
  """`len(feeds)` steps of the last phase on `par`: (final state, metrics, maps) as numpy."""
  compiled = train.compiled_for(config, steps_per_epoch, par)
  m = compiled.method
  step = compiled.step(m.phase(config.train.num_epochs - 1))
  state = m.init_state(jax.random.PRNGKey(0))
  if config.model.dtype == "float64":  # flax starts BatchNorm statistics in float32
    state = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, state)
  state = par.replicate(state)
  metrics = []
  for i, feed in enumerate(feeds):
    state, out = step(state, par.global_batch(feed), jax.random.PRNGKey(i))
    metrics.append(par.fetch(out))
  # explain is jitted inside; its inputs' shardings carry it onto the mesh. Only the
  # meta-weighted methods have per-pixel weights worth its compile.
  maps = (
    [np.asarray(p.values) for p in m.explain(state, par.global_batch(feeds[0]))]
    if m.uses_meta_batch
    else []
  )
  state = par.fetch(state)
  return state, metrics, maps


def check(
  method: str,
  *,
  size: int,
  width: int,
  batch: int,
  steps: int,
  model: str = "unet++",
  x64: bool = False,
) -> dict[str, float]:
  """Largest relative differences, all devices vs one, after `steps` steps of `method`
  (parameters, statistics and optimizer state as whole trees; metrics and maps each)."""
  config = config_for(method, size, width, batch, model=model, x64=x64)
  steps_per_epoch = 1  # the last phase from the first step on (warm-up epoch counted)
  probe = methods.create(config, steps_per_epoch=steps_per_epoch)
  cast = (lambda x: x.astype(np.float64) if x.dtype == np.float32 else x) if x64 else (lambda x: x)
  feeds = [
    {
      k: cast(v)
      for k, v in methods.example_feed(probe, size=size, channels=1, batch=batch, seed=s).items()
    }
    for s in range(steps)
  ]
  one = parallel.make_parallel(ml_collections.ConfigDict({"data": 1}))
  every = parallel.make_parallel(ml_collections.ConfigDict({"data": -1}))
  s1, m1, p1 = run_steps(config, one, feeds, steps_per_epoch)
  sn, mn, pn = run_steps(config, every, feeds, steps_per_epoch)
  nan_safe = lambda xs: [np.nan_to_num(x, nan=0.0) for x in xs]
  return {
    "devices": every.num_devices,
    "params": _tree_rel(sn.params, s1.params),
    "batch_stats": _tree_rel(sn.batch_stats, s1.batch_stats),
    "opt_state": _tree_rel(sn.opt_state, s1.opt_state),
    "metrics": _max_rel(mn, m1),
    "maps": _max_rel(nan_safe(pn), nan_safe(p1)),
  }


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
    out[method] = check(
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
