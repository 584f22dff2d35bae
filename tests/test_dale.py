"""Tests for DALE (`methods/dale.py`) and the Gaussian Wasserstein distance (`wasserstein.py`).

Each component against a hand-worked example or an independent computation: the fuzziness
masks (Eq. 3, Eq. 4, Eq. 5, Eq. 6) on a constructed image and label, `sqrtm_psd` against scipy,
W2 (Eq. 14) in closed form, the gradients of W2, of L_W (Eq. 14) and of ω's meta-objective
(Eq. 9) against float64 central finite differences, and one jitted step of each phase on the
tiny config.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from experiments.configs import tiny
from metadcseg_jax.core import wasserstein
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.methods import base
from metadcseg_jax.methods import dale

_jit = functools.partial(jax.jit, compiler_options=base.RUN_ONCE_COMPILE)
LN2, LN4 = np.log(2.0), np.log(4.0)
FD_EPS_OMEGA = 1e-2  # rounding-limited below: 2e-9 relative error here, 3e-8 at 1e-3
H31 = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))  # entropy of a 3:1 histogram


def _config(**overrides):
  config = tiny.get_config()
  config.dale = dale.default_config()
  config.method = "dale"
  config.model.name = "unet"  # the step's logic is model-agnostic; U-Net compiles ~2x faster
  for key, value in overrides.items():
    config.dale[key] = value
  return config


# ----------------------------------------------------------------------------- fuzziness


def _hand_image():
  """32x32, four 16x16 patches: constant | two levels 1:1 | four levels | two levels 3:1.

  Levels 0, 1/3, 2/3, 1 fall in bins 0..3 of a 4-bin histogram over [0, 1]. Entropies (nats):
  0, ln 2, ln 4, H(3/4, 1/4); min-max normalised: 0, 1/2, 1, H31 / ln 4.
  """
  img = np.zeros((32, 32), np.float32)
  img[:16, 16:] = np.where(np.arange(16)[None, :] < 8, 0.0, 1.0)  # (0,1): 1:1
  img[16:, :16] = (np.arange(16)[None, :] // 4) / 3.0  # (1,0): four levels, 64 px each
  img[16:, 16:] = np.where(np.arange(16)[:, None] < 12, 1.0 / 3.0, 2.0 / 3.0)  # (1,1): 3:1
  return img[..., None]


def _hand_label():
  """Foreground = columns 0..7 of every row: edge pixels at columns 7 and 8 (both sides), 32
  of the 256 pixels of patches (0,0) and (1,0), none elsewhere: e = 1/8, 0, 1/8, 0."""
  label = np.zeros((32, 32), np.int32)
  label[:, :8] = 1
  return label


def test_patch_entropy_hand_worked():
  r = dale.patch_entropy(jnp.asarray(_hand_image()), patch_size=16, num_bins=4)
  np.testing.assert_allclose(r, [[0.0, LN2], [LN4, H31]], atol=1e-6)


def test_patch_entropy_matches_numpy_histogram():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(32, 48, 3)).astype(np.float32)
  bins = 8
  got = dale.patch_entropy(jnp.asarray(img), patch_size=16, num_bins=bins)
  grey = img.mean(-1)
  edges = np.linspace(grey.min(), grey.max(), bins + 1)
  want = np.zeros((2, 3))
  for i in range(2):
    for j in range(3):
      patch = grey[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
      q = np.histogram(patch, edges)[0] / patch.size
      q = q[q > 0]
      want[i, j] = -np.sum(q * np.log(q))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_label_edges_hand_worked():
  edges = np.asarray(dale.label_edges(jnp.asarray(_hand_label())))
  want = np.zeros((32, 32), bool)
  want[:, 7:9] = True
  np.testing.assert_array_equal(edges, want)


def test_fuzziness_and_soft_masks_hand_worked():
  r = np.array([[0.0, 0.5], [1.0, H31 / LN4]])
  e = np.array([[1.0, 0.0], [1.0, 0.0]])  # 1/8, 0, 1/8, 0 after min-max
  img, label = jnp.asarray(_hand_image()), jnp.asarray(_hand_label())
  for kind, want in (("max", np.maximum(r, e)), ("entropy", r), ("edges", e)):
    got = dale.fuzziness(img, label, patch_size=16, num_bins=4, kind=kind)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=kind)
  # m = 1, 0.5, 1, 0.4056; τ = 0.45: M^f = 1 above τ, else m; M^n = 1 below τ, else 1 − m
  # ("one_minus") or max(τ − m, 0) = 0 ("clip").
  m = np.maximum(r, e)
  mf_want = np.array([[1.0, 1.0], [1.0, H31 / LN4]])
  for reading, mn_want in (("one_minus", [[0.0, 0.5], [0.0, 1.0]]), ("clip", [[0, 0], [0, 1.0]])):
    mf, mn = dale.soft_masks(jnp.asarray(m), tau=0.45, nonfuzzy_mask=reading)
    np.testing.assert_allclose(mf, mf_want, atol=1e-6)
    np.testing.assert_allclose(mn, mn_want, atol=1e-6, err_msg=reading)
  # Per pixel, batched: every pixel carries its patch's values.
  pm, pf, pn = dale.fuzzy_masks(
    jnp.stack([img, img]), jnp.stack([label, label]), patch_size=16, num_bins=4, tau=0.45
  )
  assert pm.shape == pf.shape == pn.shape == (2, 32, 32)
  np.testing.assert_allclose(pm[1, 20, 3], 1.0)
  np.testing.assert_allclose(pf[0, 31, 31], H31 / LN4, atol=1e-6)
  np.testing.assert_allclose(pn[0, 0, 16], 0.5, atol=1e-6)


def test_soft_masks_default_tau():
  m = jnp.array([0.0, 0.3, 0.89, 0.9, 0.95, 1.0])
  mf, mn = dale.soft_masks(m, tau=0.9)
  np.testing.assert_allclose(mf, [0.0, 0.3, 0.89, 0.9, 1.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(mn, [1.0, 1.0, 1.0, 0.1, 0.05, 0.0], atol=1e-6)


def test_constant_cues_give_zero_fuzziness():
  """Eq. 5 with max = min (a flat image, an empty label) is 0, not NaN."""
  m = dale.fuzziness(jnp.ones((32, 32, 1)), jnp.zeros((32, 32), jnp.int32), patch_size=16)
  np.testing.assert_array_equal(m, np.zeros((2, 2)))


# ----------------------------------------------------------------------------- Wasserstein


def _spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T + (0.1 * np.eye(d) if rank is None else 0.0)


def test_sqrtm_psd_matches_scipy():
  rng = np.random.default_rng(1)
  a = _spd(rng, 6)
  with jax.enable_x64(True):
    np.testing.assert_allclose(
      wasserstein.sqrtm_psd(jnp.asarray(a)), scipy.linalg.sqrtm(a).real, atol=1e-10
    )
    got = wasserstein.sqrtm_psd(jnp.asarray(a), jitter=0.5)
    np.testing.assert_allclose(got, scipy.linalg.sqrtm(a + 0.5 * np.eye(6)).real, atol=1e-10)
  got32 = wasserstein.sqrtm_psd(jnp.asarray(a, jnp.float32))
  np.testing.assert_allclose(got32, scipy.linalg.sqrtm(a).real, rtol=1e-4, atol=1e-4)


def test_gaussian_w2_closed_forms():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  a, b = rng.uniform(0.1, 3, 4), rng.uniform(0.1, 3, 4)
  w2 = _w2(jitter=0.0)
  with jax.enable_x64(True):
    # Commuting (diagonal) covariances: ‖μ1 − μ2‖² + Σ (√a − √b)².
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = w2(*map(jnp.asarray, (mu1, np.diag(a), mu2, np.diag(b))))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # Same eigenvectors, rotated: the distance is rotation invariant.
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    got = w2(*map(jnp.asarray, (q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # General covariances: the formula with scipy's square roots; identical Gaussians: 0.
    c1, c2 = _spd(rng, 4), _spd(rng, 4)
    r1 = scipy.linalg.sqrtm(c1).real
    cross = np.trace(scipy.linalg.sqrtm(r1 @ c2 @ r1).real)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2) - 2 * cross
    np.testing.assert_allclose(w2(*map(jnp.asarray, (mu1, c1, mu2, c2))), want, rtol=1e-10)
    same = _w2(jitter=1e-4)(*map(jnp.asarray, (mu1, c1, mu1, c1)))
    np.testing.assert_allclose(same, 0.0, atol=1e-10)


def _w2(*, jitter):
  """`gaussian_w2_squared` of (μ1, Σ1, μ2, Σ2) given in that order."""
  return lambda mu1, cov1, mu2, cov2: wasserstein.gaussian_w2_squared(
    mu1, cov1, mu2=mu2, cov2=cov2, jitter=jitter
  )


def _fd_directional(f, x, direction, eps):
  return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


def test_gaussian_w2_gradient_matches_finite_differences():
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  c1, c2 = _spd(rng, 4), _spd(rng, 4)
  with jax.enable_x64(True):
    args = tuple(map(jnp.asarray, (mu1, c1, mu2, c2)))
    w2 = _w2(jitter=1e-3)
    grads = jax.grad(lambda *a: w2(*a), argnums=(0, 1, 2, 3))(*args)
    for k in range(4):
      for _ in range(2):
        d = rng.normal(size=args[k].shape)
        d = jnp.asarray(d + d.T if d.ndim == 2 else d)
        f = lambda v, k=k: w2(*args[:k], v, *args[k + 1 :])
        fd = _fd_directional(f, args[k], d, 1e-6)
        np.testing.assert_allclose(jnp.sum(grads[k] * d), fd, rtol=1e-7, err_msg=f"arg {k}")
    # Repeated eigenvalues (identity covariances): finite, and 0 for identical Gaussians.
    eye = jnp.eye(4)
    g_same = jax.grad(lambda c: w2(args[0], eye, args[0], c))(eye)
    np.testing.assert_allclose(g_same, np.zeros((4, 4)), atol=1e-10)
    g_cov1 = jax.grad(lambda c: w2(args[0], c, args[2], 4.0 * eye))(eye)
    assert np.all(np.isfinite(g_cov1))


def test_weighted_class_gaussians_match_numpy():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(2, 4, 4, 3))
  labels = rng.integers(0, 3, (2, 4, 4)).astype(np.int32)
  weights = rng.uniform(0, 1, (2, 4, 4))
  with jax.enable_x64(True):
    mu, cov, total = dale.class_gaussians(*map(jnp.asarray, (feats, labels, weights)), 3)
  x, y, w = feats.reshape(-1, 3), labels.reshape(-1), weights.reshape(-1)
  for c in range(3):
    sel = y == c
    np.testing.assert_allclose(mu[c], np.average(x[sel], axis=0, weights=w[sel]), rtol=1e-10)
    want = np.cov(x[sel].T, aweights=w[sel], bias=True)
    np.testing.assert_allclose(cov[c], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(total[c], w[sel].sum(), rtol=1e-12)


def test_alignment_loss_value_and_gradient():
  """L_W (Eq. 14) equals the sum of per-class W2² written out with scipy; a class under
  min_pixels is left out; its gradient in the fuzzy features matches central differences."""
  rng = np.random.default_rng(5)
  feats_n = rng.normal(size=(2, 6, 6, 3))
  feats_f = rng.normal(size=(2, 6, 6, 3)) + 0.3
  labels = np.zeros((2, 6, 6), np.int32)
  labels[:, :3] = 1
  labels[0, 5, 5] = 2  # class 2: one pixel, under min_pixels
  w_n, w_f = rng.uniform(0.2, 1, (2, 6, 6)), rng.uniform(0.2, 1, (2, 6, 6))
  eps = np.array([0.01, 0.02, 0.03])
  with jax.enable_x64(True):
    gauss_n = dale.class_gaussians(*map(jnp.asarray, (feats_n, labels, w_n)), 3)
    loss = functools.partial(
      dale.alignment_loss,
      labels=jnp.asarray(labels),
      weights_fuzzy=jnp.asarray(w_f),
      gaussians_nonfuzzy=gauss_n,
      eps=jnp.asarray(eps),
      min_pixels=2.0,
      jitter=0.0,
    )
    value, n_classes = loss(jnp.asarray(feats_f))
    assert int(n_classes) == 2
    want = 0.0
    for c in range(2):
      sel = labels.reshape(-1) == c
      xn, xf = feats_n.reshape(-1, 3)[sel], feats_f.reshape(-1, 3)[sel]
      wn, wf = w_n.reshape(-1)[sel], w_f.reshape(-1)[sel]
      mn, mf = np.average(xn, 0, wn), np.average(xf, 0, wf)
      cn = np.cov(xn.T, aweights=wn, bias=True) + eps[c]  # Eq. 13: + ε·11ᵀ
      cf = np.cov(xf.T, aweights=wf, bias=True)
      r = scipy.linalg.sqrtm(cn).real
      want += (
        np.sum((mn - mf) ** 2)
        + np.trace(cn + cf)
        - 2 * np.trace(scipy.linalg.sqrtm(r @ cf @ r).real)
      )
    np.testing.assert_allclose(value, want, rtol=1e-9)
    f = lambda x: loss(x)[0]
    grad = jax.grad(f)(jnp.asarray(feats_f))
    assert np.abs(grad).max() > 0
    for _ in range(3):
      d = jnp.asarray(rng.normal(size=feats_f.shape))
      fd = _fd_directional(f, jnp.asarray(feats_f), d, 1e-6)
      np.testing.assert_allclose(jnp.sum(grad * d), fd, rtol=1e-7)


# ----------------------------------------------------------------------------- ω (Eq. 9)


class TinyNet(nn.Module):
  """conv3x3 -> BatchNorm -> tanh -> conv3x3 (features) -> tanh -> conv1x1; smooth for FD."""

  @nn.compact
  def __call__(self, x, *, train):
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(4, (3, 3))(x))
    features = nn.Conv(3, (3, 3))(jnp.tanh(h))
    return nn.Conv(2, (1, 1))(jnp.tanh(features)), features


@pytest.fixture(scope="module")
def omega_problem():
  """Float64 TinyNet with an Adam state after two real steps; ω from `omega_weights` and
  central differences of the unrolled objective written out here, at 12 pixels."""
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    model = TinyNet()
    shape = (2, 8, 8, 1)
    x = jnp.asarray(rng.normal(size=shape))
    y = jnp.asarray(rng.integers(0, 2, shape[:3]), jnp.int32)
    mf, mn = (jnp.asarray(rng.uniform(0.1, 1, shape[:3])) for _ in range(2))
    xf, xn = x * mf[..., None], x * mn[..., None]
    # Flax keeps float32 parameters unless told: cast, or the virtual step rounds at 1e-7.
    variables = jax.tree.map(
      lambda v: v.astype(jnp.float64), model.init(jax.random.PRNGKey(0), x, train=False)
    )
    opt = dale.make_adam(1e-2)
    params, opt_state = variables["params"], opt.tx.init(variables["params"])
    for _ in range(2):
      fake = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.normal(size=p.shape)), params)
      updates, opt_state = opt.tx.update(fake, opt_state, params)
      params = optax.apply_updates(params, updates)
    variables = {**variables, "params": params}

    @_jit
    def run(variables, opt_state):
      return dale.omega_weights(
        model.apply,
        variables,
        optimizer=opt,
        opt_state=opt_state,
        x_fuzzy=xf,
        x_nonfuzzy=xn,
        y=y,
        mask_fuzzy=mf,
        mask_nonfuzzy=mn,
        lr=0.1,
        steps=1,
      )

    omega, g, meta_loss = run(variables, opt_state)

    def forward(p, images):
      (logits, _), _ = model.apply(
        {**variables, "params": p}, images, train=True, mutable=["batch_stats"]
      )
      return logits

    ce = optax.softmax_cross_entropy_with_integer_labels

    def objective(w):
      grads = jax.grad(lambda p: jnp.mean(w * mf * ce(forward(p, xf), y)))(params)
      updates, _ = opt.base.update(grads, opt_state, params)
      return jnp.mean(mn * ce(forward(optax.apply_updates(params, updates), xn), y))

    idx = rng.choice(y.size, 12, replace=False)

    @_jit
    def fd(idx, eps):
      e = jax.nn.one_hot(idx, y.size, dtype=jnp.float64).reshape((-1,) + y.shape) * eps
      vals = jax.vmap(objective)(jnp.concatenate([1.0 + e, 1.0 - e]))
      return (vals[: len(idx)] - vals[len(idx) :]) / (2 * eps), objective(jnp.ones(y.shape))

    # G is ~1e-6 against an objective of ~0.7: the rounding error of a central difference is
    # ~1e-16 · 0.7 / eps, so the step is large; the objective is smooth (tanh, Adam's √v̂ > 0).
    g_fd, loss_at_one = fd(jnp.asarray(idx), FD_EPS_OMEGA)
    return {
      "omega": np.asarray(omega),
      "g": np.asarray(g),
      "meta_loss": float(meta_loss),
      "g_fd": np.asarray(g_fd),
      "loss_at_one": float(loss_at_one),
      "idx": idx,
    }


def test_omega_meta_gradient_matches_finite_differences(omega_problem):
  p = omega_problem
  g = p["g"].reshape(-1)[p["idx"]]
  assert np.abs(g).max() > 0
  np.testing.assert_allclose(g, p["g_fd"], rtol=0, atol=1e-7 * np.abs(g).max())
  np.testing.assert_allclose(p["meta_loss"], p["loss_at_one"], rtol=1e-12)


def test_omega_is_one_adam_step(omega_problem):
  """K = 1 from ω0 = 1: Adam's first (bias-corrected) step, ω = 1 − lr·G / (|G| + 1e-8)."""
  g = omega_problem["g"]
  np.testing.assert_allclose(omega_problem["omega"], 1.0 - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-9)


# ----------------------------------------------------------------------------- the method


def _batch(config, seed=0, b=4):
  rng = np.random.default_rng(seed)
  s = config.data.size
  yy, xx = np.mgrid[:s, :s]
  label = (((yy - 14) ** 2 + (xx - 18) ** 2) < 80).astype(np.int32)
  image = label[None, ..., None] + 0.3 * rng.standard_normal((b, s, s, 1))
  return {
    "image": jnp.asarray(image, jnp.float32),
    "noisy_label": jnp.asarray(np.stack([label] * b)),
  }


@pytest.fixture(scope="module")
def stepped():
  """One jitted step of each phase, and the diagnostics, on the tiny config (U-Net).

  The main step and the diagnostics compile as one program: XLA merges the forwards, backwards
  and the ω computation they share, which saves ~20 s of CPU compile time.
  """
  config = _config(warmup_epochs=1)
  method = dale.DALE(config, steps_per_epoch=5)
  state = method.init_state(jax.random.PRNGKey(0))
  batch = _batch(config)
  main = method.train_step("main")
  both = _jit(lambda s, b, r: (main(s, b, r), method.diagnostics(s, b)))
  out = {"method": method, "state": state}
  out["main"], out["diag"] = jax.device_get(both(state, batch, jax.random.PRNGKey(1)))
  warmup = _jit(method.train_step("warmup"))
  out["warmup"] = jax.device_get(warmup(state, batch, jax.random.PRNGKey(1)))
  return out


def _changed(a, b):
  return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("phase", ["warmup", "main"])
def test_step_is_finite_and_trains(stepped, phase):
  state = stepped["state"]
  new_state, metrics = stepped[phase]
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(new_state.step) == 1
  assert _changed(state.params, new_state.params)
  assert _changed(state.batch_stats, new_state.batch_stats)
  for leaf in jax.tree.leaves(new_state.params):
    assert np.all(np.isfinite(leaf))


def test_main_step_makes_two_adam_updates(stepped):
  (new_state, metrics), (warm_state, _) = stepped["main"], stepped["warmup"]
  counts = lambda s: {int(c) for c in jax.tree.leaves(s.opt_state) if np.ndim(c) == 0}
  assert counts(new_state) == {2} and counts(warm_state) == {1}
  assert 0 < metrics["fuzzy_frac"] < 1  # the circle's patches are fuzzy, the others not
  assert 0 < metrics["omega_step"] <= 0.1 + 1e-6  # one Adam step of lr 0.1
  assert metrics["w2_term"] > 0


def test_diagnostics(stepped):
  d = stepped["diag"]
  want = {
    "fuzzy_frac",
    "mask_f_mean",
    "mask_n_mean",
    "omega_fuzzy",
    "omega_nonfuzzy",
    "omega_keep_frac",
    "omega_grad_abs",
    "meta_loss",
    "w2_term",
    "w2_classes",
    "seg_term",
  }
  assert set(d) == want
  assert all(np.isfinite(v) for v in d.values()), d
  assert 0.9 - 1e-6 <= d["omega_fuzzy"] <= 1.1 + 1e-6
  assert 0 <= d["omega_keep_frac"] <= 1 and int(d["w2_classes"]) == 2


def test_config_phases_and_optimizer():
  method = dale.DALE(_config(warmup_epochs=2), steps_per_epoch=3)
  assert [method.phase(e) for e in range(3)] == ["warmup", "warmup", "main"]
  assert method.learning_rate(0) == method.learning_rate(1000) == pytest.approx(3e-4)
  assert method.optimizer.name == "adam"
  with pytest.raises(ConfigError, match="patch_size"):
    dale.DALE(_config(patch_size=12), steps_per_epoch=3)
  with pytest.raises(ConfigError, match="nonfuzzy_mask"):
    dale.DALE(_config(nonfuzzy_mask="tau_minus"), steps_per_epoch=3)
