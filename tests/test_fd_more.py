"""More float64 finite-difference checks of the exact derivatives (MetaDCSeg Eq. 21-22, Eq. 13).

Beyond tests/test_meta.py: a meta batch of another size than the training batch; Nesterov,
AdamW and a learning-rate schedule inside the virtual step (Eq. 21 replays the real update,
whatever it is); the U-Net++ at (a0, b0) = (1, 0); the gradient of the whole MetaDCSeg objective
(Eq. 13) with respect to the parameters; and the step-size sweep asserted: the central
difference's error falls as ε² until rounding takes over.

The unrolled objective `Lval(θ + U(∇θ Σ (a·f + b·g) / (B·H·W), s))` is written out here, with
the optimizer's own clip-free update as U.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metadcseg_jax.core import dcd
from metadcseg_jax.core import meta
from metadcseg_jax.core import models
from metadcseg_jax.core import objective
from metadcseg_jax.core import optim

SLOW = os.environ.get("METADCSEG_SLOW") == "1"
SLOW_REASON = "one case per optimizer in CI: set METADCSEG_SLOW=1 for all"
FD_RTOL = 1e-5
NUM_PIXELS = 12
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class TinyNet(nn.Module):
  """conv3x3 -> BatchNorm -> tanh -> conv3x3 (features) -> tanh -> conv1x1: smooth, float64."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, *, train):
    conv = functools.partial(nn.Conv, dtype=jnp.float64, param_dtype=jnp.float64)
    h = conv(4, (3, 3))(x)
    h = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, dtype=jnp.float64, param_dtype=jnp.float64
    )(h)
    features = conv(4, (3, 3))(jnp.tanh(h))
    return conv(self.num_classes, (1, 1))(jnp.tanh(features)), features


def _problem(model, opt, *, shape, meta_batch, num_classes, seed=0, fake_steps=3):
  """Random float64 data (a meta batch of `meta_batch` images) and parameters whose optimizer
  state has seen `fake_steps` real updates on random gradients (a momentum buffer or Adam
  moments, and a step count that a schedule reads)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape))
  y = jnp.asarray(rng.integers(0, num_classes, shape[:3]), jnp.int32)
  vshape = (meta_batch,) + shape[1:]
  xv = jnp.asarray(rng.normal(size=vshape))
  yv = jnp.asarray(rng.integers(0, num_classes, vshape[:3]), jnp.int32)
  variables = jax.jit(functools.partial(model.init, train=False), compiler_options=FAST_COMPILE)(
    jax.random.PRNGKey(seed), x
  )
  params = variables["params"]
  state = opt.tx.init(params)
  for _ in range(fake_steps):
    grads = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.normal(size=p.shape)), params)
    updates, state = opt.tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return dict(variables={**variables, "params": params}, opt_state=state, data=(x, y, xv, yv))


def _unrolled(apply_fn, opt, variables, opt_state, x, y, xv, yv):
  """`(a, b) -> Lval(θ̂(a, b))` (Eq. 21), independent of meta.py."""
  params = variables["params"]

  def forward(p, images):
    (logits, _), _ = apply_fn(
      {**variables, "params": p}, images, train=True, mutable=["batch_stats"]
    )
    return logits

  def ce(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]

  y_pseudo = jnp.argmax(forward(params, x), -1)

  def train_loss(p, a, b):
    logits = forward(p, x)
    return jnp.sum(a * ce(logits, y) + b * ce(logits, y_pseudo)) / y.size

  def lval(a, b):
    grads = jax.grad(train_loss)(params, a, b)
    updates, _ = opt.base.update(grads, opt.base_state(opt_state), params)
    return jnp.mean(ce(forward(optax.apply_updates(params, updates), xv), yv))

  return lval


def _fd(apply_fn, opt, pb, a0b0, idx, eps):
  """Central differences of Lval in a and b at pixels idx, the step ε·(B·H·W): the virtual loss
  averages over the pixels, so this moves θ̂ by about ε."""

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def fd(variables, opt_state, x, y, xv, yv, idx, eps):
    lval = _unrolled(apply_fn, opt, variables, opt_state, x, y, xv, yv)
    e = jax.nn.one_hot(idx, y.size, dtype=x.dtype).reshape((-1,) + y.shape) * eps
    a0 = jnp.full(e.shape, a0b0[0], x.dtype)
    b0 = jnp.full(e.shape, a0b0[1], x.dtype)
    a = jnp.concatenate([a0 + e, a0 - e, a0, a0])
    b = jnp.concatenate([b0, b0, b0 + e, b0 - e])
    vals = jax.vmap(lval)(a, b).reshape(4, -1)
    return (vals[0] - vals[1]) / (2 * eps), (vals[2] - vals[3]) / (2 * eps)

  y = pb["data"][1]
  return fd(pb["variables"], pb["opt_state"], *pb["data"], jnp.asarray(idx), eps * y.size)


def _meta(apply_fn, opt, pb, a0b0, route):
  fn = jax.jit(
    lambda v, s, x, y, xv, yv: meta.meta_weights(
      apply_fn,
      v,
      optimizer=opt,
      opt_state=s,
      x=x,
      y=y,
      xv=xv,
      yv=yv,
      options=meta.MetaOptions(*a0b0, eta=0.01, route=route),
    ),
    compiler_options=FAST_COMPILE,
  )
  return fn(pb["variables"], pb["opt_state"], *pb["data"])


def _errors(out, fd_a, fd_b, idx):
  errs = []
  for exact, approx in ((out.ga.reshape(-1)[idx], fd_a), (out.gb.reshape(-1)[idx], fd_b)):
    exact, approx = np.asarray(exact), np.asarray(approx)
    assert np.all(np.isfinite(exact)) and np.max(np.abs(exact)) > 0
    errs.append(float(np.max(np.abs(exact - approx) / np.abs(exact))))
  return errs


def _pixels(pb, seed=0):
  y = pb["data"][1]
  return np.random.default_rng(seed).choice(y.size, NUM_PIXELS, replace=False)


# ----------------------------------------------------------------------------- virtual step

OPTIMIZERS = {
  # The schedule decays per epoch of 2 updates: after 3 fake updates the virtual step is in
  # epoch 1 (λ = 0.1·20/21), so reading the wrong count would show.
  "nesterov_schedule": lambda: optim.make_optimizer(
    learning_rate=optim.lr_schedule(0.1, 2), weight_decay=5e-4, grad_clip=0.5, nesterov=True
  ),
  "adamw_schedule": lambda: optim.make_optimizer(
    name="adamw", learning_rate=optim.lr_schedule(1e-2, 2), weight_decay=1e-2, grad_clip=0.5
  ),
}
CASES = [
  ("nesterov_schedule", "jvp", (0.0, 0.0)),
  ("nesterov_schedule", "reverse", (1.0, 0.0)),
  ("adamw_schedule", "reverse", (0.0, 0.0)),
  ("adamw_schedule", "reverse", (1.0, 0.5)),
]
# CI: one case per optimizer; the others with METADCSEG_SLOW=1.
CI_CASES = [CASES[0], CASES[3]]


@pytest.fixture(scope="module")
def fd_results():
  """Meta-gradients vs central differences, training batch 2 and meta batch 3, per case."""
  res = {}
  with jax.enable_x64(True):
    model = TinyNet()
    for name in OPTIMIZERS:
      opt = OPTIMIZERS[name]()
      pb = _problem(model, opt, shape=(2, 8, 8, 2), meta_batch=3, num_classes=3)
      idx = _pixels(pb)
      for case_name, route, a0b0 in CASES if SLOW else CI_CASES:
        if case_name != name:
          continue
        out = _meta(model.apply, opt, pb, a0b0, route)
        fd_a, fd_b = _fd(model.apply, opt, pb, a0b0, idx, 1e-5)
        res[name, route, a0b0] = _errors(out, fd_a, fd_b, idx)
        if name == "nesterov_schedule" and route == "jvp":
          sweep = {}
          for eps in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
            sweep[eps] = _errors(out, *_fd(model.apply, opt, pb, a0b0, idx, eps), idx)
          res["sweep"] = sweep
  return res


@pytest.mark.parametrize(
  "case",
  [
    c if c in CI_CASES else pytest.param(c, marks=pytest.mark.skipif(not SLOW, reason=SLOW_REASON))
    for c in CASES
  ],
  ids=lambda c: f"{c[0]}-{c[1]}-{c[2][0]:g},{c[2][1]:g}",
)
def test_virtual_step_with_other_updates_and_meta_batch_size(fd_results, case):
  err_a, err_b = fd_results[case]
  print(f"FD rel. error {case}: Ga {err_a:.2e}, Gb {err_b:.2e}")
  assert err_a <= FD_RTOL and err_b <= FD_RTOL


def test_eps_sweep_falls_as_eps_squared_until_rounding(fd_results):
  """A central difference errs by O(ε²) (truncation) plus O(u/ε) (rounding, u = 2⁻⁵³): the
  error must drop ~100x per decade of ε while truncation dominates, reach 1e-7 or below, and
  stop improving once rounding dominates. A wrong Ga would leave a floor at its own error."""
  sweep = fd_results["sweep"]
  err = {eps: max(v) for eps, v in sweep.items()}
  print("eps sweep:", {f"{k:g}": f"{v:.1e}" for k, v in err.items()})
  for big, small in ((1e-1, 1e-2), (1e-2, 1e-3)):
    assert 30 < err[big] / err[small] < 300, (big, small, err)
  best = min(err.values())
  assert best <= 1e-7
  assert err[1e-8] > best  # rounding takes over at the smallest steps


# ----------------------------------------------------------------------------- U-Net++ at (1, 0)


@pytest.mark.skipif(
  not SLOW, reason="a U-Net++ unrolled in float64 compiles slowly: set METADCSEG_SLOW=1"
)
@pytest.mark.parametrize("route", ["jvp", "reverse"])
def test_unetpp_at_1_0(route):
  """U-Net++ (ReLU, max-pool: piecewise linear) at the paper's (1, 0), meta batch 3 ≠ 2; a
  small step keeps the difference off the kinks (test_meta.py's FD_EPS_UNET)."""
  with jax.enable_x64(True):
    model = models.UNetPlusPlus(num_classes=2, width=4, dtype=jnp.float64)
    opt = optim.make_optimizer(learning_rate=0.1, weight_decay=5e-4, grad_clip=0.5)
    pb = _problem(model, opt, shape=(2, 32, 32, 1), meta_batch=3, num_classes=2, fake_steps=2)
    idx = _pixels(pb, 1)
    out = _meta(model.apply, opt, pb, (1.0, 0.0), route)
    err_a, err_b = _errors(out, *_fd(model.apply, opt, pb, (1.0, 0.0), idx, 1e-7), idx)
  print(f"FD rel. error U-Net++ (1, 0) {route}: Ga {err_a:.2e}, Gb {err_b:.2e}")
  assert err_a <= FD_RTOL and err_b <= FD_RTOL


# ----------------------------------------------------------------------------- Eq. 13 in θ


@pytest.mark.parametrize(
  "normalizer",
  [
    "image",
    pytest.param(
      "batch",
      marks=pytest.mark.skipif(not SLOW, reason="CI checks one normaliser: METADCSEG_SLOW=1"),
    ),
  ],
)
def test_metadcseg_objective_gradient_in_the_parameters(normalizer):
  """∇θ of the whole Eq. 13 loss (CE, DCD boundary and Dice terms) through the network, with
  the boundary weights attached (Eq. 43-44: through h into the centers and distances) so that
  the loss is the function whose derivative is taken; directional central differences along
  random directions. Region masks are held by the ε-step (no pixel sits within it of τ)."""
  with jax.enable_x64(True):
    model = TinyNet(num_classes=2)
    rng = np.random.default_rng(3)
    b, hw = 2, 12
    x = jnp.asarray(rng.normal(size=(b, hw, hw, 2)))
    y = jnp.asarray(rng.integers(0, 2, (b, hw, hw)), jnp.int32)
    edges = jnp.asarray(rng.random((b, hw, hw)) < 0.15)
    variables = jax.jit(functools.partial(model.init, train=False), compiler_options=FAST_COMPILE)(
      jax.random.PRNGKey(3), x
    )
    params = variables["params"]
    params = {**params, "Conv_2": jax.tree.map(lambda v: 6.0 * v, params["Conv_2"])}
    a_t = jnp.asarray(rng.uniform(0.0, 1.0, (b, hw, hw)) * (rng.random((b, hw, hw)) < 0.8))
    b_t = jnp.asarray(rng.uniform(0.0, 1.0, (b, hw, hw)))
    gamma = a_t + b_t
    z = jnp.sum(gamma, (1, 2), keepdims=True) if normalizer == "image" else jnp.sum(gamma)
    weights = objective.PixelWeights(
      a_hat=a_t / z, b_hat=b_t / z, gamma=gamma, pi_a=a_t / gamma, pi_b=b_t / gamma,
      y_pseudo=jnp.asarray(rng.integers(0, 2, (b, hw, hw)), jnp.int32),
    )  # fmt: skip
    options = objective.ObjectiveOptions(
      lambda_bd=0.5,
      lambda_dice=0.3,
      normalizer=normalizer,
      dcd=dcd.DCDOptions(tau=0.6, detach_weights=False),
    )
    centers = jnp.asarray(rng.normal(size=(3, 4)))

    def loss(p):
      (logits, features), _ = model.apply(
        {**variables, "params": p}, x, train=True, mutable=["batch_stats"]
      )
      return objective.metadcseg_loss(
        logits, features, y, edges=edges, weights=weights, default_centers=centers, options=options
      )

    loss_fn = jax.jit(loss, compiler_options=FAST_COMPILE)
    (_, aux), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE
    )(params)
    # Every term is present, and some region keeps its own center (not only fallbacks).
    assert float(aux["bd_term"]) > 0 and float(aux["dice_term"]) > 0
    assert not np.all(np.asarray(aux["used_fallback"]))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    g = jax.flatten_util.ravel_pytree(grads)[0]
    eps = 1e-6
    for k in range(3):
      d = jnp.asarray(rng.normal(size=flat.shape))
      d = d / jnp.linalg.norm(d)
      plus, minus = loss_fn(unravel(flat + eps * d))[0], loss_fn(unravel(flat - eps * d))[0]
      fd = float((plus - minus) / (2 * eps))
      exact = float(jnp.dot(g, d))
      print(f"Eq. 13 directional derivative {k}: exact {exact:.10e}, FD {fd:.10e}")
      assert abs(exact - fd) <= FD_RTOL * abs(exact), (exact, fd)
