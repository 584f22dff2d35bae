"""Tests for metadcseg_jax.core.losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from metadcseg_jax.core import losses


def _random_batch(seed=0, shape=(2, 4, 5), num_classes=3, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal(shape + (num_classes,))).astype(np.float32)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  return logits, labels


def _np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _np_label_log_prob(logits, labels):
  return np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]


def test_ce_map_matches_numpy():
  logits, labels = _random_batch()
  got = losses.ce_map(jnp.asarray(logits), jnp.asarray(labels))
  want = -_np_label_log_prob(logits, labels)
  assert got.shape == labels.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    losses.mean_ce(jnp.asarray(logits), jnp.asarray(labels)), want.mean(), rtol=1e-5
  )


def test_foreground_prob_is_one_minus_background():
  logits, _ = _random_batch(num_classes=4)
  p0 = np.exp(_np_log_softmax(logits))[..., 0]
  np.testing.assert_allclose(
    losses.foreground_prob(jnp.asarray(logits)), 1.0 - p0, rtol=1e-5, atol=1e-6
  )


def _logits_from_fg_prob(fg):
  """Two-class logits (0, log(p / (1 - p))) so that softmax[..., 1] = p."""
  fg = np.asarray(fg, np.float64)
  return np.stack([np.zeros_like(fg), np.log(fg / (1 - fg))], -1).astype(np.float32)


def test_soft_dice_hand_worked_2x2():
  # Foreground probabilities p = [[3/4, 1/2], [1/4, 1/2]], target t = [[1, 1], [0, 0]].
  # Σ p·t = 3/4 + 1/2 = 5/4;  Σ p = 2;  Σ t = 2.
  # Dice loss = 1 - (2 · 5/4 + 1) / (2 + 2 + 1) = 1 - 3.5 / 5 = 0.3.
  logits = _logits_from_fg_prob([[[0.75, 0.5], [0.25, 0.5]]])
  labels = np.array([[[1, 1], [0, 0]]], np.int32)
  got = losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == (1,)
  np.testing.assert_allclose(got, [0.3], rtol=1e-6)
  # smooth = 0: 1 - 2.5 / 4 = 0.375.
  got0 = losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels), smooth=0.0)
  np.testing.assert_allclose(got0, [0.375], rtol=1e-6)


def test_soft_dice_hand_worked_3x3_three_classes():
  # Class logits (0, 0, log 2) -> softmax (1/4, 1/4, 1/2): foreground 3/4.
  # Class logits (log 3, 0, 0) -> softmax (3/5, 1/5, 1/5): foreground 2/5.
  # A marks the first kind (5 pixels), B the second (4 pixels).
  a = [0.0, 0.0, np.log(2.0)]
  b = [np.log(3.0), 0.0, 0.0]
  logits = np.array([[[a, a, a], [a, a, b], [b, b, b]]], np.float32)
  # Labels 1 and 2 both count as foreground: 3 A pixels and 1 B pixel.
  labels = np.array([[[1, 2, 0], [2, 0, 0], [1, 0, 0]]], np.int32)
  # Σ p·t = 3 · 3/4 + 2/5 = 2.65;  Σ p = 5 · 3/4 + 4 · 2/5 = 5.35;  Σ t = 4.
  # Dice loss = 1 - (2 · 2.65 + 1) / (5.35 + 4 + 1) = 1 - 6.3 / 10.35 = 9/23.
  got = losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, [9.0 / 23.0], rtol=1e-6)


def test_soft_dice_is_per_image_and_zero_for_perfect_prediction():
  _, labels = _random_batch(shape=(3, 6, 6), num_classes=2)
  labels[2] = 0  # an empty mask predicted empty also scores 0
  logits = 30.0 * (2.0 * np.eye(2, dtype=np.float32)[labels] - 1.0)
  got = losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, 0.0, atol=1e-6)
  # Inverting one image's prediction only raises that image's loss.
  logits[1] = -logits[1]
  got = losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got[np.array([0, 2])], 0.0, atol=1e-6)
  assert got[1] > 0.9


def test_gce_limits_and_formula():
  logits, labels = _random_batch(seed=1)
  logits_j, labels_j = jnp.asarray(logits), jnp.asarray(labels)
  p_y = np.exp(_np_label_log_prob(logits, labels))
  ce = losses.ce_map(logits_j, labels_j)
  np.testing.assert_allclose(losses.gce_map(logits_j, labels_j, q=1e-4), ce, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(
    losses.gce_map(logits_j, labels_j, q=1.0), 1 - p_y, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    losses.gce_map(logits_j, labels_j),  # q = 0.7
    (1 - p_y**0.7) / 0.7,
    rtol=1e-5,
    atol=1e-6,
  )
  with pytest.raises(ValueError, match="q must be"):
    losses.gce_map(logits_j, labels_j, q=0.0)


def test_sce_matches_numpy():
  logits, labels = _random_batch(seed=2)
  num_classes = logits.shape[-1]
  p = np.exp(_np_log_softmax(logits))
  onehot = np.eye(num_classes)[labels]
  log_q = np.where(onehot > 0, 0.0, -4.0)  # log one-hot with log 0 -> A = -4
  rce = -(p * log_q).sum(-1)
  ce = -(onehot * np.log(p)).sum(-1)
  want = 0.1 * ce + 1.0 * rce
  got = losses.sce_map(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == labels.shape
  # float32 log-softmax is accurate to ~1e-6 absolute, times |A| in RCE.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
  got = losses.sce_map(jnp.asarray(logits), jnp.asarray(labels), alpha=0.5, beta=2.0, log_clip=-9.0)
  np.testing.assert_allclose(
    got, 0.5 * ce + 2.0 * (-(p * np.where(onehot > 0, 0.0, -9.0)).sum(-1)), rtol=1e-5, atol=5e-5
  )


_PIXEL_LOSSES = {
  "ce": losses.ce_map,
  "gce": losses.gce_map,
  "sce": losses.sce_map,
  "dice": losses.soft_dice_loss,
  "fg": lambda logits, labels: losses.foreground_prob(logits),
}


def _central_diff(f, z, eps):
  """d f(z) / d z by central differences, one vmapped pass over the basis."""
  basis = jnp.eye(z.size, dtype=z.dtype).reshape((z.size,) + z.shape)
  d = jax.vmap(lambda e: (f(z + eps * e) - f(z - eps * e)) / (2 * eps))(basis)
  return jnp.moveaxis(d, 0, -1).reshape(jnp.shape(f(z)) + z.shape)


def test_gradients_and_hessians_match_finite_differences_float64():
  logits, labels = _random_batch(seed=3, shape=(2, 2, 2), num_classes=3, scale=1.0)
  with jax.enable_x64(True):
    z = jnp.asarray(logits, jnp.float64)
    labels = jnp.asarray(labels)

    def objective(name, z):
      out = _PIXEL_LOSSES[name](z, labels)
      # Distinct weights so every output element enters the check.
      return jnp.sum(jnp.linspace(0.5, 1.5, out.size).reshape(out.shape) * out)

    @jax.jit
    def errors(z):
      # One compile for all losses. Second order only for CE, the loss the
      # meta step differentiates twice (MetaDCSeg §3.2), both ways: jax.hessian is
      # forward-over-reverse, jacrev(grad) reverse-over-reverse.
      out = {}
      for name in _PIXEL_LOSSES:
        f = lambda z, name=name: objective(name, z)
        g = jax.grad(f)(z)
        out[name] = (
          jnp.max(jnp.abs(g - _central_diff(f, z, 1e-5))),
          jnp.max(jnp.abs(g)),
          jnp.all(jnp.isfinite(g)),
        )
      f = lambda z: objective("ce", z)
      h_fd = _central_diff(jax.grad(f), z, 1e-5)
      hessian_errors = (
        jnp.max(jnp.abs(jax.hessian(f)(z) - h_fd)),
        jnp.max(jnp.abs(jax.jacrev(jax.grad(f))(z) - h_fd)),
        jnp.max(jnp.abs(h_fd)),
      )
      return out, hessian_errors

    first, (hf_err, hr_err, h_max) = errors(z)
    for name, (g_err, g_max, finite) in first.items():
      assert finite and g_max > 1e-2, name
      assert g_err < 1e-8, (name, g_err)
    assert h_max > 1e-2 and hf_err < 1e-8 and hr_err < 1e-8, (hf_err, hr_err)

    check_grads(
      jax.jit(lambda z: objective("ce", z)),
      (z,),
      order=1,
      modes=["fwd", "rev"],
      atol=1e-6,
      rtol=1e-6,
    )


def test_gradients_finite_at_saturated_logits_float32():
  # Confident, wrong predictions: CE is large, p_y underflows.
  _, labels = _random_batch(seed=4, num_classes=2)
  logits = jnp.asarray(80.0 * (1.0 - 2.0 * np.eye(2, dtype=np.float32)[labels]))
  labels = jnp.asarray(labels)
  grads = jax.jit(
    lambda z: {
      name: jax.grad(lambda z: jnp.sum(fn(z, labels)))(z) for name, fn in _PIXEL_LOSSES.items()
    }
  )(logits)
  for name, grad in grads.items():
    assert np.all(np.isfinite(grad)), name
  # CE keeps a full-size gradient where the label's probability underflows.
  assert np.all(np.abs(grads["ce"]).sum(-1) > 1.9)


def test_shape_and_dtype_errors():
  logits = jnp.zeros((2, 4, 4, 2))
  with pytest.raises(ValueError, match=r"\(2, 4, 5\).*\(2, 4, 4, 2\)"):
    losses.ce_map(logits, jnp.zeros((2, 4, 5), jnp.int32))
  for fn in (losses.mean_ce, losses.soft_dice_loss, losses.gce_map, losses.sce_map):
    with pytest.raises(ValueError, match="labels shape"):
      fn(logits, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    losses.ce_map(logits, jnp.zeros((2, 4, 4), jnp.float32))
  with pytest.raises(ValueError, match="L >= 2"):
    losses.foreground_prob(jnp.zeros((2, 4, 4, 1)))
