r"""Relative error of the meta-gradients and meta-weights against a float64 CPU reference.

The per-pixel meta-gradients Ga, Gb (MetaDCSeg Eq. 28, Eq. 29) are small differences of products;
the precision of the convolutions decides how many of their digits survive. On identical
parameters and batches (U-Net++, random data, the first meta step and after one real step
trained on the same batch), `measure` gives ||v - v64|| / ||v64|| for v in (Ga, Gb, â, b̂) and
each of `SETTINGS`: float32 at the backend's default precision (TF32 on an NVIDIA GPU), float32 at
`highest` (`config.meta.precision`), bfloat16 computation (`config.model.dtype`). The float64
reference always runs on the CPU.

    errors = precision.measure(size=64, width=8, channels=1, batch=4)
    # {"float32, default precision, step 0": {"ga": ..., "gb": ..., "a_hat": ...}, ...}

`python -m experiments.meta_precision` prints them as a table; the GPU report's second section
is this measurement (`metadcseg_jax.tools.gpu_report`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from metadcseg_jax import configs
from metadcseg_jax import methods


# (label, model dtype, meta precision, meta path in the model's own dtype instead of the
# float32 twin a half-precision model gets).
SETTINGS = (
  ("float32, default precision", "float32", "default", False),
  ("float32, highest", "float32", "highest", False),
  ("bfloat16 model, float32 meta path (the trainer's)", "bfloat16", "highest", False),
  ("bfloat16 meta path (no float32 twin)", "bfloat16", "highest", True),
)
FIELDS = ("ga", "gb", "a_hat", "b_hat")


def _method(dtype: str, precision: str, size: int, width: int, channels: int, batch: int):
  config = configs.default_config()
  config.method = "l2b"
  config.data.size, config.data.channels = size, channels
  config.model.width = width
  config.model.dtype = dtype
  config.meta.precision = precision
  config.train.batch_size = config.train.meta_batch_size = batch
  return methods.create(config, steps_per_epoch=100)


def _cast(tree, dtype):
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def _weights(fn, state, feed):
  """`fn` = jax.jit(method.weights): the fields of FIELDS as float64 numpy."""
  mo = fn(state, feed["image"], feed["noisy_label"], feed["meta_image"], feed["meta_label"])
  return {k: np.asarray(getattr(mo, k), np.float64) for k in FIELDS}


def measure(size: int, width: int, channels: int, batch: int) -> dict[str, dict[str, float]]:
  """The meta-weights' relative error against float64, per setting, at the initial state and
  after one real step.

  Args:
    size: image size (square).
    width: U-Net++ base width.
    channels: input channels.
    batch: training and meta batch.

  Returns:
    {"<setting label>, step 0" | "..., step 1": {field of `FIELDS`: ||v - v64|| / ||v64||}}.
  """
  shape = (size, width, channels, batch)
  m32 = _method("float32", "highest", *shape)
  feed = methods.example_feed(m32, size=size, channels=channels, batch=batch)
  states = {"step 0": m32.init_state(jax.random.PRNGKey(0))}
  step = jax.jit(m32.train_step("main"))
  states["step 1"], _ = step(
    states["step 0"], {k: jnp.asarray(v) for k, v in feed.items()}, jax.random.PRNGKey(1)
  )
  cpu = jax.devices("cpu")[0]
  out = {}
  with jax.enable_x64(True):
    m64 = _method("float64", "highest", *shape)
    fn64 = jax.jit(m64.weights)
    refs = {}
    for name, state in states.items():
      s64 = jax.device_put(_cast(jax.device_get(state), jnp.float64), cpu)
      f64 = jax.device_put(
        {k: np.asarray(v, np.float64) if v.dtype == np.float32 else v for k, v in feed.items()}, cpu
      )
      refs[name] = _weights(fn64, s64, f64)
  for label, dtype, precision, own_dtype in SETTINGS:
    m = _method(dtype, precision, *shape)
    if own_dtype:
      m.meta_model = m.model
    fn = jax.jit(m.weights)
    for name, state in states.items():
      got = _weights(fn, state, feed)
      out[f"{label}, {name}"] = {
        k: float(np.linalg.norm(got[k] - refs[name][k]) / max(np.linalg.norm(refs[name][k]), 1e-30))
        for k in FIELDS
      }
  return out
