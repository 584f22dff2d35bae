"""Tests for metadcseg_jax.core.meta: exact pixel-wise meta-gradients (App. A.3, Eq. 21-29).

The reference for exactness is a central finite difference, in float64, of the one-step
unrolled objective `Lval(θ̂(a, b))` written out independently here (`_unrolled_objective`).
Compiled functions live in module-scoped fixtures: XLA compile time dominates on a CPU.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metadcseg_jax import configs
from metadcseg_jax.core import meta
from metadcseg_jax.core import models
from metadcseg_jax.core import optim

NUM_PIXELS = 20  # random pixels checked by finite differences
FD_EPS = 1e-5  # TinyNet is smooth (tanh): the error is flat from 1e-4 to 1e-6
# U-Net++ is piecewise linear (ReLU, max-pool): a larger step crosses kinks of units that sit
# near zero; at 1e-7 (float64) it crosses none here and rounding is still far below 1e-5.
FD_EPS_UNET = 1e-7
FD_RTOL = 1e-5
# The reverse route on U-Net++ (float64: FD error 1.8e-7, 2.5e-16 from the JVP route) costs
# ~20 s more compile; TinyNet checks it against FD. Add "reverse" here to check it again.
UNET_ROUTES = ("jvp", "reverse")
LR = 0.1
# Per-jit XLA options: compile 2-4x faster on CPU; runtime suffers (up to 10x), so only for
# functions that run once or twice.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


class TinyNet(nn.Module):
  """conv3x3 -> BatchNorm -> tanh -> conv3x3 (features) -> tanh -> conv1x1 (logits); smooth."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, *, train):
    h = nn.Conv(4, (3, 3))(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    features = nn.Conv(4, (3, 3))(jnp.tanh(h))
    logits = nn.Conv(self.num_classes, (1, 1))(jnp.tanh(features))
    return logits, features


class PixelLinear(nn.Module):
  """A per-pixel linear classifier (1x1 conv); its features are its input."""

  num_classes: int = 2

  @nn.compact
  def __call__(self, x, *, train):
    del train
    return nn.Conv(self.num_classes, (1, 1))(x), x


class Problem(NamedTuple):
  apply_fn: Any
  variables: Any
  opt_state: Any
  opt: optim.Optimizer
  x: Any
  y: Any
  xv: Any
  yv: Any

  @property
  def data(self):
    return self.x, self.y, self.xv, self.yv

  @property
  def batches(self):
    """The two batches as `meta_weights` takes them, by name."""
    return {"x": self.x, "y": self.y, "xv": self.xv, "yv": self.yv}


def _random_variables(model, x, rng):
  """PyTorch-like random variables drawn on the host: `model.init` compiles slowly on CPU.

  Kernels U(±1/sqrt(fan_in)), biases U(±0.1), BatchNorm scale 1 and bias 0, running mean 0
  and variance 1.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)

  def draw(path, leaf):
    keys = [str(getattr(k, "key", k)) for k in path]
    is_norm = any(k.startswith(("bn", "BatchNorm")) for k in keys)
    if keys[-1] == "kernel":
      bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return rng.uniform(-bound, bound, leaf.shape)
    if keys[-1] == "bias" and not is_norm:
      return rng.uniform(-0.1, 0.1, leaf.shape)
    return np.ones(leaf.shape) if keys[-1] in ("scale", "var") else np.zeros(leaf.shape)

  return jax.tree_util.tree_map_with_path(
    lambda p, leaf: jnp.asarray(draw(p, leaf), x.dtype), dict(shapes)
  )


def _make_problem(model, opt, *, shape, num_classes, dtype=jnp.float32, seed=0, fake_steps=2):
  """Random data and a model whose optimizer state has a non-zero momentum buffer.

  The buffer comes from `fake_steps` real `tx` updates on random gradients.
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  y = jnp.asarray(rng.integers(0, num_classes, shape[:3]), jnp.int32)
  xv = jnp.asarray(rng.normal(size=shape), dtype)
  yv = jnp.asarray(rng.integers(0, num_classes, shape[:3]), jnp.int32)
  variables = _random_variables(model, x, rng)
  params = variables["params"]
  fake_grads = [
    jax.tree.map(lambda p: jnp.asarray(0.3 * rng.normal(size=p.shape), dtype), params)
    for _ in range(fake_steps)
  ]

  @_jit
  def steps(params, fake_grads):
    state = opt.tx.init(params)
    for grads in fake_grads:
      updates, state = opt.tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  params, state = steps(params, fake_grads)
  return Problem(model.apply, {**variables, "params": params}, state, opt, x, y, xv, yv)


def _meta_fn(pb, *, route, a0b0=(0.0, 0.0), normalizer="image", opt=None, apply_fn=None):
  """Jitted `(variables, opt_state, x, y, xv, yv, eta) -> MetaOutput`."""
  return _jit(
    lambda v, s, x, y, xv, yv, eta: meta.meta_weights(
      apply_fn or pb.apply_fn,
      v,
      optimizer=opt or pb.opt,
      opt_state=s,
      x=x,
      y=y,
      xv=xv,
      yv=yv,
      options=meta.MetaOptions(*a0b0, eta=eta, normalizer=normalizer, route=route),
    )
  )


def _run(fn, pb, eta=1.0, opt_state=None):
  out = fn(pb.variables, pb.opt_state if opt_state is None else opt_state, *pb.data, eta)
  return jax.tree.map(np.asarray, out)


def _unrolled_objective(apply_fn, opt, variables, opt_state, x, y, xv, yv):
  """`(a, b) -> Lval(θ + U(∇θ Σ (a·f + b·g) / (B·H·W), s))`, written independently of meta.py."""
  params = variables["params"]
  ce = optax.softmax_cross_entropy_with_integer_labels

  def forward(p, images):
    (logits, _), _ = apply_fn(
      {**variables, "params": p}, images, train=True, mutable=["batch_stats"]
    )
    return logits

  y_pseudo = jnp.argmax(forward(params, x), -1)

  def train_loss(p, a, b):
    logits = forward(p, x)
    return jnp.sum(a * ce(logits, y) + b * ce(logits, y_pseudo)) / y.size

  def objective(a, b):
    grads = jax.grad(train_loss)(params, a, b)
    updates, _ = opt.base.update(grads, opt.base_state(opt_state), params)
    return jnp.mean(ce(forward(optax.apply_updates(params, updates), xv), yv))

  return objective


def _central_differences(pb):
  """Jitted `(a0, b0, pixel ids (K,), eps) -> (dLval/da, dLval/db)` at K pixels, (K,) each."""

  @jax.jit  # runs 80 unrolled steps: XLA's default optimisation pays off here
  def fd(variables, opt_state, x, y, xv, yv, a0, b0, idx, eps):
    # Everything is an argument: closed-over arrays would be constant-folded by XLA (slow).
    objective = _unrolled_objective(pb.apply_fn, pb.opt, variables, opt_state, x, y, xv, yv)
    e = jax.nn.one_hot(idx, y.size, dtype=a0.dtype).reshape((-1,) + y.shape) * eps
    base_a = jnp.broadcast_to(a0, e.shape)
    base_b = jnp.broadcast_to(b0, e.shape)
    a = jnp.concatenate([base_a + e, base_a - e, base_a, base_a])
    b = jnp.concatenate([base_b, base_b, base_b + e, base_b - e])
    vals = jax.vmap(objective)(a, b).reshape(4, -1)
    return (vals[0] - vals[1]) / (2 * eps), (vals[2] - vals[3]) / (2 * eps)

  return lambda a0, b0, idx, eps: fd(pb.variables, pb.opt_state, *pb.data, a0, b0, idx, eps)


def _fd_errors(fd, pb, out, a0b0, idx, eps):
  """Max relative error of out.ga / out.gb against central differences at pixels idx."""
  dtype = pb.x.dtype
  a0 = jnp.full(pb.y.shape, a0b0[0], dtype)
  b0 = jnp.full(pb.y.shape, a0b0[1], dtype)
  # The virtual loss averages over the n = B·H·W pixels, so a weight moves θ̂ by 1/n of its
  # change: ε·n keeps the step in θ̂ (and its distance to the ReLU kinks) at ε's.
  fd_a, fd_b = (np.asarray(v) for v in fd(a0, b0, jnp.asarray(idx), eps * pb.y.size))
  errs = []
  for exact, approx in ((out.ga.reshape(-1)[idx], fd_a), (out.gb.reshape(-1)[idx], fd_b)):
    assert np.all(np.isfinite(exact)) and np.max(np.abs(exact)) > 0
    errs.append(float(np.max(np.abs(exact - approx) / np.abs(exact))))
  return errs


def _pixels(pb, seed):
  return np.random.default_rng(seed).choice(pb.y.size, NUM_PIXELS, replace=False)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def conv_f64():
  """Float64 TinyNet: meta-gradients of both routes at (0,0) and (1,0), SGD and Adam, vs FD."""
  res = {}
  with jax.enable_x64(True):
    sgd = optim.make_optimizer(learning_rate=LR, weight_decay=5e-4, grad_clip=0.5)
    pb = _make_problem(TinyNet(), sgd, shape=(2, 8, 8, 2), num_classes=3, dtype=jnp.float64)
    fd = _central_differences(pb)
    idx = _pixels(pb, 0)
    for a0b0 in ((0.0, 0.0), (1.0, 0.0)):
      for route in ("reverse", "jvp"):
        out = _run(_meta_fn(pb, route=route, a0b0=a0b0), pb)
        res[route, a0b0] = _fd_errors(fd, pb, out, a0b0, idx, FD_EPS)
        if route == "reverse" and a0b0 == (0.0, 0.0):
          res["eps_sweep"] = {
            eps: _fd_errors(fd, pb, out, a0b0, idx, eps) for eps in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
          }
    adam = optim.make_optimizer(name="adam", learning_rate=1e-2, weight_decay=5e-4)
    pb_adam = _make_problem(TinyNet(), adam, shape=(2, 8, 8, 2), num_classes=3, dtype=jnp.float64)
    out = _run(_meta_fn(pb_adam, route="reverse"), pb_adam)
    res["adam"] = _fd_errors(_central_differences(pb_adam), pb_adam, out, (0.0, 0.0), idx, FD_EPS)
  return res


@pytest.fixture(scope="module")
def unet_f64():
  """Float64 tiny U-Net++ (width 4, 32x32): the routes in UNET_ROUTES vs FD at (0, 0).

  32x32 rather than 16x16: at 16x16 the deepest BatchNorm normalises two values per channel,
  which makes the unrolled objective too curved for any finite-difference step.
  """
  with jax.enable_x64(True):
    model = models.UNetPlusPlus(num_classes=2, width=4, dtype=jnp.float64)
    sgd = optim.make_optimizer(learning_rate=LR, weight_decay=5e-4)
    pb = _make_problem(model, sgd, shape=(2, 32, 32, 1), num_classes=2, dtype=jnp.float64)
    (logits, _), _ = pb.apply_fn(pb.variables, pb.x, train=True, mutable=["batch_stats"])
    if logits.dtype != jnp.float64:
      pytest.fail(
        f"U-Net++ with dtype float64 returned {logits.dtype} logits: a float64 "
        "finite-difference check needs float64 outputs"
      )
    fd = _central_differences(pb)
    idx = _pixels(pb, 1)
    res = {}
    for route in UNET_ROUTES:
      res[route] = out = _run(_meta_fn(pb, route=route), pb)
      res[route, "fd"] = _fd_errors(fd, pb, out, (0.0, 0.0), idx, FD_EPS_UNET)
  return res


@pytest.fixture(scope="module")
def conv32():
  sgd = optim.make_optimizer(learning_rate=LR, weight_decay=5e-4, grad_clip=0.5)
  return _make_problem(TinyNet(), sgd, shape=(2, 8, 8, 2), num_classes=3)


@pytest.fixture(scope="module")
def conv32_out(conv32):
  """Float32 MetaOutputs of both routes at (0,0) and (1,0), and the batch normaliser."""
  outs = {}
  for a0b0 in ((0.0, 0.0), (1.0, 0.0)):
    for route in ("reverse", "jvp"):
      outs[route, a0b0] = _run(_meta_fn(conv32, route=route, a0b0=a0b0), conv32)
  outs["batch"] = _run(_meta_fn(conv32, route="jvp", normalizer="batch"), conv32)
  return outs


# ----------------------------------------------------------------------------- (a) exactness


@pytest.mark.parametrize("route", ["reverse", "jvp"])
@pytest.mark.parametrize("a0b0", [(0.0, 0.0), (1.0, 0.0)])
def test_finite_differences_tiny_conv(conv_f64, route, a0b0):
  err_a, err_b = conv_f64[route, a0b0]
  print(
    f"FD rel. error {route} {a0b0}: Ga {err_a:.2e}, Gb {err_b:.2e}; "
    f"eps sweep {conv_f64['eps_sweep']}"
  )
  assert err_a <= FD_RTOL and err_b <= FD_RTOL


@pytest.mark.parametrize("route", UNET_ROUTES)
def test_finite_differences_unetpp(unet_f64, route):
  err_a, err_b = unet_f64[route, "fd"]
  print(f"FD rel. error U-Net++ {route}: Ga {err_a:.2e}, Gb {err_b:.2e}")
  assert err_a <= FD_RTOL and err_b <= FD_RTOL


def test_unetpp_routes_agree_float64(unet_f64):
  """The two exact routes on the U-Net++ itself (independent of the FD step size)."""
  for field in ("ga", "gb", "a_hat", "b_hat"):
    want = np.asarray(getattr(unet_f64["jvp"], field))
    got = np.asarray(getattr(unet_f64["reverse"], field))
    scale = np.abs(want).max()
    assert scale > 0, field
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * scale, err_msg=field)


def test_reverse_route_exact_for_adam(conv_f64):
  err_a, err_b = conv_f64["adam"]
  print(f"FD rel. error adam reverse: Ga {err_a:.2e}, Gb {err_b:.2e}")
  assert err_a <= FD_RTOL and err_b <= FD_RTOL


def test_eq29_inner_product_form():
  # Fresh SGD state, no weight decay: θ̂ = θ at (0, 0), so Ga_k = −λ/n <∇Lval(θ), ∇f_k(θ)>
  # (Eq. 29, with the virtual loss averaged over the n = B·H·W pixels), checked pixel by pixel
  # with an explicit Jacobian.
  opt = optim.make_optimizer(learning_rate=0.3, weight_decay=0.0)
  pb = _make_problem(PixelLinear(), opt, shape=(2, 4, 4, 3), num_classes=2, fake_steps=0)
  out = _run(_meta_fn(pb, route="jvp"), pb)
  params = pb.variables["params"]
  ce = optax.softmax_cross_entropy_with_integer_labels
  logits = lambda p, x: pb.apply_fn({"params": p}, x, train=True)[0]
  grad_val = jax.grad(lambda p: jnp.mean(ce(logits(p, pb.xv), pb.yv)))(params)
  jac_f = jax.jacrev(lambda p: ce(logits(p, pb.x), pb.y))(params)  # leaves (B,H,W,...)
  inner = sum(
    jnp.tensordot(j, g, axes=g.ndim)
    for j, g in zip(jax.tree.leaves(jac_f), jax.tree.leaves(grad_val))
  )
  np.testing.assert_allclose(out.ga, -0.3 * inner / pb.y.size, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("route", ["reverse", "jvp"])
def test_virtual_step_at_1_0_is_a_mean_ce_step(route):
  """At (a0, b0) = (1, 0) the virtual step is the real step's plain mean-CE SGD step, so the
  meta loss is Lval(θ − λ∇ mean CE(θ)); a virtual loss summed over pixels would take an
  H·W·B times larger step."""
  opt = optim.make_optimizer(learning_rate=0.3, weight_decay=0.0)
  pb = _make_problem(PixelLinear(), opt, shape=(2, 4, 4, 3), num_classes=2, fake_steps=0)
  out = _run(_meta_fn(pb, route=route, a0b0=(1.0, 0.0)), pb)
  params = pb.variables["params"]
  ce = optax.softmax_cross_entropy_with_integer_labels
  logits = lambda p, x: pb.apply_fn({"params": p}, x, train=True)[0]
  grads = jax.grad(lambda p: jnp.mean(ce(logits(p, pb.x), pb.y)))(params)
  theta_hat = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
  want = jnp.mean(ce(logits(theta_hat, pb.xv), pb.yv))
  np.testing.assert_allclose(out.meta_loss, want, rtol=1e-6)


# ----------------------------------------------------------------------------- (b) routes agree


@pytest.mark.parametrize("a0b0", [(0.0, 0.0), (1.0, 0.0)])
def test_reverse_and_jvp_agree_float32(conv32_out, a0b0):
  rev, fwd = conv32_out["reverse", a0b0], conv32_out["jvp", a0b0]
  for name in ("ga", "gb"):
    r, j = getattr(rev, name), getattr(fwd, name)
    rel = np.max(np.abs(r - j)) / np.max(np.abs(r))
    print(f"reverse vs jvp float32 {a0b0} {name}: {rel:.2e}")
    assert np.max(np.abs(r)) > 0 and rel <= 1e-5
  np.testing.assert_allclose(rev.meta_loss, fwd.meta_loss, rtol=1e-5)
  np.testing.assert_array_equal(rev.y_pseudo, fwd.y_pseudo)


def test_sgd_update_transpose_is_minus_lr():
  # Lᵀ v = −λ v for SGD with momentum and weight decay, λ read from the schedule at the
  # current count; with Nesterov −λ (1 + μ) v.
  params = {"w": jnp.arange(6.0).reshape(2, 3) - 2.0}
  v = {"w": jnp.array([[0.5, -1.0, 2.0], [3.0, 0.0, -0.25]])}
  sched = optim.lr_schedule(0.2, steps_per_epoch=2)
  for nesterov, factor in ((False, 1.0), (True, 1.9)):
    opt = optim.make_optimizer(
      learning_rate=sched, weight_decay=5e-4, grad_clip=0.1, nesterov=nesterov
    )
    state = opt.tx.init(params)
    for _ in range(5):  # count 5 -> epoch 2; a non-zero buffer
      _, state = opt.tx.update(v, state, params)
    g0 = jax.tree.map(jnp.zeros_like, params)
    _, linear, transpose = meta.linearize_update(opt, state, params=params, grads=g0)
    lr = 0.2 * 20 / 22
    np.testing.assert_allclose(transpose(v)["w"], -lr * factor * v["w"], rtol=1e-6)
    np.testing.assert_allclose(linear(v)["w"], -lr * factor * v["w"], rtol=1e-6)


# ----------------------------------------------------------------------------- (c) invariances


def test_weights_independent_of_lr_and_eta(conv32, conv32_out):
  # With (0, 0), a fresh state and no weight decay θ̂ = θ, so Ga ∝ λ and â, b̂, π do not
  # depend
  # on λ; η cancels in the normalisation for any state.
  outs = []
  for lr in (0.01, 0.1):
    opt = optim.make_optimizer(learning_rate=lr, weight_decay=0.0)
    fresh = opt.tx.init(conv32.variables["params"])
    outs.append(_run(_meta_fn(conv32, route="jvp", opt=opt), conv32, opt_state=fresh))
  slow, fast = outs
  np.testing.assert_allclose(fast.ga, 10.0 * slow.ga, rtol=1e-4, atol=1e-9)
  for name in ("a_hat", "b_hat", "pi_a", "pi_b"):
    np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-4, atol=1e-7)
  base = conv32_out["jvp", (0.0, 0.0)]
  scaled = _run(_meta_fn(conv32, route="jvp"), conv32, eta=7.5)
  np.testing.assert_allclose(scaled.a_tilde, 7.5 * base.a_tilde, rtol=1e-5, atol=1e-12)
  for name in ("a_hat", "b_hat", "pi_a", "pi_b", "ga", "gb"):
    np.testing.assert_allclose(getattr(scaled, name), getattr(base, name), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- (d) weights


@pytest.mark.parametrize("key", [("jvp", (0.0, 0.0)), ("reverse", (1.0, 0.0)), "batch"])
def test_weights_nonnegative_and_normalised(conv32_out, key):
  out = conv32_out[key]
  a0 = key[1][0] if isinstance(key, tuple) else 0.0
  for w in (out.a_tilde, out.b_tilde, out.a_hat, out.b_hat, out.gamma, out.pi_a, out.pi_b):
    assert np.all(w >= 0) and np.all(np.isfinite(w))
  np.testing.assert_allclose(out.a_tilde, np.maximum(a0 - out.ga, 0), rtol=1e-6)
  total = out.a_hat + out.b_hat
  sums = total.sum() if key == "batch" else total.sum(axis=(1, 2))
  np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
  if key == "batch":  # per-image sums are then not 1
    assert not np.allclose(total.sum(axis=(1, 2)), 1.0, rtol=1e-3)
  np.testing.assert_allclose(out.gamma, out.a_tilde + out.b_tilde, rtol=1e-6)
  positive = out.gamma > 0
  np.testing.assert_allclose((out.pi_a + out.pi_b)[positive], 1.0, rtol=1e-6)
  assert np.all(out.pi_a[~positive] == 0) and np.all(out.pi_b[~positive] == 0)
  # Both signs occur in a random problem, so both branches of the rectifier are exercised.
  assert 0 < positive.mean() < 1 or a0 > 0


def test_without_bootstrapping_the_pseudo_labels_take_no_weight(conv32_out):
  """`bootstrap=False` (learning to reweight): b̃ = 0 everywhere, ã as with bootstrapping, and
  Eq. 24's normaliser over ã alone."""
  out = conv32_out["jvp", (0.0, 0.0)]
  a_t, b_t, a_hat, b_hat, gamma, pi_a, pi_b = (
    np.asarray(v)
    for v in meta._rectify_normalize(
      jnp.asarray(out.ga), jnp.asarray(out.gb), meta.MetaOptions(bootstrap=False)
    )
  )
  assert not b_t.any() and not b_hat.any() and not pi_b.any()
  assert out.b_tilde.any()  # with bootstrapping the same meta-gradients weight g
  np.testing.assert_allclose(a_t, out.a_tilde, rtol=1e-6)
  np.testing.assert_allclose(gamma, a_t)
  by_hand = a_t / (a_t.sum(axis=(1, 2), keepdims=True) + meta.EPS_Z)
  np.testing.assert_allclose(a_hat, by_hand, rtol=1e-6)
  np.testing.assert_allclose(pi_a[a_t > 0], 1.0)


# ----------------------------------------------------------------------------- (e) BatchNorm


def test_batchnorm_train_mode_and_running_stats_untouched(conv32, conv32_out):
  before = jax.tree.map(np.array, conv32.variables["batch_stats"])
  out = _run(_meta_fn(conv32, route="jvp"), conv32)
  assert "batch_stats" not in meta.MetaOutput._fields
  for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(conv32.variables["batch_stats"])):
    np.testing.assert_array_equal(b, a)
  (train_logits, _), _ = conv32.apply_fn(
    conv32.variables, conv32.x, train=True, mutable=["batch_stats"]
  )
  eval_logits, _ = conv32.apply_fn(conv32.variables, conv32.x, train=False)
  np.testing.assert_allclose(out.logits, train_logits, rtol=1e-5, atol=1e-6)
  assert not np.allclose(out.logits, eval_logits, atol=1e-3)
  # An eval-mode model gives different meta-gradients: train mode matters and is used.
  eval_apply = functools.partial(_eval_mode_apply, conv32.apply_fn)
  ev = _run(_meta_fn(conv32, route="jvp", apply_fn=eval_apply), conv32)
  assert np.max(np.abs(ev.ga - out.ga)) > 1e-2 * np.max(np.abs(out.ga))


def _eval_mode_apply(apply_fn, variables, x, *, train, mutable):
  del train
  return apply_fn(variables, x, train=False, mutable=mutable)


# ----------------------------------------------------------------------------- (f) known answer


def test_flipped_labels_get_lower_alpha():
  # Two classes separable by the first input channel (+1 right half, −1 left half); half of
  # the right half's training labels are flipped to 0; the meta batch is clean.
  h = w = 8
  cls = np.zeros((h, w), np.int32)
  cls[:, w // 2 :] = 1
  rng = np.random.default_rng(0)

  def images(n):
    sign = 2.0 * cls - 1.0
    chans = [sign + 0.3 * rng.normal(size=(n, h, w)), 0.3 * rng.normal(size=(n, h, w))]
    return jnp.asarray(np.stack(chans, -1), jnp.float32)

  x, xv = images(2), images(2)
  yv = jnp.asarray(np.broadcast_to(cls, (2, h, w)))
  flipped = np.zeros((2, h, w), bool)
  flipped[:, ::2, w // 2 :] = True
  y = jnp.asarray(np.where(flipped, 0, cls[None]))
  model = PixelLinear()
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  opt = optim.make_optimizer(learning_rate=LR)
  pb = Problem(model.apply, variables, opt.tx.init(variables["params"]), opt, x, y, xv, yv)
  out = _run(_meta_fn(pb, route="jvp"), pb)
  clean_alpha = out.a_tilde[~flipped].mean()
  assert out.a_tilde[flipped].mean() < 0.1 * clean_alpha
  assert np.mean(np.asarray(out.a_tilde[flipped]) == 0) > 0.9
  assert np.mean(np.asarray(out.a_tilde[~flipped]) > 0) > 0.9


# ----------------------------------------------------------------------------- (g) adam


def test_jvp_route_refused_for_adam(conv32):
  adam = optim.make_optimizer(name="adam", learning_rate=1e-3)
  state = adam.tx.init(conv32.variables["params"])
  with pytest.raises(ValueError, match=r"(?s)'adam'.*route='reverse'"):
    meta.meta_weights(
      conv32.apply_fn,
      conv32.variables,
      optimizer=adam,
      opt_state=state,
      **conv32.batches,
      options=meta.MetaOptions(route="jvp"),
    )


def test_one_direction_serves_every_training_batch():
  """At (0, 0) the meta batch's direction (`meta_direction`) with one JVP per training batch
  gives every weight of the reverse route (an independent derivative) on two training batches,
  in float64, with momentum and weight decay in the update."""
  with jax.enable_x64(True):
    sgd = optim.make_optimizer(learning_rate=LR, weight_decay=5e-4, grad_clip=0.5)
    pb = _make_problem(TinyNet(), sgd, shape=(2, 8, 8, 2), num_classes=3, dtype=jnp.float64)
    other = _make_problem(
      TinyNet(), sgd, shape=(2, 8, 8, 2), num_classes=3, dtype=jnp.float64, seed=1
    )
    direction = _jit(
      lambda v, s, xv, yv: meta.meta_direction(
        pb.apply_fn, v, optimizer=pb.opt, opt_state=s, xv=xv, yv=yv
      )
    )(pb.variables, pb.opt_state, pb.xv, pb.yv)
    for normalizer, eta in (("image", 1.0), ("batch", 0.3)):
      options = meta.MetaOptions(eta=eta, normalizer=normalizer)
      along = _jit(
        lambda v, x, y, d: meta.meta_weights_along(
          pb.apply_fn, v, x=x, y=y, direction=d, options=options
        )
      )
      reverse = _meta_fn(pb, route="reverse", normalizer=normalizer)
      for x, y in ((pb.x, pb.y), (other.x, other.y)):
        got = jax.tree.map(np.asarray, along(pb.variables, x, y, direction))
        want = jax.tree.map(
          np.asarray, reverse(pb.variables, pb.opt_state, x, y, pb.xv, pb.yv, eta)
        )
        assert np.max(np.abs(want.ga)) > 0 and np.mean(want.a_tilde > 0) > 0.2
        for name in meta.MetaOutput._fields:
          np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-14, err_msg=name
          )


def test_direction_refused_where_the_virtual_step_needs_the_training_batch(conv32):
  adam = optim.make_optimizer(name="adam", learning_rate=1e-3)
  state = adam.tx.init(conv32.variables["params"])
  with pytest.raises(ValueError, match=r"'adam'.*route='reverse'"):
    meta.meta_direction(
      conv32.apply_fn,
      conv32.variables,
      optimizer=adam,
      opt_state=state,
      xv=conv32.xv,
      yv=conv32.yv,
    )
  direction = meta.MetaDirection(conv32.variables["params"], jnp.zeros(()))
  with pytest.raises(ValueError, match=r"\(a0, b0\) = \(0, 0\), got \(1.0, 0.0\)"):
    meta.meta_weights_along(
      conv32.apply_fn,
      conv32.variables,
      x=conv32.x,
      y=conv32.y,
      direction=direction,
      options=meta.MetaOptions(1.0),
    )
  with pytest.raises(ValueError, match=r"yv must be \(B,H,W\)"):
    meta.meta_direction(
      conv32.apply_fn,
      conv32.variables,
      optimizer=conv32.opt,
      opt_state=conv32.opt_state,
      xv=conv32.xv,
      yv=conv32.y[:1],
    )


# ----------------------------------------------------------------------------- (h) step grads


def _loss_from_outputs(y):
  def loss(logits, features, mo):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    # Uses features too, so both cotangents of the shared forward are exercised.
    feat = jnp.sum(mo.pi_a[..., None] * features**2) / features.size
    total = jnp.sum(jnp.sum(mo.a_hat * ce, axis=(1, 2))) / y.shape[0] + 0.1 * feat
    return total, {"feat": feat}

  return loss


@pytest.mark.parametrize(
  "route,a0b0", [("jvp", (0.0, 0.0)), ("jvp", (1.0, 0.0)), ("reverse", (0.0, 0.0))]
)
def test_meta_step_grads_matches_plain_grad(conv32, conv32_out, route, a0b0):
  pb = conv32
  loss_fn = _loss_from_outputs(pb.y)
  step = _jit(
    lambda v, s, x, y, xv, yv: meta.meta_step_grads(
      pb.apply_fn,
      v,
      optimizer=pb.opt,
      opt_state=s,
      x=x,
      y=y,
      xv=xv,
      yv=yv,
      loss_from_outputs=loss_fn,
      options=meta.MetaOptions(*a0b0, route=route),
    )
  )
  grads, new_stats, loss, mo, aux = step(pb.variables, pb.opt_state, *pb.data)
  mw = conv32_out[route, a0b0]
  for name in ("a_hat", "b_hat", "ga", "gb", "logits"):
    np.testing.assert_allclose(getattr(mo, name), getattr(mw, name), rtol=1e-4, atol=1e-7)

  def plain(params):
    (logits, features), upd = pb.apply_fn(
      {**pb.variables, "params": params}, pb.x, train=True, mutable=["batch_stats"]
    )
    total, aux = loss_fn(logits, features, mo)
    return total, (upd["batch_stats"], aux)

  (want_loss, (want_stats, want_aux)), want = _jit(jax.value_and_grad(plain, has_aux=True))(
    pb.variables["params"]
  )
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["feat"], want_aux["feat"], rtol=1e-6)
  for g, gw in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, gw, rtol=1e-5, atol=1e-7)
  # The new running statistics are those of the training forward at θ, and they moved.
  for s, sw, old in zip(
    jax.tree.leaves(new_stats),
    jax.tree.leaves(want_stats),
    jax.tree.leaves(pb.variables["batch_stats"]),
  ):
    np.testing.assert_allclose(s, sw, rtol=1e-6, atol=1e-7)
    assert not np.allclose(s, old)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments(conv32):
  pb = conv32
  call = functools.partial(
    meta.meta_weights, pb.apply_fn, pb.variables, optimizer=pb.opt, opt_state=pb.opt_state
  )
  with pytest.raises(ValueError, match="route"):
    call(**pb.batches, options=meta.MetaOptions(route="forward"))
  with pytest.raises(ValueError, match="normalizer"):
    call(**pb.batches, options=meta.MetaOptions(normalizer="pixel"))
  with pytest.raises(ValueError, match="y must be"):
    call(x=pb.x, y=pb.y[:, :4], xv=pb.xv, yv=pb.yv)
  with pytest.raises(ValueError, match="yv must hold integer"):
    call(x=pb.x, y=pb.y, xv=pb.xv, yv=pb.yv.astype(jnp.float32))
  with pytest.raises(ValueError, match="eta"):
    call(**pb.batches, options=meta.MetaOptions(eta=0.0))
  with pytest.raises(ValueError, match="optimizer"):
    meta.meta_weights(
      pb.apply_fn,
      pb.variables,
      optimizer=optax.sgd(0.1),
      opt_state=pb.opt_state,
      **pb.batches,
    )


def test_meta_options_are_read_by_name():
  """`MetaOptions` reads its fields from `config.meta` by name; the rest is the method's."""
  section = configs.default_config().meta
  names = {f.name for f in dataclasses.fields(meta.MetaOptions)}
  # Read by methods/l2b.py: the "meta off" ablation, L2B's extra clean step, the precision.
  assert set(section) == names | {"use", "extra_clean_step", "precision"}
  markers = {k: f"marker {k}" for k in section}
  options = meta.MetaOptions.from_config(markers)
  assert {k: getattr(options, k) for k in names} == {k: markers[k] for k in names}
  hash(meta.MetaOptions.from_config(section))


def test_effective_fraction_is_kish_on_a_loop():
  rng = np.random.default_rng(3)
  w = np.maximum(rng.normal(size=(2, 5, 4)), 0.0)
  n, s1, s2 = 0, 0.0, 0.0
  for v in w.ravel():
    n, s1, s2 = n + 1, s1 + v, s2 + v * v
  assert float(meta.effective_fraction(jnp.asarray(w))) == pytest.approx(s1 * s1 / (n * s2))
  assert float(meta.effective_fraction(jnp.ones((3, 3)))) == pytest.approx(1.0)
  assert float(meta.effective_fraction(jnp.zeros((3, 3)))) == 0.0
