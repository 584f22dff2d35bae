"""Data parallel training checked against one-device training on the global batch.

For a method: a few train steps from the same state on the same global batches, once on a
1-device mesh and once on all devices (the trainer's own jitted steps,
`train.compiled_for(..., parallel)`), then the relative difference ||a - b|| / ||b|| of every
parameter, BatchNorm statistic and optimizer buffer, of each step's metrics and of the
method's per-pixel maps (`explain`: MetaDCSeg's and L2B's meta-weights, DCD weights).
`experiments/parallel_check.py` prints it for each method; tests/test_parallel.py runs it on 4
CPU devices.
"""

import jax
import ml_collections
import numpy as np

from metadcseg_jax import methods
from metadcseg_jax import parallel
from metadcseg_jax.tools import throughput
from metadcseg_jax.training import train


def config_for(
  method: str, size: int, width: int, batch: int, *, model: str = "unet++", x64: bool = False
) -> ml_collections.ConfigDict:
  """The config of the comparison: 1 channel, 2 epochs (1 of warm-up), the two-network
  methods dropping pixels from their first step on.

  Args:
    method: the method.
    size, width, batch: image size, U-Net++ width and batch.
    model: the backbone.
    x64: float64 throughout (the comparison free of float32 rounding).
  """
  config = throughput.config_for(method, size, width, 1, batch, "float64" if x64 else "float32")
  config.model.name = model
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
  """`len(feeds)` steps of the last phase on `par`: (final state, metrics, maps) as numpy.

  Args:
    config: `config_for`'s config.
    par: the device mesh.
    feeds: the global batches, one per step.
    steps_per_epoch: the steps per epoch the method is built for.
  """
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
  (parameters, statistics and optimizer state as whole trees; metrics and maps each).

  Args:
    method: the method.
    size, width, batch: image size, U-Net++ width and batch (`config_for`).
    steps: the steps run on each mesh.
    model: the backbone.
    x64: float64 throughout.
  """
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
