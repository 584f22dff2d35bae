r"""Relative error of the meta-gradients and meta-weights against a float64 CPU reference.

The per-pixel meta-gradients Ga, Gb (MetaDCSeg Eq. 28, Eq. 29) are small differences of products;
the precision of the convolutions decides how many of their digits survive. On identical
parameters and batches (U-Net++, random data, the first meta step and after one real step
trained on the same batch), this measures ||v - v64|| / ||v64|| for v in (Ga, Gb, â, b̂) and
each setting: float32 at the backend's default precision (TF32 on an NVIDIA GPU), float32 at
`highest` (`config.meta.precision`), bfloat16 computation (`config.model.dtype`).

    python -m experiments.meta_precision                   # CPU: default = highest
    python -m experiments.meta_precision --size=256 --width=32 --channels=3 --batch=8   # GPU

The float64 reference always runs on the CPU.
"""

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from metadcseg_jax import cli
from metadcseg_jax import configs
from metadcseg_jax import methods

FLAGS = flags.FLAGS


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
  """{setting: {field: relative error}} at the initial state and after one real step."""
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


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  flags.DEFINE_integer("size", 64, "Image size.")
  flags.DEFINE_integer("width", 8, "U-Net++ base width.")
  flags.DEFINE_integer("channels", 1, "Input channels.")
  flags.DEFINE_integer("batch", 4, "Batch and meta batch size.")


def main(argv):
  del argv
  out = measure(FLAGS.size, FLAGS.width, FLAGS.channels, FLAGS.batch)
  print(
    f"{jax.devices()[0].device_kind} ({jax.default_backend()}), U-Net++ width {FLAGS.width}, "
    f"{FLAGS.size}px, {FLAGS.channels} ch, batch {FLAGS.batch}; relative error vs float64 (CPU)"
  )
  print("| setting | Ga | Gb | â | b̂ |\n|---|---|---|---|---|")
  for label, errs in out.items():
    print(f"| {label} | " + " | ".join(f"{errs[k]:.2e}" for k in FIELDS) + " |")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
