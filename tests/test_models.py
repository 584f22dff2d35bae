"""Tests for metadcseg_jax.core.models (U-Net, U-Net++)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadcseg_jax.core import models
from metadcseg_jax.core.models import unet as unet_lib

SIZE = 32
BATCH = 2
# name -> (build_model kwargs); small widths, distinct L and D to catch swaps.
CONFIGS = {
  "unet": dict(name="unet", num_classes=3, width=8),
  "unet++": dict(name="unet++", num_classes=2, width=4),
  "unet++ds": dict(name="unet++", num_classes=2, width=4, deep_supervision=True),
}


def _numpy_variables(model, x, seed):
  """Variables with model.init's structure, filled by numpy.

  model.init's dozens of threefry draws take tens of seconds to compile on a
  2-core CPU; its structure comes from jax.eval_shape (traced, not compiled)
  and the values from numpy: PyTorch-style uniform conv weights, fresh
  BatchNorm (scale 1, bias 0, running mean 0, running var 1).
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    key = path[-1].key
    if key == "kernel":
      bound = 1.0 / math.sqrt(np.prod(leaf.shape[:-1]))
      return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    if key == "bias" and path[-2].key.startswith(("conv", "final")):
      return rng.uniform(-0.1, 0.1, leaf.shape).astype(np.float32)
    if key in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)  # BN bias, running mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def x():
  return jnp.asarray(
    np.random.default_rng(0).standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
  )


@pytest.fixture(scope="module")
def setups(x):
  """name -> (config, model, variables, train_fn, eval_fn), jitted once per model."""
  out = {}
  for seed, (name, cfg) in enumerate(CONFIGS.items()):
    model = models.build_model(**cfg)
    variables = _numpy_variables(model, x, seed)
    train_fn = jax.jit(
      lambda v, x, model=model: model.apply(
        v, x, train=True, mutable=["batch_stats", "intermediates"]
      )
    )
    # Eval with batch_stats mutable so the test can see that nothing changes.
    eval_fn = jax.jit(
      lambda v, x, model=model: model.apply(v, x, train=False, mutable=["batch_stats"])
    )
    out[name] = (cfg, model, variables, train_fn, eval_fn)
  return out


def _head(features, params):
  """A 1x1 conv by hand: features (B,H,W,D) @ kernel (1,1,D,L) + bias."""
  return jnp.einsum("bhwd,dl->bhwl", features, params["kernel"][0, 0]) + params["bias"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shapes_and_dtypes(setups, x, name):
  cfg, model, variables, train_fn, eval_fn = setups[name]
  want_logits = (BATCH, SIZE, SIZE, cfg["num_classes"])
  want_features = (BATCH, SIZE, SIZE, cfg["width"])
  for fn in (train_fn, eval_fn):
    (logits, features), _ = fn(variables, x)
    assert logits.shape == want_logits and logits.dtype == jnp.float32
    assert features.shape == want_features and features.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
  # The plain eval call (no mutable collections) returns the pair itself.
  logits, features = jax.eval_shape(lambda: model.apply(variables, x, train=False))
  assert logits.shape == want_logits and features.shape == want_features


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_stats_fixed_in_eval_and_updated_in_train(setups, x, name):
  _, _, variables, train_fn, eval_fn = setups[name]
  old = variables["batch_stats"]
  _, eval_state = eval_fn(variables, x)
  jax.tree.map(np.testing.assert_array_equal, eval_state["batch_stats"], old)
  _, train_state = train_fn(variables, x)
  changed = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != b)), train_state["batch_stats"], old
  )
  assert all(jax.tree.leaves(changed)), changed


def test_batchnorm_momentum_matches_pytorch(setups, x):
  # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch statistic.
  _, _, variables, train_fn, _ = setups["unet++"]
  params = variables["params"]["conv0_0"]["conv1"]
  conv = (
    jax.lax.conv_general_dilated(
      x, params["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + params["bias"]
  )
  conv = np.asarray(conv, np.float64)
  _, state = train_fn(variables, x)
  stats = state["batch_stats"]["conv0_0"]["bn1"]
  np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv.var((0, 1, 2)), rtol=1e-4)


@pytest.mark.parametrize("name", ["unet", "unet++"])
def test_eval_uses_running_stats_train_uses_batch_stats(setups, x, name):
  # Changing image 1 leaves image 0's eval output alone but, through the
  # batch statistics, changes its train output.
  _, _, variables, train_fn, eval_fn = setups[name]
  x2 = x.at[1].multiply(3.0)
  (eval_a, _), _ = eval_fn(variables, x)
  (eval_b, _), _ = eval_fn(variables, x2)
  np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-5)
  (train_a, _), _ = train_fn(variables, x)
  (train_b, _), _ = train_fn(variables, x2)
  assert np.max(np.abs(train_a[0] - train_b[0])) > 1e-3


@pytest.mark.parametrize("name", ["unet", "unet++"])
def test_features_are_input_of_the_classifier(setups, x, name):
  _, _, variables, _, eval_fn = setups[name]
  (logits, features), _ = eval_fn(variables, x)
  np.testing.assert_allclose(
    logits, _head(features, variables["params"]["final"]), rtol=1e-4, atol=1e-5
  )


def test_deep_supervision_returns_mean_of_heads(setups, x):
  _, _, variables, train_fn, _ = setups["unet++ds"]
  assert "final" not in variables["params"]
  (logits, features), state = train_fn(variables, x)
  heads = state["intermediates"]["head_logits"]
  assert len(heads) == 4
  assert all(h.shape == logits.shape and h.dtype == jnp.float32 for h in heads)
  np.testing.assert_allclose(logits, sum(heads) / 4.0, rtol=1e-5, atol=1e-6)
  # Head j reads X^{0,j}; the fourth reads the returned features X^{0,4}.
  np.testing.assert_allclose(
    heads[3], _head(features, variables["params"]["final4"]), rtol=1e-4, atol=1e-5
  )
  assert np.max(np.abs(heads[0] - heads[3])) > 1e-3


def _vgg_block_params(c_in, c_mid, c_out):
  # conv3x3(c_in->c_mid)+bias, BN(c_mid) scale+bias, conv3x3(c_mid->c_out)+bias, BN(c_out).
  return (9 * c_in * c_mid + c_mid) + 2 * c_mid + (9 * c_mid * c_out + c_out) + 2 * c_out


def _torch_nested_unet_params(in_ch, num_classes, nb, deep_supervision):
  """Parameter count of 4uiiurz1/pytorch-nested-unet's NestedUNet, from its layout."""
  total = _vgg_block_params(in_ch, nb[0], nb[0])  # conv0_0
  total += sum(_vgg_block_params(nb[i - 1], nb[i], nb[i]) for i in range(1, 5))
  for i in range(4):  # conv{i}_{j}: cat of j same-level nodes and up(X^{i+1,j-1})
    for j in range(1, 5 - i):
      total += _vgg_block_params(nb[i] * j + nb[i + 1], nb[i], nb[i])
  heads = 4 if deep_supervision else 1
  return total + heads * (nb[0] * num_classes + num_classes)


def _torch_unet_params(in_ch, num_classes, nb):
  """Parameter count of the same repository's UNet."""
  total = _vgg_block_params(in_ch, nb[0], nb[0])
  total += sum(_vgg_block_params(nb[i - 1], nb[i], nb[i]) for i in range(1, 5))
  total += sum(_vgg_block_params(nb[i] + nb[i + 1], nb[i], nb[i]) for i in range(4))
  return total + nb[0] * num_classes + num_classes


def _count(name, num_classes, deep_supervision=False):
  model = models.build_model(
    name, num_classes=num_classes, width=32, deep_supervision=deep_supervision
  )
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  )
  return models.count_params(shapes["params"]), shapes


def test_param_count_matches_pytorch_reference():
  nb = [32, 64, 128, 256, 512]
  count1, shapes = _count("unet++", 1)
  assert count1 == _torch_nested_unet_params(3, 1, nb, False)
  assert count1 == 9_163_329  # the reference's published 9.16M
  # A spot check of the nested concatenation: X^{0,4} reads 4 * 32 + 64 channels.
  assert shapes["params"]["conv0_4"]["conv1"]["kernel"].shape == (3, 3, 192, 32)
  for num_classes in (1, 2):
    for ds in (False, True):
      assert _count("unet++", num_classes, ds)[0] == _torch_nested_unet_params(
        3, num_classes, nb, ds
      ), (num_classes, ds)
  assert _count("unet", 2)[0] == _torch_unet_params(3, 2, nb)
  # BatchNorm running statistics are state, not parameters (PyTorch buffers).
  bn_params = sum(
    int(np.prod(leaf.shape))
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
    if path[-2].key.startswith("bn")
  )
  assert models.count_params(shapes["batch_stats"]) == bn_params


def test_bad_inputs_raise():
  model = models.build_model("unet++", num_classes=2, width=4)
  for shape in [(1, 24, 32, 3), (1, 32, 40, 3)]:
    with pytest.raises(ValueError, match=re.escape(str(shape))):
      jax.eval_shape(
        lambda shape=shape: model.init(jax.random.key(0), jnp.zeros(shape), train=False)
      )
  with pytest.raises(ValueError, match="B,H,W,C"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((32, 32, 3)), train=False))
  with pytest.raises(ValueError, match="unknown model name"):
    models.build_model("resnet", num_classes=2, width=4)
  with pytest.raises(ValueError, match="deep_supervision"):
    models.build_model("unet", num_classes=2, width=4, deep_supervision=True)
  with pytest.raises(ValueError, match="num_classes"):
    models.build_model("unet", num_classes=0, width=4)


def test_upsample_matches_align_corners_interpolation():
  # align_corners=True samples output pixel o at o * (n - 1) / (2n - 1).
  rng = np.random.default_rng(1)
  img = rng.standard_normal((1, 3, 4, 2)).astype(np.float32)
  got = np.asarray(models.upsample_bilinear_2x(jnp.asarray(img)))
  assert got.shape == (1, 6, 8, 2)
  rows = np.arange(6) * 2 / 5
  cols = np.arange(8) * 3 / 7
  want = np.empty_like(got)
  for c in range(2):
    along_w = np.stack([np.interp(cols, np.arange(4), r) for r in img[0, :, :, c]])
    want[0, :, :, c] = np.stack([np.interp(rows, np.arange(3), col) for col in along_w.T], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Corners are kept exactly, unlike align_corners=False.
  np.testing.assert_array_equal(
    got[0, [0, 0, -1, -1], [0, -1, 0, -1]], img[0, [0, 0, -1, -1], [0, -1, 0, -1]]
  )


def test_bfloat16_computation_float32_params_and_outputs(x):
  model = models.build_model("unet++", num_classes=2, width=4, dtype=jnp.bfloat16)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  (logits, features), _ = jax.eval_shape(apply, variables, x)
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(apply)(variables, x))
  assert "conv_general_dilated" in jaxpr and "bf16[2,32,32,4]" in jaxpr


def test_float64_computation_keeps_float64_throughout(x):
  # Finite-difference checks of the meta-gradient need no float32 anywhere
  # on the path from parameters to logits.
  with jax.enable_x64(True):
    model = models.build_model("unet++", num_classes=2, width=4, dtype=jnp.float64)
    x64 = x.astype(jnp.float64)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x64, train=False))
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float64)}
    apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    (logits, features), _ = jax.eval_shape(apply, variables, x64)
    assert logits.dtype == jnp.float64 and features.dtype == jnp.float64
    jaxpr = str(jax.make_jaxpr(apply)(variables, x64))
    assert "f32[2,32,32" not in jaxpr


def test_init_follows_pytorch_conv_default():
  # kaiming_uniform(a=sqrt(5)) and its bias: both U(±1/sqrt(fan_in)).
  fan_in = 3 * 3 * 16
  bound = 1.0 / math.sqrt(fan_in)
  kernel = np.asarray(unet_lib._torch_kernel_init()(jax.random.key(0), (3, 3, 16, 64)))
  bias = np.asarray(unet_lib._torch_bias_init(fan_in)(jax.random.key(1), (4096,)))
  for values in (kernel, bias):
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() > 0.95 * bound
    np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=0.05)


def test_activation_is_configurable(x):
  # The default is ReLU; a smooth activation replaces it in every block.
  def jaxpr(**kw):
    model = models.UNetPlusPlus(num_classes=2, width=4, **kw)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))

  relu, smooth = jaxpr(), jaxpr(activation=jax.nn.softplus)
  # 15 blocks x 2 activations each.
  assert relu.count("name=relu") >= 30 and "softplus" not in relu
  assert smooth.count("name=softplus") >= 30 and "name=relu" not in smooth
