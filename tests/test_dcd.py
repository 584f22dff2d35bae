"""Tests for metadcseg_jax.core.dcd (MetaDCSeg Eq. 6 to Eq. 12, Eq. 46, Eq. 47)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadcseg_jax.core import dcd


# ---------------------------------------------------------------- regions


def test_regions_by_hand_and_overlap():
  m = jnp.array([[0.9, 0.7, 0.5, 0.3], [0.2, 0.71, 0.29, 0.31]], jnp.float32)
  edges = jnp.array([[1, 0, 0, 0], [1, 0, 0, 0]], bool)
  fg, bg, bd = dcd.regions(m, edges, tau=0.7)
  # Thresholds: fg > 0.7, bg < 0.3, bd in [0.3, 0.7] (both ends inclusive).
  np.testing.assert_array_equal(fg, [[1, 0, 0, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(bg, [[0, 0, 0, 0], [1, 0, 1, 0]])
  np.testing.assert_array_equal(bd, [[1, 1, 1, 1], [1, 0, 0, 1]])
  # Default: edge pixels stay in fg / bg too (the paper's sets as written).
  assert bool(fg[0, 0] & bd[0, 0]) and bool(bg[1, 0] & bd[1, 0])
  fg_x, bg_x, bd_x = dcd.regions(m, edges, tau=0.7, exclusive=True)
  np.testing.assert_array_equal(fg_x, [[0, 0, 0, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(bg_x, [[0, 0, 0, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(bd_x, bd)
  total = fg_x.astype(int) + bg_x.astype(int) + bd_x.astype(int)
  np.testing.assert_array_equal(total, np.ones((2, 4)))  # a partition
  with pytest.raises(ValueError, match="tau"):
    dcd.regions(m, edges, tau=0.4)


# ---------------------------------------------------------------- hand example
#
# 4x4 image, D = 2. Row 0 is fg, row 3 is bg, rows 1-2 are bd.
#   fg features (2,0),(2,0),(4,0),(4,0) with γ = 1,1,0,2:
#       c_fg = (2 + 2 + 0·4 + 2·4) / (1+1+0+2) = 12/4 -> (3, 0)
#   bg features (-1,0) x4, γ = 1: c_bg = (-1, 0)
#   bd row 1: (1,1) x4, row 2: (1,-2) x4, γ = 1: c_bd = (1, -0.5)
# DCD on bd row 1: |(-2,1)|·|(2,1)| / |(0,1.5)| = √5·√5/1.5 = 10/3
#        bd row 2: |(-2,-2)|·|(2,-2)| / |(0,-1.5)| = 8/1.5 = 16/3
#        fg (2,0): |(-1,0)|·|(3,0)| / |(1,0.5)| = 3/√1.25
#        fg (4,0): |(1,0)|·|(5,0)| / |(3,0.5)| = 5/√9.25
#        bg (-1,0): |(-4,0)|·0 / ... = 0
# Weights (τ_dcd = 1) over the 8 bd pixels: e^{10/3} x4, e^{16/3} x4, so
#   w_row1 = 1/(4(1+e²)), w_row2 = e²/(4(1+e²)); 0 on rows 0 and 3.

H_HAND = np.array(
  [
    [[2, 0], [2, 0], [4, 0], [4, 0]],
    [[1, 1], [1, 1], [1, 1], [1, 1]],
    [[1, -2], [1, -2], [1, -2], [1, -2]],
    [[-1, 0], [-1, 0], [-1, 0], [-1, 0]],
  ],
  np.float32,
)
G_HAND = np.array([[1, 1, 0, 2], [1] * 4, [1] * 4, [1] * 4], np.float32)
ROWS = np.arange(4)[:, None] * np.ones((1, 4), int)
MASKS_HAND = np.stack([ROWS == 0, ROWS == 3, (ROWS == 1) | (ROWS == 2)])


def test_hand_example_centers_dcd_weights():
  centers, fallback = dcd.region_centers(
    jnp.asarray(H_HAND),
    jnp.asarray(G_HAND),
    jnp.asarray(MASKS_HAND),
    default_centers=jnp.zeros((3, 2)),
    min_pixels=4,
  )
  np.testing.assert_allclose(centers, [[3, 0], [-1, 0], [1, -0.5]], atol=1e-6)
  assert not np.asarray(fallback).any()
  d = np.asarray(dcd.dcd_map(jnp.asarray(H_HAND), centers))
  np.testing.assert_allclose(d[1], [10 / 3] * 4, rtol=1e-5)
  np.testing.assert_allclose(d[2], [16 / 3] * 4, rtol=1e-5)
  np.testing.assert_allclose(d[0], [3 / math.sqrt(1.25)] * 2 + [5 / math.sqrt(9.25)] * 2, rtol=1e-5)
  np.testing.assert_allclose(d[3], 0, atol=1e-6)
  literal = dict(scale="none", weight_sum="sum_one")  # Eq. 12 as printed
  w = np.asarray(dcd.boundary_weights(jnp.asarray(d), jnp.asarray(MASKS_HAND[2]), **literal))
  e2 = math.e**2
  np.testing.assert_allclose(w[1], 1 / (4 * (1 + e2)), rtol=1e-5)
  np.testing.assert_allclose(w[2], e2 / (4 * (1 + e2)), rtol=1e-5)
  assert (w[0] == 0).all() and (w[3] == 0).all()
  # Temperature 2 halves the log-ratio between the two rows.
  w2 = np.asarray(
    dcd.boundary_weights(jnp.asarray(d), jnp.asarray(MASKS_HAND[2]), tau_dcd=2.0, **literal)
  )
  np.testing.assert_allclose(w2[2, 0] / w2[1, 0], math.e, rtol=1e-5)
  # The defaults: DCD over its boundary mean (13/3), weights times |bd| = 8 (mean one):
  # exp((10/3)/(13/3)) : exp((16/3)/(13/3)) = 1 : exp(6/13) between the rows.
  wd = np.asarray(dcd.boundary_weights(jnp.asarray(d), jnp.asarray(MASKS_HAND[2])))
  r = math.exp(6 / 13)
  np.testing.assert_allclose(wd[1], 8 / (4 * (1 + r)), rtol=1e-5)
  np.testing.assert_allclose(wd[2], 8 * r / (4 * (1 + r)), rtol=1e-5)
  np.testing.assert_allclose(wd[1:3].mean(), 1.0, rtol=1e-6)


def test_mean_scale_makes_weights_independent_of_the_feature_scale():
  """DCD is linear in a scale of the features; dividing by its boundary mean cancels it, while
  the literal softmax becomes one-hot as features grow."""
  rng = np.random.RandomState(7)
  d = jnp.asarray(rng.rand(8, 8) * 3 + 1, jnp.float32)
  bd = jnp.asarray(rng.rand(8, 8) < 0.4)
  for c in (1.0, 30.0):
    np.testing.assert_allclose(
      dcd.boundary_weights(c * d, bd), dcd.boundary_weights(d, bd), rtol=1e-5
    )
  peaked = dcd.boundary_weights(30.0 * d, bd, scale="none", weight_sum="sum_one")
  assert float(1.0 / jnp.sum(peaked**2)) < 2.0  # effective support of about one pixel
  mean_one = dcd.boundary_weights(d, bd)
  assert float(jnp.sum(mean_one)) == pytest.approx(float(jnp.sum(bd)), rel=1e-5)
  with pytest.raises(ValueError, match="scale"):
    dcd.boundary_weights(d, bd, scale="max")


def test_center_fallback_small_region_and_zero_gamma():
  default = jnp.array([[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]])
  h = jnp.asarray(H_HAND)

  def centers_sum(h, gamma):
    c, fb = dcd.region_centers(h, gamma, jnp.asarray(MASKS_HAND), default_centers=default)
    return jnp.sum(c), (c, fb)

  # Default τ_min = 10: every region (4, 4, 8 pixels) is too small.
  (_, (c, fb)) = centers_sum(h, jnp.asarray(G_HAND))
  np.testing.assert_array_equal(fb, [True, True, True])
  np.testing.assert_allclose(c, default)
  # Enough pixels, but Σγ = 0 in the bd region only.
  big = np.zeros((3, 4, 4), bool)
  big[0, :3] = True  # 12 px, γ > 0
  big[2, 1:] = True  # 12 px, γ = 0
  gamma = np.ones((4, 4), np.float32)
  gamma[1:] = 0.0
  c, fb = dcd.region_centers(h, jnp.asarray(gamma), jnp.asarray(big), default_centers=default)
  np.testing.assert_array_equal(fb, [False, True, True])
  np.testing.assert_allclose(c[2], default[2])
  # fg: rows 0-2, but γ = 0 on rows 1-2: (2,0),(2,0),(4,0),(4,0) -> (3, 0).
  np.testing.assert_allclose(c[0], [3.0, 0.0], atol=1e-6)
  # No NaN in the gradient through a fallback region, none into γ.
  g_h, g_gamma = jax.jit(
    jax.grad(
      lambda h, g: jnp.sum(dcd.region_centers(h, g, jnp.asarray(big), default_centers=default)[0]),
      argnums=(0, 1),
    )
  )(h, jnp.asarray(gamma))
  assert np.isfinite(g_h).all()
  np.testing.assert_array_equal(g_gamma, 0.0)
  # Only fg is a real center: its gradient is γ/Σγ = 1/4 per feature entry.
  np.testing.assert_allclose(g_h[0], 0.25)
  np.testing.assert_allclose(g_h[1:], 0.0)


# ---------------------------------------------------------------- stability


def test_dcd_clip_and_finite_gradients_at_centers():
  centers = jnp.array([[3.0, 0.0], [-1.0, 0.0], [1.0, -0.5]])
  h = jnp.asarray(H_HAND)
  h = h.at[1, 0].set(centers[2])  # a feature on the bd center
  h = h.at[1, 1].set(centers[0])  # a feature on the fg center
  h = h.at[1, 2].set(centers[1])  # a feature on the bg center
  d = dcd.dcd_map(h, centers)
  assert float(d.max()) <= 100.0
  assert float(d[1, 0]) == 100.0
  assert float(d[1, 1]) == 0.0 and float(d[1, 2]) == 0.0
  g_h, g_c = jax.jit(jax.grad(lambda h, c: jnp.sum(dcd.dcd_map(h, c)), argnums=(0, 1)))(h, centers)
  assert np.isfinite(g_h).all() and np.isfinite(g_c).all()
  np.testing.assert_array_equal(g_h[1, 0], 0.0)  # clipped pixel
  assert np.abs(g_h).sum() > 0


def test_full_pipeline_finite_when_feature_is_its_bd_center():
  # The bd region is symmetric around its middle pixel, so that pixel's
  # feature equals c_bd exactly; centers depend on h here (no fallback).
  h = np.zeros((8, 8, 2), np.float32)
  h[:3] = [3.0, 0.0]
  h[5:] = [-3.0, 0.0]
  h[3:5] = np.random.RandomState(0).randn(2, 8, 2)
  h[4, 4] = 0.0
  h[3:5] -= h[3:5].mean(axis=(0, 1))  # c_bd = 0 = h[4, 4] + correction
  prob = np.full((8, 8), 0.5, np.float32)
  prob[:3] = 0.9
  prob[5:] = 0.1

  def loss(h):
    out = dcd.dcd_weights_single(
      h,
      jnp.asarray(prob),
      jnp.zeros((8, 8), bool),
      gamma=jnp.ones((8, 8)),
      default_centers=jnp.zeros((3, 2)),
      options=dcd.DCDOptions(detach_weights=False),
    )
    return jnp.sum(out["w"] * jnp.arange(64.0).reshape(8, 8)), out

  (value, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(h))
  np.testing.assert_allclose(out["centers"][2], h[3:5].mean(axis=(0, 1)), atol=1e-6)
  assert not np.asarray(out["used_fallback"]).any()
  assert np.isfinite(value) and np.isfinite(g).all() and np.abs(g).sum() > 0


def test_boundary_weights_sum_to_one_and_empty_bd():
  rng = np.random.RandomState(2)
  d = jnp.asarray(rng.rand(8, 8) * 100, jnp.float32)
  bd = jnp.asarray(rng.rand(8, 8) < 0.3)
  # z up to 1e4: no overflow.
  w = dcd.boundary_weights(d, bd, tau_dcd=0.01, scale="none", weight_sum="sum_one")
  assert np.isfinite(w).all()
  np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(w)[~np.asarray(bd)], 0.0)
  empty = jnp.zeros((8, 8), bool)
  w0, vjp = jax.vjp(lambda d: dcd.boundary_weights(d, empty), d)
  np.testing.assert_array_equal(w0, 0.0)
  (gd,) = vjp(jnp.ones_like(w0))
  np.testing.assert_array_equal(gd, 0.0)


# ---------------------------------------------------------------- batching


def _toy_batch(b=3, size=16, d=4, seed=0):
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[:size, :size]
  radius = rng.uniform(3, 6, size=(b, 1, 1))
  dist = np.hypot(yy - size / 2, xx - size / 2)[None]
  prob = 1 / (1 + np.exp(dist - radius))  # fg disc, band around its rim
  if b > 1:
    prob[-1] = 0.05  # last image: bg only, fg falls back to the default
  h = rng.randn(b, size, size, d)
  edges = rng.rand(b, size, size) < 0.1
  gamma = rng.rand(b, size, size)
  h, prob, gamma = (jnp.asarray(a, jnp.float32) for a in (h, prob, gamma))
  return h, prob, jnp.asarray(edges), gamma


def test_vmapped_equals_python_loop():
  h, prob, edges, gamma = _toy_batch()
  default = jnp.arange(12.0).reshape(3, 4) / 10
  batched = jax.jit(dcd.dcd_weights)(h, prob, edges, gamma=gamma, default_centers=default)
  single_fn = jax.jit(dcd.dcd_weights_single)
  for i in range(h.shape[0]):
    single = single_fn(h[i], prob[i], edges[i], gamma=gamma[i], default_centers=default)
    for key, value in single.items():
      np.testing.assert_allclose(batched[key][i], value, rtol=2e-5, atol=1e-6, err_msg=key)
  fb = np.asarray(batched["used_fallback"])
  assert fb[-1, dcd.FG] and not fb[0].any()
  np.testing.assert_allclose(batched["centers"][-1, dcd.FG], default[dcd.FG])


# ---------------------------------------------------------------- gradients


def _bd_loss_fn(h, w_frozen, frozen, *, prob, edges, gamma, head, detach):
  """Σ_bd w·f(h) with f = softplus(h·head), so f depends on h as well.

  w = w(h) (detached or not), or w_frozen where frozen = 1.
  """
  f = jax.nn.softplus(h @ head)
  out = dcd.dcd_weights_single(
    h,
    prob,
    edges,
    gamma=gamma,
    default_centers=jnp.zeros((3, h.shape[-1]), h.dtype),
    options=dcd.DCDOptions(detach_weights=detach),
  )
  w = frozen * w_frozen + (1 - frozen) * out["w"]
  return jnp.sum(w * f), out


def test_boundary_term_gradients_match_finite_differences_x64():
  with jax.enable_x64(True):
    hb, prob, edges, gamma = _toy_batch(b=1, size=12, d=3, seed=3)
    h = jnp.asarray(hb[0], jnp.float64)
    kw = dict(
      prob=jnp.asarray(prob[0], jnp.float64),
      edges=edges[0],
      gamma=jnp.asarray(gamma[0], jnp.float64),
      head=jnp.array([0.5, -1.0, 0.3]),
    )
    full = functools.partial(_bd_loss_fn, **kw, detach=False)
    det = functools.partial(_bd_loss_fn, **kw, detach=True)
    zero_w = jnp.zeros(h.shape[:2])
    (_, out), g_full = jax.jit(jax.value_and_grad(full, has_aux=True))(h, zero_w, 0.0)
    (_, _), g_det = jax.jit(jax.value_and_grad(det, has_aux=True))(h, zero_w, 0.0)
    assert not np.asarray(out["used_fallback"]).any()
    assert float(out["dcd"].max()) < 100  # away from the clip's kink
    w0 = out["w"]

    # Directional central differences on 12 random directions, for both the
    # live weights and weights frozen at h (= what detaching means), in one
    # vmapped call.
    eps = 1e-6
    dirs = jnp.asarray(np.random.RandomState(4).randn(12, *h.shape))
    signs = jnp.array([1.0, -1.0])
    frozen = jnp.array([0.0, 1.0])

    @jax.jit
    def evaluate(dirs):
      one = lambda v, s, fz: full(h + s * eps * v, w0, fz)[0]
      over_frozen = jax.vmap(one, in_axes=(None, None, 0))
      over_sign = jax.vmap(over_frozen, in_axes=(None, 0, None))
      return jax.vmap(over_sign, in_axes=(0, None, None))(dirs, signs, frozen)

    vals = evaluate(dirs)  # (12, 2 signs, 2 frozen)
    fd = (vals[:, 0] - vals[:, 1]) / (2 * eps)  # (12, 2)
    proj = lambda g: jnp.einsum("nhwd,hwd->n", dirs, g)
    np.testing.assert_allclose(proj(g_full), fd[:, 0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(proj(g_det), fd[:, 1], rtol=1e-6, atol=1e-8)
    assert float(jnp.max(jnp.abs(g_full - g_det))) > 1e-3


# ---------------------------------------------------------------- EMA


def test_update_default_centers_by_hand():
  old = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
  batch = jnp.array([[[10.0, 0.0], [5.0, 5.0], [9.0, 9.0]], [[20.0, 0.0], [7.0, 7.0], [9.0, 9.0]]])
  valid = jnp.array([[True, True, False], [True, False, False]])
  new = dcd.update_default_centers(old, batch, valid, momentum=0.9)
  # fg: mean (15, 0) -> 0.9·(1,1) + 0.1·(15,0) = (2.4, 0.9)
  # bg: only image 0 -> 0.9·(2,2) + 0.1·(5,5) = (2.3, 2.3)
  # bd: no valid center -> unchanged (3, 3)
  np.testing.assert_allclose(new, [[2.4, 0.9], [2.3, 2.3], [3.0, 3.0]], rtol=1e-6)
  np.testing.assert_array_equal(dcd.init_default_centers(5), np.zeros((3, 5)))
  with pytest.raises(ValueError, match="valid"):
    dcd.update_default_centers(old, batch, valid[:, :2])
