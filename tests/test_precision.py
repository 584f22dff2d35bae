"""Precision of the meta step: `config.meta.precision` reaches every convolution of the meta
path, and a bfloat16 model takes its meta-weights from a float32 twin (bf16 meta-gradients are
50-70% off, BUILD_NOTES.md, "Meta-weights in float32 and bfloat16 against float64")."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default as default_config
from metadcseg_jax import methods

SIZE, BATCH = 16, 2


def _method(dtype="float32", precision="highest"):
  config = default_config.get_config()
  config.method = "l2b"
  config.model.name, config.model.width, config.model.dtype = "unet", 2, dtype
  config.data.size = SIZE
  config.meta.precision = precision
  config.train.batch_size = config.train.meta_batch_size = BATCH
  return methods.create(config, steps_per_epoch=10)


@pytest.fixture(scope="module")
def feed():
  m = _method()
  return {
    k: jnp.asarray(v)
    for k, v in methods.example_feed(m, size=SIZE, channels=1, batch=BATCH).items()
  }


def _convs(fn, m, feed, field="precision"):
  """`field` ("precision" or "dtype" of the lhs) of every convolution `fn(state, ...)` traces."""
  state = jax.eval_shape(lambda: m.init_state(jax.random.PRNGKey(0)))
  args = (feed["image"], feed["noisy_label"], feed["meta_image"], feed["meta_label"])
  jaxpr = jax.make_jaxpr(fn)(state, *args)
  found = []

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append(eqn.params["precision"] if field == "precision" else eqn.invars[0].aval.dtype)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return found


def test_meta_precision_reaches_every_convolution(feed):
  m = _method(precision="highest")
  highest = _convs(m.weights, m, feed)
  assert len(highest) > 10  # forward, tangent, meta forward and backward
  assert all(p is not None and jax.lax.Precision.HIGHEST in tuple(p) for p in highest)
  m = _method(precision="default")
  assert all(p is None for p in _convs(m.weights, m, feed))


def test_bf16_model_takes_float32_meta_weights_and_trains(feed):
  m16 = _method("bfloat16")
  # The meta path (its forward, tangent, meta forward and backward) is float32 throughout;
  # the real step's forward and backward are bf16.
  assert set(_convs(m16.weights, m16, feed, "dtype")) == {jnp.dtype("float32")}
  step_fn = lambda state, *args: m16.train_step("main")(
    state,
    dict(zip(("image", "noisy_label", "meta_image", "meta_label"), args)),
    jax.random.PRNGKey(0),
  )
  assert set(_convs(step_fn, m16, feed, "dtype")) == {jnp.dtype("float32"), jnp.dtype("bfloat16")}
  state = m16.init_state(jax.random.PRNGKey(0))
  new_state, metrics = jax.jit(m16.train_step("main"))(state, feed, jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new_state.params, state.params))
  assert float(moved) > 0
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
