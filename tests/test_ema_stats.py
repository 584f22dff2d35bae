"""Tests of the EMA weights' recomputed BatchNorm statistics (SWA's bn_update) and of the
trainer's use of them.

The first BatchNorm of the network (conv0_0/bn1) sees the first convolution of the raw images,
whatever the batch: its recomputed statistics must be the mean and the population variance of
that convolution's output over every pixel of every image, however the images are batched.
Deeper layers normalise with their batch's statistics, so only the first layer has a
batch-independent answer to test against.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from metadcseg_jax import methods


@pytest.fixture(scope="module")
def method_and_state():
  config = tiny.get_config()
  config.method = "ce"
  method = methods.create(config, steps_per_epoch=2)
  state = method.init_state(jax.random.PRNGKey(0))
  # EMA weights that differ from the raw ones, so a mix-up of the two would show.
  state = state.replace(ema_params=jax.tree.map(lambda p: p * 1.1 + 0.01, state.params))
  images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 1), jnp.float32)
  return method, state, images


def _first_conv_output(method, params, images):
  conv = params["conv0_0"]["conv1"]
  y = jax.lax.conv_general_dilated(
    images, conv["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return np.asarray(y + conv["bias"], np.float64)


def test_first_layer_statistics_are_the_population_moments(method_and_state):
  method, state, images = method_and_state
  y = _first_conv_output(method, state.ema_params, images)
  want_mean, want_var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
  for split in ([images], [images[:4], images[4:]], [images[i : i + 2] for i in range(0, 8, 2)]):
    new = method.recompute_ema_batch_stats(state, lambda split=split: iter(split))
    bn = new.ema_batch_stats["conv0_0"]["bn1"]
    np.testing.assert_allclose(bn["mean"], want_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn["var"], want_var, rtol=1e-4, atol=1e-6)
    # Only the EMA statistics change.
    assert jax.tree.all(jax.tree.map(np.array_equal, new.batch_stats, state.batch_stats))
    assert jax.tree.all(jax.tree.map(np.array_equal, new.ema_params, state.ema_params))


def test_population_variance_is_not_the_mean_of_batch_variances(method_and_state):
  # Two batches with different means: the pooled variance includes the spread of the means.
  method, state, images = method_and_state
  shifted = [images[:4], images[4:] + 3.0]
  new = method.recompute_ema_batch_stats(state, lambda: iter(shifted))
  y = _first_conv_output(method, state.ema_params, jnp.concatenate(shifted))
  np.testing.assert_allclose(
    new.ema_batch_stats["conv0_0"]["bn1"]["var"], y.var(axis=(0, 1, 2)), rtol=1e-4
  )


def test_two_network_methods_recompute_both(method_and_state):
  _, _, images = method_and_state
  config = tiny.get_config()
  config.method = "coteaching"
  method = methods.create(config, steps_per_epoch=2)
  state = method.init_state(jax.random.PRNGKey(0))
  new = method.recompute_ema_batch_stats(state, lambda: iter([images]))
  for k in range(2):
    y = _first_conv_output(method, state.ema_params[k], images)
    np.testing.assert_allclose(
      new.ema_batch_stats[k]["conv0_0"]["bn1"]["mean"],
      y.mean(axis=(0, 1, 2)),
      rtol=1e-4,
      atol=1e-6,
    )
