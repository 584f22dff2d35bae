"""Every meta method's whole jitted train step against an independent float64 reference.

The references below are written from the papers' equations, not from the
library: their own virtual step (PyTorch SGD: `d = g + wd·θ`, `buf = μ·buf + d`,
`θ ← θ − λ(step)·buf`, λ decayed per epoch as `λ0·20/(epoch + 20)`), their own meta-gradients
Ga, Gb (plain `jax.grad` through that step, MetaDCSeg Eq. 21-22), their own ã, b̃ (Eq. 23),
â, b̂ (Eq. 24), γ, πa, πb (Eq. 9), their own objective (Eq. 1, Eq. 6-13, Eq. 46-47 and the soft
Dice term) and the real update with global-norm clipping. GSD-Net's step (its Eq. 2-18, both
networks, the colour-jittered second view, small-loss selection, SGLR, knowledge transfer) and
DALE's (its Algorithm 1: the non-fuzzy Adam step, ω from an exact one-step meta-gradient through
Adam, the fuzzy step with the Gaussian W2 alignment in closed form) are written out the same way.
Only the network's `apply` is shared.

Two consecutive steps are taken from the method's initial state (the second one with a
momentum buffer, and in the next epoch of the schedule: one step per epoch), and parameters,
BatchNorm statistics, their EMA, the optimizer state, the DCD default centers and every
metric must agree to 1e-10 relative (quantities a method keeps in float32 by design, such as
GSD-Net's selection shares, to float32 rounding).

CI runs a few configurations chosen to cover every code path once (`CI_CASES`) on a small
network; with METADCSEG_SLOW=1 the full matrix (both routes, both normalisers, (a0, b0) =
(0, 0), (1, 0) and ones with b0 ≠ 0, for L2B and MetaDCSeg, the meta-off and extra-clean-step
variants) runs too, and the CI cases again on the project's U-Net.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from experiments.configs import tiny
from metadcseg_jax import methods

SLOW = os.environ.get("METADCSEG_SLOW") == "1"
SLOW_REASON = "a slow variant: set METADCSEG_SLOW=1"
RTOL = 1e-10
# Each compiled step runs twice: XLA's cheapest optimisation level compiles 2-4x faster on a
# CPU (the arithmetic is the same IEEE float64).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
SIZE, WIDTH, BATCH, META_BATCH = 16, 2, 2, 3  # a meta batch of another size than the training one
LR0, MOMENTUM, WD, CLIP, EMA = 0.05, 0.9, 5e-4, 0.05, 0.99
TAU, TAU_DCD, LAMBDA_BD, LAMBDA_DICE = 0.55, 1.0, 0.35, 0.08


# ----------------------------------------------------------------------------- set-up


def _config(name, *, route="jvp", normalizer="image", a0b0=(0.0, 0.0), eta=0.01, **options):
  config = tiny.get_config()
  config.method = name
  config.model.name = "unet"  # a fraction of the U-Net++'s compile time; the same meta code
  config.model.width = WIDTH
  config.model.dtype = "float64"
  config.data.size = SIZE
  config.train.lr = LR0
  config.train.momentum = MOMENTUM
  config.train.weight_decay = WD
  config.train.grad_clip = CLIP  # small enough to be active: a wrong clip would show
  config.train.ema_decay = EMA
  config.train.warmup_epochs = 0
  config.meta.route = route
  config.meta.normalizer = normalizer
  config.meta.a0, config.meta.b0 = a0b0
  config.meta.eta = eta
  config.meta.use = options.get("meta_use", True)
  config.meta.extra_clean_step = options.get("extra_clean_step", False)
  config.dcd.edges = "canny"  # edges come with the batch (the step reads batch["edges"])
  config.dcd.tau = TAU
  config.dcd.tau_dcd = TAU_DCD
  config.dcd.lambda_bd = LAMBDA_BD
  config.dcd.lambda_dice = LAMBDA_DICE
  return config


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  labels = []
  for _ in range(BATCH + META_BATCH):
    cy, cx, r = rng.uniform(4, SIZE - 4), rng.uniform(4, SIZE - 4), rng.uniform(3, 6)
    labels.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.int32))
  labels = np.stack(labels)
  return {
    "image": jnp.asarray(rng.standard_normal((BATCH, SIZE, SIZE, 1)), jnp.float32),
    "noisy_label": jnp.asarray(labels[:BATCH]),
    "meta_image": jnp.asarray(rng.standard_normal((META_BATCH, SIZE, SIZE, 1)), jnp.float32),
    "meta_label": jnp.asarray(labels[BATCH:]),
    "edges": jnp.asarray(rng.random((BATCH, SIZE, SIZE)) < 0.1),
  }


class TinyNet(nn.Module):
  """conv3x3 -> BatchNorm -> ReLU -> conv3x3 (features) -> conv1x1 "final" (logits), float64.

  Stands in for the U-Net in CI (the step code is the same; XLA compiles it in a fraction of
  the time); the full matrix runs the U-Net itself.
  """

  @nn.compact
  def __call__(self, x, *, train):
    conv = functools.partial(nn.Conv, dtype=jnp.float64, param_dtype=jnp.float64)
    h = conv(4, (3, 3))(x)
    h = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, dtype=jnp.float64, param_dtype=jnp.float64
    )(h)
    features = conv(WIDTH, (3, 3))(nn.relu(h))
    return conv(2, (1, 1), name="final")(features), features


def _method(config, network):
  method = methods.create(config, steps_per_epoch=1)
  if network == "tiny":
    method.model = method.meta_model = TinyNet()
  return method


def _initial_state(method):
  state = method.init_state(jax.random.PRNGKey(0))
  # A larger last layer makes the prediction confident enough that the fg and bg regions of
  # Eq. 6-7 are not empty (else every center would be the fallback of Eq. 47).
  params = dict(state.params)
  params["final"] = jax.tree.map(lambda v: 8.0 * v, params["final"])
  return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


# ----------------------------------------------------------------------------- reference


def _ce(logits, labels):
  """Per-pixel −log softmax(logits)[y], (B,H,W)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _lr(count, updates_per_epoch):
  """The learning rate λ0·20/(epoch + 20), the epoch counted in optimizer updates."""
  return LR0 * 20.0 / (count // updates_per_epoch + 20.0)


def _sgd_direction(grads, buf, params):
  """PyTorch SGD (dampening 0): d = g + wd·θ, buf' = μ·buf + d; the step is −λ·buf'."""
  return jax.tree.map(lambda g, b, p: MOMENTUM * b + g + WD * p, grads, buf, params)


def _clip(grads):
  norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
  return jax.tree.map(lambda g: jnp.where(norm < CLIP, g, g * (CLIP / norm)), grads)


def _real_update(params, buf, count, grads, updates_per_epoch):
  """The real step, clipping included: (params, buf, count)."""
  new_buf = _sgd_direction(_clip(grads), buf, params)
  lr = _lr(count, updates_per_epoch)
  return jax.tree.map(lambda p, b: p - lr * b, params, new_buf), new_buf, count + 1


def _norm(tree):
  return jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(tree)))


def _meta_weights(fwd, params, buf, count, x, y, xv, yv, *, a0, b0, eta, normalizer, upe):
  """Eq. 21-24 and Eq. 9 from scratch: Ga, Gb through one unclipped virtual SGD step."""
  (logits, _), _ = fwd(params, x)
  y_pseudo = jnp.argmax(logits, axis=-1)

  def virtual_loss(p, a, b):
    (lo, _), _ = fwd(p, x)
    # Σ_hw (a·f + b·g) / (H·W), averaged over the batch (BUILD_NOTES.md, "Meta-gradients").
    return jnp.sum(a * _ce(lo, y) + b * _ce(lo, y_pseudo)) / y.size

  def lval(a, b):
    g = jax.grad(virtual_loss)(params, a, b)
    direction = _sgd_direction(g, buf, params)
    lr = _lr(count, upe)
    theta_hat = jax.tree.map(lambda p, d: p - lr * d, params, direction)
    (lo, _), _ = fwd(theta_hat, xv)
    return jnp.mean(_ce(lo, yv))

  a = jnp.full(y.shape, a0, logits.dtype)
  b = jnp.full(y.shape, b0, logits.dtype)
  meta_loss, (ga, gb) = jax.value_and_grad(lval, argnums=(0, 1))(a, b)
  a_t = jnp.maximum(a0 - eta * ga, 0.0)
  b_t = jnp.maximum(b0 - eta * gb, 0.0)
  gamma = a_t + b_t
  if normalizer == "image":
    z = jnp.sum(gamma, axis=(1, 2), keepdims=True)
  else:
    z = jnp.sum(gamma)
  a_hat, b_hat = a_t / (z + 1e-10), b_t / (z + 1e-10)
  safe = jnp.where(gamma > 0, gamma, 1.0)
  pi_a = jnp.where(gamma > 0, a_t / safe, 0.0)
  pi_b = jnp.where(gamma > 0, b_t / safe, 0.0)
  weights = dict(a_hat=a_hat, b_hat=b_hat, gamma=gamma, pi_a=pi_a, pi_b=pi_b, y_pseudo=y_pseudo)
  return weights, meta_loss


def _dcd_image(h, m, edges, gamma, default_centers):
  """One image's boundary weights w (Eq. 6-12, Eq. 46-47; DCD over its bd mean, mean-one
  weights) and centers, with a per-region validity flag."""
  fg = m > TAU
  bg = m < 1.0 - TAU
  bd = ((m >= 1.0 - TAU) & (m <= TAU)) | edges
  centers, valid = [], []
  for k, mask in enumerate((fg, bg, bd)):
    wk = jnp.where(mask, gamma, 0.0)
    ok = (jnp.sum(mask) >= 10) & (jnp.sum(wk) > 0)
    c = jnp.sum(wk[..., None] * h, axis=(0, 1)) / jnp.where(ok, jnp.sum(wk), 1.0)
    centers.append(jnp.where(ok, c, default_centers[k]))
    valid.append(ok)
  dist = [jnp.sqrt(jnp.sum((h - c) ** 2, axis=-1)) for c in centers]
  dcd = jnp.minimum(dist[0] * dist[1] / (dist[2] + 1e-8), 100.0)
  n_bd = jnp.sum(bd)
  mean = jnp.sum(jnp.where(bd, dcd, 0.0)) / n_bd
  z = jnp.where(bd, dcd / mean / TAU_DCD, -jnp.inf)
  w = jnp.where(bd, jax.nn.softmax(z.reshape(-1)).reshape(z.shape), 0.0) * n_bd
  return jax.lax.stop_gradient(w), jnp.stack(centers), jnp.stack(valid)


def _metadcseg_objective(logits, features, y, edges, wts, default_centers, normalizer):
  """Eq. 13: Σ_hw L^hw + λ1·Σ_bd w·L^hw + λ2·Dice, L^hw = â·f + b̂·g (Eq. 1)."""
  f, g = _ce(logits, y), _ce(logits, wts["y_pseudo"])
  pixel = wts["a_hat"] * f + wts["b_hat"] * g
  reduce = jnp.mean if normalizer == "image" else jnp.sum
  ce_term = reduce(jnp.sum(pixel, axis=(1, 2)))
  m = 1.0 - jax.nn.softmax(logits, axis=-1)[..., 0]
  m_fixed = jax.lax.stop_gradient(m)
  bd_terms, batch_centers, valid = [], [], []
  for i in range(logits.shape[0]):
    w, c, v = _dcd_image(
      features[i], m_fixed[i], edges[i], jax.lax.stop_gradient(wts["gamma"][i]), default_centers
    )
    bd_terms.append(jnp.sum(w * pixel[i]))
    batch_centers.append(c)
    valid.append(v)
  bd_term = reduce(jnp.stack(bd_terms))
  t = (y > 0).astype(m.dtype)
  dice = 1.0 - (2.0 * jnp.sum(m * t, (1, 2)) + 1.0) / (
    jnp.sum(m, (1, 2)) + jnp.sum(t, (1, 2)) + 1.0
  )
  dice_term = jnp.mean(dice)
  loss = ce_term + LAMBDA_BD * bd_term + LAMBDA_DICE * dice_term
  # Eq. 47: EMA (momentum 0.9) of the batch's valid centers, per region.
  batch_centers = jax.lax.stop_gradient(jnp.stack(batch_centers))
  valid = jnp.stack(valid).astype(batch_centers.dtype)[..., None]
  n = jnp.sum(valid, axis=0)
  mean = jnp.sum(valid * batch_centers, axis=0) / jnp.maximum(n, 1.0)
  new_centers = jnp.where(n > 0, 0.9 * default_centers + 0.1 * mean, default_centers)
  # The state keeps the centers in their own dtype (float32 from `init_extra`).
  new_centers = new_centers.astype(default_centers.dtype)
  terms = dict(ce_term=ce_term, bd_term=bd_term, dice_term=dice_term)
  return loss, (terms, new_centers)


def _l2b_objective(logits, y, wts, normalizer):
  """Eq. 1: Σ_hw (â·f + b̂·g), averaged over images ("image") or summed ("batch")."""
  pixel = wts["a_hat"] * _ce(logits, y) + wts["b_hat"] * _ce(logits, wts["y_pseudo"])
  per_image = jnp.sum(pixel, axis=(1, 2))
  loss = jnp.mean(per_image) if normalizer == "image" else jnp.sum(per_image)
  return loss, ({"ce_term": loss}, None)


def _reference_step(apply_fn, spec, ref, batch):
  """One whole training step of `spec` (a hashable description) from the reference state
  `ref` = {params, stats, buf, count, ema_params, ema_stats, centers}."""
  name, meta_use, extra_clean, a0, b0, eta, normalizer = spec
  upe = 2 if extra_clean else 1  # one step per epoch, in optimizer updates
  params, stats = ref["params"], ref["stats"]

  def fwd_with(p, x, s):
    out, upd = apply_fn({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
    return out, upd["batch_stats"]

  fwd = functools.partial(fwd_with, s=stats)
  x, y = batch["image"].astype(jnp.float64), batch["noisy_label"]
  xv, yv = batch["meta_image"].astype(jnp.float64), batch["meta_label"]
  metrics = {}
  if meta_use:
    wts, meta_loss = _meta_weights(
      fwd, params, ref["buf"], ref["count"], x, y, xv, yv,
      a0=a0, b0=b0, eta=eta, normalizer=normalizer, upe=upe,
    )  # fmt: skip
    total = jnp.sum(wts["a_hat"] + wts["b_hat"])
    metrics.update(
      meta_loss=meta_loss,
      alpha_share=jnp.sum(wts["a_hat"]) / jnp.maximum(total, 1e-12),
      weight_zero_frac=jnp.mean(wts["gamma"] <= 0),
    )
  else:  # the "meta off" ablation: â = 1/HW (1/BHW per batch), b̂ = 0, γ = 1, πa = 1, πb = 0
    n = y[0].size if normalizer == "image" else y.size
    ones = jnp.ones(y.shape, jnp.float64)
    wts = dict(a_hat=ones / n, b_hat=0 * ones, gamma=ones, pi_a=ones, pi_b=0 * ones)

  def loss_fn(p):
    (logits, features), new_stats = fwd(p, x)
    w = wts if meta_use else {**wts, "y_pseudo": jnp.argmax(logits, -1)}
    if name == "metadcseg":
      out = _metadcseg_objective(logits, features, y, batch["edges"], w, ref["centers"], normalizer)
    else:
      out = _l2b_objective(logits, y, w, normalizer)
    loss, aux = out
    return loss, (aux, new_stats)

  (loss, ((terms, centers), new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  new_params, buf, count = _real_update(params, ref["buf"], ref["count"], grads, upe)
  if extra_clean:  # L2B's code: a second real step on the clean meta batch, mean CE
    clean_fwd = functools.partial(fwd_with, s=new_stats)

    def clean_loss(p):
      (lo, _), s = clean_fwd(p, x=xv)
      return jnp.mean(_ce(lo, yv)), s

    clean_grads, new_stats = jax.grad(clean_loss, has_aux=True)(new_params)
    new_params, buf, count = _real_update(new_params, buf, count, clean_grads, upe)
  metrics.update(loss=loss, grad_norm=_norm(grads), param_norm=_norm(new_params), **terms)
  ema = lambda new, old: jax.tree.map(lambda a, b: EMA * b + (1 - EMA) * a, new, old)
  out = dict(
    params=new_params,
    stats=new_stats,
    buf=buf,
    count=count,
    ema_params=ema(new_params, ref["ema_params"]),
    ema_stats=ema(new_stats, ref["ema_stats"]),
    centers=ref["centers"] if centers is None else centers,
  )
  return out, metrics


def _as_reference(state):
  """The method's state in the reference's terms (read off the optax state by field name)."""
  flat = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  counts = [leaf for path, leaf in flat if jax.tree_util.keystr(path).endswith(".count")]
  is_trace = lambda s: isinstance(s, optax.TraceState)
  (trace,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_trace) if is_trace(s)]
  (count,) = counts
  return dict(
    params=state.params,
    stats=state.batch_stats,
    buf=trace.trace,
    count=count,
    ema_params=state.ema_params,
    ema_stats=state.ema_batch_stats,
    centers=state.extra.get("dcd_centers"),
  )


def _assert_close(got, want, what):
  """Equal to RTOL relative, the absolute floor RTOL times the largest entry of the tree: a
  bias in front of BatchNorm has gradient 0 and keeps only rounding noise (~1e-20)."""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), what
  scale = max(float(np.max(np.abs(np.asarray(w, np.float64)))) for w in want_leaves)
  for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
    # A quantity the method keeps in float32 by design (GSD-Net's W and its statistics, the
    # selection shares) can only agree to float32 rounding.
    rtol = RTOL if np.asarray(g).dtype != np.float32 else 1e-6
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=f"{what} leaf {i}")


# ----------------------------------------------------------------------------- the checks


def _run_case(
  name, *, route, normalizer, a0b0, meta_use=True, extra_clean_step=False, network="tiny"
):
  with jax.enable_x64(True):
    config = _config(
      name,
      route=route,
      normalizer=normalizer,
      a0b0=a0b0,
      meta_use=meta_use,
      extra_clean_step=extra_clean_step,
    )
    method = _method(config, network)
    state = _initial_state(method)
    step = _jit(method.train_step("main"))
    spec = (name, meta_use, extra_clean_step, *a0b0, 0.01, normalizer)
    reference = _jit(functools.partial(_reference_step, method.model.apply, spec))
    ref = _as_reference(state)
    report = {}
    for i, seed in enumerate((0, 1)):
      batch = _batch(seed)
      state, metrics = step(state, batch, jax.random.PRNGKey(i))
      ref, want = reference(ref, batch)
      got = _as_reference(state)
      assert int(state.step) == i + 1
      for key in ("params", "stats", "buf", "count", "ema_params", "ema_stats", "centers"):
        if ref[key] is not None:
          _assert_close(got[key], ref[key], f"step {i + 1} {key}")
      assert set(want) <= set(metrics), (set(want), set(metrics))
      for key, value in want.items():
        _assert_close(metrics[key], value, f"step {i + 1} metric {key}")
      report[i] = {k: float(v) for k, v in want.items()}
    return report


CI_CASES = [
  # b0 ≠ 0, the batch normaliser, the JVP route and the whole MetaDCSeg objective.
  ("metadcseg", "jvp", "batch", (1.0, 0.5), {}),
  # The reverse route, the image normaliser and L2B's extra clean step.
  ("l2b", "reverse", "image", (0.0, 0.0), {"extra_clean_step": True}),
  # The "meta off" ablation of MetaDCSeg.
  ("metadcseg", "jvp", "image", (0.0, 0.0), {"meta_use": False}),
]
SLOW_CASES = [
  (name, route, normalizer, a0b0, {})
  for name in ("l2b", "metadcseg")
  for route in ("reverse", "jvp")
  for normalizer in ("image", "batch")
  for a0b0 in ((0.0, 0.0), (1.0, 0.0))
] + [
  ("l2b", "jvp", "image", (0.5, 0.25), {}),
  ("l2b", "jvp", "batch", (0.0, 0.0), {"extra_clean_step": True}),
  ("metadcseg", "reverse", "batch", (0.0, 0.0), {"meta_use": False}),
  ("metadcseg", "reverse", "image", (0.0, 0.0), {"extra_clean_step": True}),
]


def _case_id(case):
  name, route, normalizer, (a0, b0), options = case
  extra = "-".join(f"{k}={v}" for k, v in options.items())
  return f"{name}-{route}-{normalizer}-{a0:g},{b0:g}" + (f"-{extra}" if extra else "")


@pytest.mark.parametrize("case", CI_CASES, ids=_case_id)
def test_step_equals_reference(case):
  name, route, normalizer, a0b0, options = case
  _run_case(name, route=route, normalizer=normalizer, a0b0=a0b0, **options)


@pytest.mark.skipif(not SLOW, reason="the full matrix takes minutes: set METADCSEG_SLOW=1")
@pytest.mark.parametrize("case", SLOW_CASES, ids=_case_id)
def test_step_equals_reference_full_matrix(case):
  name, route, normalizer, a0b0, options = case
  _run_case(name, route=route, normalizer=normalizer, a0b0=a0b0, **options)


@pytest.mark.skipif(not SLOW, reason="the U-Net compiles for minutes: set METADCSEG_SLOW=1")
@pytest.mark.parametrize("case", CI_CASES, ids=_case_id)
def test_unet_step_equals_reference(case):
  """The CI cases on the project's U-Net (ReLU, max-pool, bilinear up-sampling) itself."""
  name, route, normalizer, a0b0, options = case
  _run_case(name, route=route, normalizer=normalizer, a0b0=a0b0, network="unet", **options)


# ----------------------------------------------------------------------------- GSD-Net

GSD_FORGET, GSD_LAMBDA, GSD_JITTER, GSD_D = 0.3, 0.5, 0.5, 10.0


def _gsd_config():
  config = _config("gsdnet")
  config.train.num_epochs = 100  # the paper's schedule unscaled: T_k 20, SGLR from 30, s 10
  config.coteach.forget_rate = GSD_FORGET
  config.coteach.auto_forget_rate = False
  return config


def _gsd_batch(seed):
  """A batch with GSD-Net's host-side maps: the clipped EDTs of the noisy label (GSD-Net
  Eq. 8), rounded down, and a superpixel map (4x4 blocks, mirrored in the second image).

  The method keeps W in float32 and scales Eq. 17's Dice term by its float32 mean; integer
  distances over 2·16·16 pixels make that mean exact, whatever order XLA sums in."""
  batch = _batch(seed)
  del batch["edges"]
  fg = np.asarray(batch["noisy_label"]) > 0
  edt = lambda m: np.floor(np.minimum(ndimage.distance_transform_edt(m), GSD_D))
  batch["edt_fg"] = jnp.asarray(np.stack([edt(f) for f in fg]), jnp.float32)
  batch["edt_bg"] = jnp.asarray(np.stack([edt(~f) for f in fg]), jnp.float32)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  blocks = (yy // 4) * (SIZE // 4) + xx // 4
  batch["superpixels"] = jnp.asarray(np.stack([blocks, blocks[::-1]]), jnp.int32)
  return batch


def _sym_kl(l1, l2):
  lp1, lp2 = jax.nn.log_softmax(l1), jax.nn.log_softmax(l2)
  p1, p2 = jnp.exp(lp1), jnp.exp(lp2)
  return jnp.sum(p1 * (lp1 - lp2), -1) + jnp.sum(p2 * (lp2 - lp1), -1)


def _gsd_reference_step(apply_fn, ref, batch, rng, epoch):
  """One GSD-Net step (GSD-Net §3, Eq. 2-18) of both networks from `ref` (pairs)."""
  x, y = batch["image"], batch["noisy_label"]
  b, n = x.shape[0], y.size
  rng_view, rng_alpha, rng_partner = jax.random.split(rng, 3)
  # Second view: brightness towards the darkest value, contrast towards the mean grey level,
  # factors ~ U(1 − 0.8s, 1 + 0.8s) per image, clipped to the image's range.
  kb, kc, _ = jax.random.split(rng_view, 3)
  amount = 0.8 * GSD_JITTER
  fb = jax.random.uniform(kb, (b, 1, 1, 1), minval=1 - amount, maxval=1 + amount)
  fc = jax.random.uniform(kc, (b, 1, 1, 1), minval=1 - amount, maxval=1 + amount)
  lo, hi = jnp.min(x, (1, 2, 3), keepdims=True), jnp.max(x, (1, 2, 3), keepdims=True)
  x2 = lo + fb * (x - lo)
  grey_mean = jnp.mean(x2, (1, 2, 3), keepdims=True)
  x2 = jnp.clip(grey_mean + fc * (x2 - grey_mean), lo, hi)
  # Eq. 9: W = clip(d_fg + d_bg, 1, max(D + 1 − ⌊e/10⌋, 1)).
  # W is float32, as the maps it comes from (and so is its mean, which scales Eq. 17's Dice).
  cap = np.float32(max(GSD_D + 1.0 - np.floor(epoch / 10), 1.0))
  w = jnp.clip(batch["edt_fg"] + batch["edt_bg"], 1.0, cap)
  # Eq. 5: keep the ⌊(1 − τ_e)·N⌋ smallest losses, τ_e = τ·min(e/19, 1) (in float32, as the
  # share is stored).
  keep = np.float32(1.0) - np.float32(GSD_FORGET) * np.float32(min(epoch / 19, 1.0))
  num_keep = int(np.floor(np.float32(keep) * np.float32(n)))
  refine = epoch >= 30

  def loss_fn(params):
    def fwd(i, stats, images):
      out, upd = apply_fn(
        {"params": params[i], "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
      )
      return out[0], upd["batch_stats"]

    l1, s1 = fwd(0, ref["stats"][0], x)
    l2, s2 = fwd(1, ref["stats"][1], x2)
    pixel = _ce(l1, y) + _ce(l2, y) + GSD_LAMBDA * _sym_kl(l1, l2)  # Eq. 2 + Eq. 4
    order = jnp.argsort(jax.lax.stop_gradient(pixel).reshape(-1), stable=True)
    pick = jnp.zeros(n).at[order[:num_keep]].set(1.0).reshape(y.shape)
    loss_select = jnp.sum(pixel * w * pick) / jnp.maximum(jnp.sum(pick), 1.0)  # Eq. 10
    aux = dict(
      loss_select=loss_select,
      keep_share=jnp.mean(pick),
      w_mean=jnp.mean(w),
      w_cap=cap,
      sym_kl=jnp.mean(_sym_kl(l1, l2)),
      disagree_share=jnp.mean(jnp.argmax(l1, -1) != jnp.argmax(l2, -1)),
    )
    if not refine:
      return loss_select, ((s1, s2), aux)
    # Eq. 11-14: α-mix of the softmaxes, superpixel means ≥ 0.5, on the unselected pixels.
    alpha = jax.random.uniform(rng_alpha)
    prob = jax.lax.stop_gradient(
      alpha * jax.nn.softmax(l1)[..., 1] + (1 - alpha) * jax.nn.softmax(l2)[..., 1]
    )
    seg = batch["superpixels"]
    pseudo = []
    for i in range(b):
      ids = seg[i].reshape(-1)
      total = jnp.zeros(n).at[ids].add(prob[i].reshape(-1))
      count = jnp.zeros(n).at[ids].add(1.0)
      pseudo.append((total[ids] / count[ids] >= 0.5).reshape(y.shape[1:]))
    pseudo = jnp.stack(pseudo).astype(y.dtype)
    refined = jnp.where(pick > 0, y, pseudo)
    # Eq. 15: each image takes its partner's pixels outside its kept region.
    partner = (jnp.arange(b) + jax.random.randint(rng_partner, (), 1, b)) % b
    fg = refined > 0
    keep_px = jnp.where(jnp.mean(fg, (1, 2), keepdims=True) > 0.5, ~fg, fg)
    mix = lambda a: jnp.where(keep_px.reshape(keep_px.shape + (1,) * (a.ndim - 3)), a, a[partner])
    xm1, xm2, ym, wm = mix(x), mix(x2), mix(refined), mix(w)
    m1, s1 = fwd(0, s1, xm1)
    m2, s2 = fwd(1, s2, xm2)
    terms = {}
    for i, logits in ((1, m1), (2, m2)):  # Eq. 16-17
      probs = jax.nn.softmax(logits)
      t = jax.nn.one_hot(ym, 2, dtype=probs.dtype)
      dice = 1 - jnp.mean(
        (2 * jnp.sum(probs * t, (1, 2)) + 1) / (jnp.sum(probs, (1, 2)) + jnp.sum(t, (1, 2)) + 1),
        -1,
      )
      terms[f"loss_ce_{i}"] = 0.5 * jnp.mean(_ce(logits, ym) * wm)
      terms[f"loss_dice_{i}"] = 0.5 * jnp.mean(wm) * jnp.mean(dice)
    terms["loss_consistency"] = 0.5 * jnp.mean(_sym_kl(m1, m2) * wm)  # Eq. 18
    aux.update(
      terms,
      alpha=alpha,
      relabel_share=jnp.mean(refined != y),
      pseudo_fg_share=jnp.mean(pseudo),
      transfer_keep_share=jnp.mean(keep_px),
    )
    return loss_select + sum(terms.values()), ((s1, s2), aux)

  (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ref["params"])
  new = [
    _real_update(ref["params"][i], ref["buf"][i], ref["count"][i], grads[i], 1) for i in (0, 1)
  ]
  params = tuple(v[0] for v in new)
  ema = lambda new, old: jax.tree.map(lambda a, b: EMA * b + (1 - EMA) * a, new, old)
  out = dict(
    params=params,
    stats=stats,
    buf=tuple(v[1] for v in new),
    count=tuple(v[2] for v in new),
    ema_params=ema(params, ref["ema_params"]),
    ema_stats=ema(stats, ref["ema_stats"]),
  )
  metrics = dict(
    loss=loss,
    grad_norm=_norm(grads),
    grad_norm_1=_norm(grads[0]),
    grad_norm_2=_norm(grads[1]),
    param_norm=_norm(params),
    **aux,
  )
  return out, metrics


def _pair_reference(state):
  """A two-network state in the reference's terms."""
  halves = []
  for i in (0, 1):
    one = state.replace(
      params=state.params[i],
      batch_stats=state.batch_stats[i],
      opt_state=state.opt_state[i],
      ema_params=state.ema_params[i],
      ema_batch_stats=state.ema_batch_stats[i],
    )
    halves.append(_as_reference(one))
  return {k: (halves[0][k], halves[1][k]) for k in halves[0] if k != "centers"}


@pytest.mark.parametrize(
  "epoch",
  [
    pytest.param(10, id="select", marks=pytest.mark.skipif(not SLOW, reason=SLOW_REASON)),
    pytest.param(35, id="refine"),
  ],
)
def test_gsdnet_step_equals_reference(epoch):
  """Epoch 35 (CI): the refine phase, with small-loss selection at τ_e = 0.3 (Eq. 5), W capped
  at 8 (Eq. 9), SGLR, knowledge transfer and the mixed-image losses (Eq. 11-18); epoch 10: the
  selection phase alone, τ_e = 0.3·10/19, W capped at 10."""
  with jax.enable_x64(True):
    method = _method(_gsd_config(), "tiny")
    state = method.init_state(jax.random.PRNGKey(0))
    state = state.replace(step=jnp.asarray(epoch, jnp.int32))  # one step per epoch
    phase = method.phase(epoch)
    assert phase == ("refine" if epoch >= 30 else "select")
    step = _jit(method.train_step(phase))
    reference = _jit(
      functools.partial(_gsd_reference_step, method.model.apply), static_argnums=(3,)
    )
    ref = _pair_reference(state)
    for i in range(2):
      batch = _gsd_batch(i)
      rng = jax.random.PRNGKey(10 + i)
      # Both steps stay in the phase (epochs 10, 11 and 35, 36).
      state, metrics = step(state, batch, rng)
      ref, want = reference(ref, batch, rng, epoch + i)
      got = _pair_reference(state)
      for key in ("params", "stats", "buf", "count", "ema_params", "ema_stats"):
        _assert_close(got[key], ref[key], f"step {i + 1} {key}")
      assert set(want) == set(metrics), set(want) ^ set(metrics)
      for key, value in want.items():
        _assert_close(metrics[key], value, f"step {i + 1} metric {key}")
      assert 0 < float(metrics["keep_share"]) < 1  # the selection drops pixels
      if epoch >= 30:
        assert 0 < float(metrics["transfer_keep_share"]) < 1


# ----------------------------------------------------------------------------- DALE

DALE_PATCH, DALE_TAU, DALE_ALPHA, DALE_LR, DALE_OMEGA_LR = 4, 0.9, 0.5, 3e-4, 0.1
DALE_COV, DALE_JITTER, DALE_MIN_PIXELS = 0.01, 1e-4, 10.0
ADAM_B1, ADAM_B2, ADAM_EPS, ADAM_EPS_ROOT = 0.9, 0.999, 1e-8, 1e-16


def _dale_config():
  config = _config("dale")
  config.dale.patch_size = DALE_PATCH  # 16 patches per 16x16 image
  config.dale.alpha = DALE_ALPHA  # larger than the paper's 0.05, so that L_W weighs in
  return config


def _dale_masks(images, labels):
  """DALE Eq. 3-6 on the host in numpy: per patch the Shannon entropy of the intensity
  histogram (256 bins over the image's range) and the share of label-edge pixels (a
  4-neighbour of another label), each min-max normalised over the image; m = max of the two;
  M^f = 1 if m > τ else m, M^n = 1 if m < τ else 1 − m. Per pixel, (B,H,W) each."""
  p, hp = DALE_PATCH, SIZE // DALE_PATCH
  ms = []
  for image, label in zip(np.asarray(images), np.asarray(labels)):
    grey = image.mean(-1)
    bins = np.clip(np.floor((grey - grey.min()) / (grey.max() - grey.min()) * 256), 0, 255)
    pad = np.pad(label, 1, mode="edge")
    c = pad[1:-1, 1:-1]
    edges = (c != pad[:-2, 1:-1]) | (c != pad[2:, 1:-1]) | (c != pad[1:-1, :-2])
    edges |= c != pad[1:-1, 2:]
    entropy, edge_share = np.zeros((hp, hp)), np.zeros((hp, hp))
    for i in range(hp):
      for j in range(hp):
        block = (slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p))
        _, counts = np.unique(bins[block], return_counts=True)
        q = counts / p**2
        entropy[i, j] = -np.sum(q * np.log(q))
        edge_share[i, j] = edges[block].mean()
    norm = lambda r: (r - r.min()) / (r.max() - r.min()) if r.max() > r.min() else 0 * r
    ms.append(np.kron(np.maximum(norm(entropy), norm(edge_share)), np.ones((p, p))))
  m = np.stack(ms)
  return m, np.where(m > DALE_TAU, 1.0, m), np.where(m < DALE_TAU, 1.0, 1.0 - m)


def _adam(params, mu, nu, count, grads, lr, eps_root=ADAM_EPS_ROOT):
  """PyTorch Adam without weight decay, ε_root inside the root: (params, mu, nu, count)."""
  t = count + 1
  mu = jax.tree.map(lambda m, g: ADAM_B1 * m + (1 - ADAM_B1) * g, mu, grads)
  nu = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g * g, nu, grads)

  def step(p, m, v):
    m_hat, v_hat = m / (1 - ADAM_B1**t), v / (1 - ADAM_B2**t)
    return p - lr * m_hat / (jnp.sqrt(v_hat + eps_root) + ADAM_EPS)

  return jax.tree.map(step, params, mu, nu), mu, nu, t


def _w2_squared_2d(mu1, cov1, mu2, cov2):
  """DALE Eq. 14 for D = 2 in closed form: with Σk' = Σk + εI, tr (Σ1'^½ Σ2' Σ1'^½)^½ =
  √λ1 + √λ2 over the eigenvalues of Σ1'Σ2' = √(tr Σ1'Σ2' + 2·√det Σ1'Σ2') (no eigh)."""
  eye = jnp.eye(2)
  c1 = 0.5 * (cov1 + cov1.T) + DALE_JITTER * eye
  c2 = 0.5 * (cov2 + cov2.T) + DALE_JITTER * eye
  cross = jnp.sqrt(jnp.trace(c1 @ c2) + 2 * jnp.sqrt(jnp.linalg.det(c1) * jnp.linalg.det(c2)))
  return jnp.sum((mu1 - mu2) ** 2) + jnp.trace(c1) + jnp.trace(c2) - 2 * cross


def _class_gaussians(features, labels, weights):
  """Per class: weighted mean, maximum-likelihood covariance, total weight."""
  x = features.reshape(-1, features.shape[-1])
  out = []
  for c in (0, 1):
    w = jnp.where(labels.reshape(-1) == c, weights.reshape(-1), 0.0)
    total = jnp.sum(w)
    safe = jnp.where(total > 0, total, 1.0)  # a class absent from a set: no NaN, not even in ∇
    mu = jnp.sum(w[:, None] * x, 0) / safe
    cov = jnp.einsum("n,ni,nj->ij", w, x - mu, x - mu) / safe
    out.append((mu, cov, total))
  return out


def _dale_reference_step(apply_fn, ref, batch, masks, rng):
  """One DALE iteration (Algorithm 1; Eq. 1, Eq. 7-15) from `ref`, Adam state (mu, nu, count)."""
  x, y = batch["image"], batch["noisy_label"]
  m, mf, mn = masks
  xf, xn = x * mf[..., None], x * mn[..., None]  # Eq. 7

  def fwd(p, stats, images):
    out, upd = apply_fn(
      {"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
    )
    return out, upd["batch_stats"]

  def loss_nonfuzzy(p):  # Eq. 1
    (logits, features), stats = fwd(p, ref["stats"], xn)
    return jnp.mean(mn * _ce(logits, y)), (stats, features)

  (loss_n, (stats, feat_n)), grads_n = jax.value_and_grad(loss_nonfuzzy, has_aux=True)(
    ref["params"]
  )
  params_n, mu, nu, count = _adam(
    ref["params"], ref["mu"], ref["nu"], ref["count"], grads_n, DALE_LR
  )

  def lval(omega):  # Eq. 8-11: one virtual Adam step on the ω-weighted fuzzy loss
    def train_loss(p):
      (logits, _), _ = fwd(p, stats, xf)
      return jnp.mean(omega * mf * _ce(logits, y))

    theta_p = _adam(params_n, mu, nu, count, jax.grad(train_loss)(params_n), DALE_LR)[0]
    (logits, _), _ = fwd(theta_p, stats, xn)
    return jnp.mean(mn * _ce(logits, y))

  meta_loss, g = jax.value_and_grad(lval)(jnp.ones(y.shape))
  # One Adam step on ω from a fresh state (ε_root 0): m̂ = G, v̂ = G².
  omega = 1.0 - DALE_OMEGA_LR * g / (jnp.sqrt(g * g) + ADAM_EPS)
  keep = omega > 1.0  # Eq. 12: ω rose
  gauss_n = _class_gaussians(feat_n, y, mn)
  eps = DALE_COV * jax.random.uniform(rng, (2,), feat_n.dtype)  # Eq. 13

  def loss_fuzzy(p):  # Eq. 2, Eq. 15
    (logits, features), new_stats = fwd(p, stats, xf)
    seg = jnp.mean(omega * mf * _ce(logits, y))
    gauss_f = _class_gaussians(features, y, mf * keep)
    w2 = 0.0
    for c in (0, 1):
      (mu_n, cov_n, tot_n), (mu_f, cov_f, tot_f) = gauss_n[c], gauss_f[c]
      term = _w2_squared_2d(mu_n, cov_n + eps[c] * jnp.ones((2, 2)), mu_f, cov_f)
      w2 = w2 + jnp.where((tot_n >= DALE_MIN_PIXELS) & (tot_f >= DALE_MIN_PIXELS), term, 0.0)
    return seg + DALE_ALPHA * jnp.mean(omega) * w2, (new_stats, w2)

  (loss_f, (stats, w2)), grads_f = jax.value_and_grad(loss_fuzzy, has_aux=True)(params_n)
  params, mu, nu, count = _adam(params_n, mu, nu, count, grads_f, DALE_LR)
  ema = lambda new, old: jax.tree.map(lambda a, b: EMA * b + (1 - EMA) * a, new, old)
  out = dict(
    params=params,
    stats=stats,
    mu=mu,
    nu=nu,
    count=count,
    ema_params=ema(params, ref["ema_params"]),
    ema_stats=ema(stats, ref["ema_stats"]),
  )
  metrics = dict(
    loss=loss_n + loss_f,
    grad_norm=_norm(grads_f),
    param_norm=_norm(params),
    grad_norm_nonfuzzy=_norm(grads_n),
    loss_nonfuzzy=loss_n,
    loss_fuzzy=loss_f,
    w2_term=w2,
    meta_loss=meta_loss,
    fuzzy_frac=jnp.mean(m > DALE_TAU),
    omega_step=jnp.mean(jnp.abs(omega - 1.0)),
  )
  return out, metrics


def _adam_reference(state):
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
  return dict(
    params=state.params,
    stats=state.batch_stats,
    mu=adam.mu,
    nu=adam.nu,
    count=adam.count,
    ema_params=state.ema_params,
    ema_stats=state.ema_batch_stats,
  )


def test_dale_step_equals_reference():
  with jax.enable_x64(True):
    method = _method(_dale_config(), "tiny")
    state = method.init_state(jax.random.PRNGKey(0))
    step = _jit(method.train_step(method.phase(0)))
    reference = _jit(functools.partial(_dale_reference_step, method.model.apply))
    ref = _adam_reference(state)
    for i in range(2):
      batch = _batch(i)
      del batch["edges"]
      # float64 images: the fuzziness masks are then float64 in the method too.
      batch["image"] = batch["image"].astype(jnp.float64)
      masks = tuple(jnp.asarray(v) for v in _dale_masks(batch["image"], batch["noisy_label"]))
      rng = jax.random.PRNGKey(20 + i)
      state, metrics = step(state, batch, rng)
      ref, want = reference(ref, batch, masks, rng)
      got = _adam_reference(state)
      for key in ("params", "stats", "mu", "nu", "count", "ema_params", "ema_stats"):
        _assert_close(got[key], ref[key], f"step {i + 1} {key}")
      assert set(want) == set(metrics), set(want) ^ set(metrics)
      for key, value in want.items():
        _assert_close(metrics[key], value, f"step {i + 1} metric {key}")
      # Every part of the iteration is at work: fuzzy patches, ω moved, an L_W term.
      assert 0 < float(metrics["fuzzy_frac"]) < 1
      assert float(metrics["omega_step"]) > 0 and float(metrics["w2_term"]) > 0
