"""Tests for metadcseg_jax.core.objective (MetaDCSeg Eq. 13, §3.4)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadcseg_jax import configs
from metadcseg_jax.core import dcd
from metadcseg_jax.core import edges as edges_lib
from metadcseg_jax.core import objective

# One jitted entry point; the compile cache is shared by every test that uses
# the same (hashable) options.
LOSS = jax.jit(objective.metadcseg_loss, static_argnames=("options",))
B, S, L, D = 2, 16, 3, 4


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(logits, labels):
  ls = _np_log_softmax(np.asarray(logits, np.float64))
  return -np.take_along_axis(ls, np.asarray(labels)[..., None], -1)[..., 0]


def _np_dice(logits, labels):
  p = 1 - np.exp(_np_log_softmax(np.asarray(logits, np.float64)))[..., 0]
  t = (np.asarray(labels) > 0).astype(np.float64)
  inter = (p * t).sum((1, 2))
  return 1 - (2 * inter + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.RandomState(0)
  yy, xx = np.mgrid[:S, :S]
  disc = np.hypot(yy - S / 2, xx - S / 2) < 5
  noisy = np.stack([disc * 1, disc * 2]).astype(np.int32)  # classes 1 and 2
  logits = rng.randn(B, S, S, L).astype(np.float32)
  logits[..., 0] += np.where(disc, -2.0, 2.0)  # fg disc, uncertain rim
  return dict(
    logits=jnp.asarray(logits),
    features=jnp.asarray(rng.randn(B, S, S, D), jnp.float32),
    edges=jax.vmap(edges_lib.sobel_edges)(jnp.asarray(rng.rand(B, S, S, 1), jnp.float32)),
    noisy_label=jnp.asarray(noisy),
    y_pseudo=jnp.argmax(jnp.asarray(logits), -1),
    default_centers=jnp.ones((3, D)) * 0.5,
  )


def _options(*, lambda_bd=0.7, lambda_dice=0.3, use_dcd=True, detach_weights=True, **kwargs):
  dcd_options = dcd.DCDOptions(use=use_dcd, detach_weights=detach_weights)
  return objective.ObjectiveOptions(lambda_bd, lambda_dice, dcd=dcd_options, **kwargs)


def _call(batch, weights, **kwargs):
  """The loss on `batch` with `weights` (a dict without y_pseudo, or `PixelWeights`)."""
  if isinstance(weights, dict):
    weights = objective.PixelWeights(**weights, y_pseudo=batch["y_pseudo"])
  return LOSS(
    batch["logits"],
    batch["features"],
    batch["noisy_label"],
    edges=batch["edges"],
    weights=weights,
    default_centers=batch["default_centers"],
    options=_options(**kwargs),
  )


def test_normalizers_by_hand():
  # B = 2, 1x2 images, L = 2, every pixel's logits (0, log 3): p = (1/4, 3/4),
  # so CE(label 0) = log 4, CE(label 1) = log 4/3.
  logits = jnp.broadcast_to(jnp.array([0.0, math.log(3.0)]), (2, 1, 2, 2))
  y = jnp.array([[[0, 1]], [[1, 1]]])
  yp = jnp.ones((2, 1, 2), jnp.int32)
  a = jnp.array([[[0.5, 0.25]], [[0.1, 0.2]]])
  b = jnp.array([[[0.0, 0.25]], [[0.3, 0.4]]])
  l4, l43 = math.log(4.0), math.log(4.0 / 3.0)
  # Image 0: 0.5·log4 + 0.25·log4/3 + 0.25·log4/3 = 0.5·log4 + 0.5·log4/3
  # Image 1: (0.1+0.2+0.3+0.4)·log4/3 = log4/3
  per_image = np.array([0.5 * l4 + 0.5 * l43, l43])
  for normalizer, expected in (("image", per_image.mean()), ("batch", per_image.sum())):
    got = objective.l2b_loss(logits, y, a_hat=a, b_hat=b, y_pseudo=yp, normalizer=normalizer)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    weights = objective.PixelWeights(a_hat=a, b_hat=b, gamma=a + b, pi_a=a, pi_b=b, y_pseudo=yp)
    loss, aux = LOSS(
      logits,
      jnp.zeros((2, 1, 2, 3)),
      y,
      edges=jnp.zeros((2, 1, 2), bool),
      weights=weights,
      default_centers=jnp.zeros((3, 3)),
      options=_options(lambda_bd=1.0, lambda_dice=0.5, use_dcd=False, normalizer=normalizer),
    )
    # Dice term is a mean over images under both normalisers.
    dice = _np_dice(logits, y).mean()
    np.testing.assert_allclose(loss, expected + 0.5 * dice, rtol=1e-6)
    np.testing.assert_allclose(aux["ce_term"], expected, rtol=1e-6)


@pytest.mark.parametrize("normalizer", ["image", "batch"])
def test_meta_off_is_plain_mean_ce(batch, normalizer):
  w = objective.meta_off_weights(batch["y_pseudo"], normalizer=normalizer)
  loss, aux = _call(batch, w, use_dcd=False, use_dice=False, normalizer=normalizer)
  ce = _np_ce(batch["logits"], batch["noisy_label"])
  np.testing.assert_allclose(loss, ce.mean(), rtol=1e-5)
  assert float(aux["bd_term"]) == 0.0 and float(aux["dice_term"]) == 0.0


def test_meta_off_with_dcd_and_dice(batch):
  w = objective.meta_off_weights(batch["y_pseudo"])
  loss, aux = _call(batch, w)
  ce = _np_ce(batch["logits"], batch["noisy_label"])
  # Boundary weights recomputed here from M̂ = 1 − p_0 (numpy); the boundary term weights the
  # same meta-weighted loss as the first term, here â·f = f / (H·W).
  fg_prob = 1 - np.exp(_np_log_softmax(np.asarray(batch["logits"])))[..., 0]
  ref = jax.jit(dcd.dcd_weights)(
    batch["features"],
    jnp.asarray(fg_prob, jnp.float32),
    batch["edges"],
    gamma=jnp.ones((B, S, S)),
    default_centers=batch["default_centers"],
  )
  bd_i = (np.asarray(ref["w"]) * ce / (S * S)).sum((1, 2))
  dice_i = _np_dice(batch["logits"], batch["noisy_label"])
  expected = ce.mean() + np.mean(0.7 * bd_i + 0.3 * dice_i)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(
    loss, aux["ce_term"] + 0.7 * aux["bd_term"] + 0.3 * aux["dice_term"], rtol=1e-6
  )
  np.testing.assert_allclose(aux["w"], ref["w"], rtol=1e-4, atol=1e-7)
  bd = np.asarray(aux["bd"])
  assert bd.any(axis=(1, 2)).all()
  # Mean-one weights (the default): they sum to the size of each image's boundary set.
  np.testing.assert_allclose(np.asarray(aux["w"]).sum((1, 2)), bd.sum((1, 2)), rtol=1e-5)
  assert (np.asarray(aux["w"])[~bd] == 0).all()
  assert aux["centers"].shape == (B, 3, D)
  assert aux["used_fallback"].shape == (B, 3)
  # EMA (momentum 0.9) of the mean of the non-fallback centers per region.
  valid = ~np.asarray(aux["used_fallback"])
  centers = np.asarray(aux["centers"], np.float64)
  old = np.asarray(batch["default_centers"], np.float64)
  for k in range(3):
    if valid[:, k].any():
      expect_k = 0.9 * old[k] + 0.1 * centers[valid[:, k], k].mean(0)
    else:
      expect_k = old[k]
    np.testing.assert_allclose(aux["new_default_centers"][k], expect_k, rtol=1e-5)
  # The centers moved towards this batch's valid centers.
  assert not np.allclose(aux["new_default_centers"], batch["default_centers"])


def test_meta_weights_enter_both_terms(batch):
  # Non-trivial â, b̂, πa, πb: every term matches a numpy recomputation.
  rng = np.random.RandomState(5)
  a_t = rng.rand(B, S, S) * (rng.rand(B, S, S) < 0.8)
  b_t = rng.rand(B, S, S) * (rng.rand(B, S, S) < 0.5)
  gamma = a_t + b_t
  z = gamma.sum((1, 2), keepdims=True)
  safe = np.where(gamma > 0, gamma, 1)
  weights = {
    k: jnp.asarray(v, jnp.float32)
    for k, v in dict(
      a_hat=a_t / z,
      b_hat=b_t / z,
      gamma=gamma,
      pi_a=np.where(gamma > 0, a_t / safe, 0),
      pi_b=np.where(gamma > 0, b_t / safe, 0),
    ).items()
  }
  f = _np_ce(batch["logits"], batch["noisy_label"])
  g = _np_ce(batch["logits"], batch["y_pseudo"])
  meta_loss = a_t / z * f + b_t / z * g  # L^hw of Eq. 1
  first = meta_loss.sum((1, 2)).mean()
  dice = _np_dice(batch["logits"], batch["noisy_label"]).mean()
  mixing = np.asarray(weights["pi_a"]) * f + np.asarray(weights["pi_b"]) * g
  for pixel_loss, boundary in (("meta", meta_loss), ("mixing", mixing)):
    loss, aux = _call(batch, weights, pixel_loss=pixel_loss)
    w = np.asarray(aux["w"], np.float64)
    bd_i = (w * boundary).sum((1, 2))
    np.testing.assert_allclose(aux["ce_term"], first, rtol=1e-5)
    np.testing.assert_allclose(aux["bd_term"], bd_i.mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, first + 0.7 * bd_i.mean() + 0.3 * dice, rtol=1e-5)


def test_boundary_pixel_weight_is_a_hat_times_one_plus_lambda_w(batch):
  """With mean-one weights and the meta pixel loss, d loss / d f at a boundary pixel is
  â·(1 + λ1·w) (per image, averaged over the batch): a bounded re-weighting."""
  rng = np.random.RandomState(1)
  a_hat = jnp.asarray(rng.rand(B, S, S) / (S * S), jnp.float32)
  zeros = jnp.zeros((B, S, S))
  weights = dict(a_hat=a_hat, b_hat=zeros, gamma=a_hat, pi_a=jnp.ones((B, S, S)), pi_b=zeros)
  _, aux = _call(batch, weights, use_dice=False)
  f = _np_ce(batch["logits"], batch["noisy_label"])
  per_pixel = np.asarray(a_hat) * (1 + 0.7 * np.asarray(aux["w"])) * f
  loss, _ = _call(batch, weights, use_dice=False)
  np.testing.assert_allclose(loss, per_pixel.sum((1, 2)).mean(), rtol=1e-5)
  assert np.asarray(aux["w"])[np.asarray(aux["bd"])].mean() == pytest.approx(1.0, rel=1e-5)


def test_gradients_and_detach(batch):
  w = objective.meta_off_weights(batch["y_pseudo"])

  def grads(detach):
    fn = lambda lg, ft: _call(dict(batch, logits=lg, features=ft), w, detach_weights=detach)[0]
    return jax.jit(jax.grad(fn, argnums=(0, 1)))(batch["logits"], batch["features"])

  g_logits, g_feat = grads(False)
  d_logits, d_feat = grads(True)
  for g in (g_logits, g_feat, d_logits):
    assert np.isfinite(g).all() and np.abs(g).sum() > 0
  # Detached (the default), the features enter nowhere: no gradient reaches them.
  np.testing.assert_array_equal(d_feat, 0.0)
  np.testing.assert_allclose(g_logits, d_logits, rtol=1e-5, atol=1e-8)
  default = jax.grad(lambda ft: _call(dict(batch, features=ft), w)[0])(batch["features"])
  np.testing.assert_array_equal(default, 0.0)


def test_empty_boundary_gives_zero_term_and_finite_grads():
  # Confident everywhere (M̂ = 0.99 or 0.01) and no edges.
  logits = np.zeros((1, S, S, 2), np.float32)
  logits[0, :, : S // 2, 1] = math.log(99.0)
  logits[0, :, S // 2 :, 0] = math.log(99.0)
  y = (np.arange(S)[None, None, :] < S // 2).repeat(S, 1).astype(np.int32)
  w = objective.meta_off_weights(jnp.asarray(y))

  def fn(lg, ft):
    return objective.metadcseg_loss(
      lg,
      ft,
      jnp.asarray(y),
      edges=jnp.zeros((1, S, S), bool),
      weights=w,
      default_centers=jnp.zeros((3, D)),
      options=objective.ObjectiveOptions(lambda_bd=1.0, lambda_dice=1.0),
    )

  (loss, aux), (g_l, g_f) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
    jnp.asarray(logits), jnp.ones((1, S, S, D))
  )
  assert not np.asarray(aux["bd"]).any()
  assert float(aux["bd_term"]) == 0.0
  np.testing.assert_array_equal(aux["w"], 0.0)
  np.testing.assert_array_equal(aux["used_fallback"][0], [False, False, True])
  assert np.isfinite(loss) and np.isfinite(g_l).all()
  np.testing.assert_array_equal(g_f, 0.0)


def test_bad_inputs_raise(batch):
  w = objective.meta_off_weights(batch["y_pseudo"])
  call = functools.partial(
    objective.metadcseg_loss, batch["logits"], batch["features"], batch["noisy_label"]
  )
  options = objective.ObjectiveOptions(lambda_bd=1.0, lambda_dice=1.0)
  centers = batch["default_centers"]
  edges = batch["edges"]
  with pytest.raises(ValueError, match="normalizer"):
    bad = dataclasses.replace(options, normalizer="pixel")
    call(edges=edges, weights=w, default_centers=centers, options=bad)
  with pytest.raises(ValueError, match="a_hat"):
    call(
      edges=edges, weights=w._replace(a_hat=w.a_hat[0]), default_centers=centers, options=options
    )
  with pytest.raises(ValueError, match="default_centers"):
    call(edges=edges, weights=w, default_centers=jnp.zeros((3, D + 1)), options=options)
  with pytest.raises(ValueError, match="shape"):
    objective.meta_off_weights(batch["y_pseudo"][0])


def test_every_dcd_setting_is_read_by_name():
  """A new `config.dcd` option is its default and the field that reads it: nothing copies it."""
  section = configs.default_config().dcd
  objective_fields = {f.name for f in dataclasses.fields(objective.ObjectiveOptions)}
  objective_fields -= {"normalizer", "dcd"}  # the meta step's normaliser; the DCD options
  dcd_fields = {f.name for f in dataclasses.fields(dcd.DCDOptions)}
  # Read by the edge detector of Eq. 8 (`edges.make_detector`), not by the objective.
  edge_settings = {"edges", "pidinet_weights", "canny_sigma", "edge_top_fraction"}
  assert objective_fields.isdisjoint(dcd_fields)
  assert set(section) == objective_fields | dcd_fields | edge_settings
  # Each field comes from the section under its own name: a distinct marker each.
  markers = {k: f"marker {k}" for k in section}
  options = objective.ObjectiveOptions.from_config(markers, normalizer="batch")
  assert options.normalizer == "batch"
  assert {k: getattr(options, k) for k in objective_fields} == {
    k: markers[k] for k in objective_fields
  }
  assert {k: getattr(options.dcd, k) for k in dcd_fields} == {k: markers[k] for k in dcd_fields}
  # The options hash, so a jitted function can take them as a static argument.
  hash(objective.ObjectiveOptions.from_config(section, normalizer="image"))
