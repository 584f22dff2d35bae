"""DALE: data-driven alternating learning on non-fuzzy and fuzzy regions (comparison method).

Fang et al., "Minding Fuzzy Regions: A Data-driven Alternating Learning Paradigm for Stable
Lesion Segmentation", CVPR 2025; equation numbers here are that paper's. One train step is one
iteration of its Algorithm 1 on one batch (x, y), y the noisy labels:

1. Fuzziness (Eq. 3, Eq. 4, Eq. 5): per 16×16 patch, the entropy of the image's intensity
   histogram and the share of label-edge pixels, each min-max normalised over the image's
   patches; `m = max(r_std, e_std)`. Soft masks (Eq. 6): `M^f = 1 if m > τ else m`,
   `M^n = 1 if m < τ else 1 − m`; masked inputs and labels (Eq. 7).
2. Non-fuzzy step (Eq. 1): θ_n = θ + Adam(∇θ mean(M^n·CE(F(M^n⊙x; θ), y))).
3. Label confidence ω (Eq. 8, Eq. 9, Eq. 10, Eq. 11): ω0 = 1 per pixel; one virtual Adam step
   on the fuzzy set, θ_p(ω) = θ_n + U(∇θ mean(ω·M^f·CE(F(M^f⊙x; θ_n), y)), s_n); the exact
   meta-gradient G = ∂/∂ω mean(M^n·CE(F(M^n⊙x; θ_p(ω)), y)) at ω0 (`meta.unrolled_meta_grad`,
   reverse over reverse through Adam); then K Adam steps (lr 0.1) on ω.
4. Fuzzy step (Eq. 2, Eq. 12, Eq. 13, Eq. 14, Eq. 15): θ' = θ_n + Adam(∇θ L_f) with
   L_f = mean(ω·M^f·CE) + α·mean(ω)·L_W, where L_W (Eq. 14) sums over classes the squared
   Gaussian 2-Wasserstein distance between the non-fuzzy class features (from step 2's forward,
   constant, covariance perturbed by ε·11ᵀ, Eq. 13) and the fuzzy class features of pixels
   whose ω rose (Eq. 12), with gradient into the fuzzy features.

Where the paper is open or inconsistent, the choices (also in BUILD_NOTES.md, "DALE"):
* Eq. 3 as printed, `−(1/hw) Σ_k p_k log p_k` over pixels k, is `−Σ_b q_b² log q_b` over
  histogram bins, not an entropy; read as the Shannon entropy of the patch's intensity
  histogram, used here. Intensities (mean over channels) are quantised into `num_bins` equal
  bins between the image's minimum and maximum (256: the 8-bit histogram of a [0, 1] image).
* Eq. 4's edge map: pixels with a 4-neighbour of another label (both sides of a boundary;
  image borders are not edges). A constant min-max range (Eq. 5) gives 0.
* Eq. 6's non-fuzzy mask `τ − m` for `m ≥ τ` is ≤ 0 (a typo): read as `1 − m` (default,
  `nonfuzzy_mask="one_minus"`; a fuzzy patch keeps weight 1 − m in the non-fuzzy set), option
  "clip" = max(τ − m, 0) = 0 (fuzzy patches left out of the non-fuzzy set).
* Eq. 7's `M ⊙ Y` on one-hot labels makes the CE `M·CE`: the masks weight the pixel losses;
  the images are multiplied by the masks (`mask_image`).
* Eq. 12's "∇ω > 0" is read as "ω rose" (ω* > ω0, i.e. G < 0), the text's "when the label is
  correct, ω increases"; the literal derivative ∂L/∂ω > 0 would keep the noisy pixels.
* Eq. 13's random ε: ε ~ U(0, cov_perturb) per class and step.
* Eq. 15 multiplies the per-pixel ω into the scalar L_W: `mean(ω)·L_W`.
* Class Gaussians are pooled over the batch, classes by the noisy label, pixels weighted by the
  soft mask (and the Eq. 12 indicator); a class with < `min_pixels` weight in either set is
  left out of L_W.
* Optimizer: Adam, lr 3e-4 constant (§4.1 names no schedule), no clipping, no weight decay
  (PyTorch's defaults), whatever `config.train` says; `eps_root = 1e-16` inside the square
  root, because ω's meta-gradient differentiates through √v̂ (optax's advice for
  meta-learning; it changes Adam only for gradients below ~1e-8). The EMA copy is kept
  (the trainer evaluates both). BatchNorm sees the masked images in both real forwards, so its
  running statistics mix the two masked inputs (the paper's design).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metadcseg_jax.core import losses
from metadcseg_jax.core import meta
from metadcseg_jax.core import optim
from metadcseg_jax.core import wasserstein
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.methods import base
from metadcseg_jax.types import Array

# How Eq. 6's non-fuzzy mask treats m ≥ τ, and which cues make the fuzziness (paper Table 4).
NONFUZZY_MASKS = ("one_minus", "clip")
FUZZINESS = ("max", "entropy", "edges")
ADAM_EPS_ROOT = 1e-16


def default_config() -> ml_collections.ConfigDict:
  """DALE's settings (`config.dale`): the paper's §4.1 values and this port's choices."""
  c = ml_collections.ConfigDict()
  c.patch_size = 16  # h × w of Eq. 3 and Eq. 4
  c.num_bins = 256  # intensity histogram bins per patch (Eq. 3)
  c.fuzziness = "max"  # max(AE, ER) | "entropy" (AE only) | "edges" (ER only), Table 4
  c.tau = 0.9  # soft threshold τ (Eq. 6)
  c.nonfuzzy_mask = "one_minus"  # Eq. 6 for m ≥ τ: 1 − m | "clip": max(τ − m, 0) = 0
  c.mask_image = True  # Eq. 7: feed M ⊙ x (else x, masks weight the losses only)
  c.use_omega = True  # label confidence ω (Eq. 9); off: ω = 1, Eq. 12 keeps every pixel
  c.omega_lr = 0.1  # Adam lr on ω (§4.1 "ω = 0.1")
  c.omega_steps = 1  # K
  c.alpha = 0.05  # weight of L_W (Eq. 15); 0 skips the alignment
  c.cov_perturb = 0.01  # ε ~ U(0, cov_perturb) of Eq. 13
  c.jitter = 1e-4  # ε·I added to both covariances before the matrix square roots
  c.min_pixels = 10.0  # least mask weight of a class in each set for its W2 term
  c.lr = 3e-4  # Adam, constant
  c.weight_decay = 0.0
  c.warmup_epochs = 0  # plain CE epochs before alternating (the paper has none)
  return c


# ----------------------------------------------------------------------------- fuzziness masks


def _patches(a: Array, p: int) -> Array:
  """(H,W) -> (H/p, W/p, p·p): the pixels of each p×p patch."""
  h, w = a.shape
  return a.reshape(h // p, p, w // p, p).transpose(0, 2, 1, 3).reshape(h // p, w // p, p * p)


def _minmax(r: Array) -> Array:
  """Eq. 5: (r − min) / (max − min) over all entries; 0 where max = min."""
  lo, span = jnp.min(r), jnp.max(r) - jnp.min(r)
  return jnp.where(span > 0, (r - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def patch_entropy(image: Array, *, patch_size: int = 16, num_bins: int = 256) -> Array:
  """Shannon entropy (nats) of each patch's intensity histogram (Eq. 3, read as an entropy).

  The channel mean is quantised into `num_bins` equal bins between the image's minimum and
  maximum; a patch's entropy is `−Σ_b q_b log q_b` with q_b its share of pixels in bin b,
  computed as `−mean_k log q_{b(k)}` over its pixels k (sort, then count equal values).

  Args:
    image: (H,W,C), H and W multiples of `patch_size`.
    patch_size: the patch side.
    num_bins: histogram bins.

  Returns:
    (H/p, W/p) entropies in [0, log min(p², num_bins)].
  """
  grey = jnp.mean(image, axis=-1)
  lo, span = jnp.min(grey), jnp.max(grey) - jnp.min(grey)
  u = jnp.where(span > 0, (grey - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  q = jnp.clip(jnp.floor(u * num_bins), 0, num_bins - 1).astype(jnp.int32)
  v = _patches(q, patch_size)
  n = v.shape[-1]
  flat = v.reshape(-1, n)

  def counts(values):
    s = jnp.sort(values)
    right = jnp.searchsorted(s, values, side="right", method="sort")
    return right - jnp.searchsorted(s, values, side="left", method="sort")

  share = jax.vmap(counts)(flat).astype(image.dtype) / n
  return -jnp.mean(jnp.log(share), axis=-1).reshape(v.shape[:2])


def label_edges(label: Array) -> Array:
  """Eq. 4's edge map I^e: pixels with a 4-neighbour of another label, (H,W) int -> (H,W) bool.

  Both sides of a boundary count; the image border is not an edge (edge padding).
  """
  p = jnp.pad(label, 1, mode="edge")
  c = p[1:-1, 1:-1]
  return (c != p[:-2, 1:-1]) | (c != p[2:, 1:-1]) | (c != p[1:-1, :-2]) | (c != p[1:-1, 2:])


def fuzziness(
  image: Array, label: Array, *, patch_size: int = 16, num_bins: int = 256, kind: str = "max"
) -> Array:
  """Per-patch fuzziness `m = max(r_std, e_std)` of one image (Eq. 3, Eq. 4, Eq. 5).

  Args:
    image: (H,W,C).
    label: (H,W) int, the (noisy) label.
    patch_size, num_bins: as in `patch_entropy`.
    kind: "max" (the paper), "entropy" (r_std alone) or "edges" (e_std alone), Table 4.

  Returns:
    (H/p, W/p) values in [0, 1].
  """
  r = _minmax(patch_entropy(image, patch_size=patch_size, num_bins=num_bins))
  e = _minmax(jnp.mean(_patches(label_edges(label), patch_size).astype(r.dtype), axis=-1))
  return {"max": jnp.maximum(r, e), "entropy": r, "edges": e}[kind]


def soft_masks(m: Array, *, tau: float = 0.9, nonfuzzy_mask: str = "one_minus"):
  """The fuzzy and non-fuzzy soft masks of Eq. 6, elementwise.

  `M^f = 1 if m > τ else m`; `M^n = 1 if m < τ else (1 − m)` ("one_minus", reading the
  printed `τ − m` as a typo) or `max(τ − m, 0) = 0` ("clip").

  Args:
    m: fuzziness in [0, 1], any shape.
    tau: τ.
    nonfuzzy_mask: "one_minus" or "clip".

  Returns:
    `(M^f, M^n)`, each of m's shape.
  """
  mf = jnp.where(m > tau, 1.0, m)
  rest = 1.0 - m if nonfuzzy_mask == "one_minus" else jnp.maximum(tau - m, 0.0)
  mn = jnp.where(m < tau, 1.0, rest)
  return mf, mn


def fuzzy_masks(
  images: Array,
  labels: Array,
  *,
  patch_size: int = 16,
  num_bins: int = 256,
  kind: str = "max",
  tau: float = 0.9,
  nonfuzzy_mask: str = "one_minus",
) -> tuple[Array, Array, Array]:
  """Per-pixel fuzziness and soft masks of a batch (Eq. 6), each patch's value on its pixels.

  Args:
    images: (B,H,W,C).
    labels: (B,H,W) int.
    patch_size, num_bins, kind: as in `fuzziness`; tau, nonfuzzy_mask: as in `soft_masks`.

  Returns:
    `(m, M^f, M^n)`, (B,H,W) each.
  """
  m = jax.vmap(functools.partial(fuzziness, patch_size=patch_size, num_bins=num_bins, kind=kind))(
    images, labels
  )
  m = jnp.repeat(jnp.repeat(m, patch_size, axis=1), patch_size, axis=2)
  return (m, *soft_masks(m, tau=tau, nonfuzzy_mask=nonfuzzy_mask))


# ----------------------------------------------------------------------------- ω and L_W


def _logits(apply_fn, variables, params, x):
  (logits, _), _ = apply_fn({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
  return logits


def omega_weights(
  apply_fn,
  variables,
  *,
  optimizer: optim.Optimizer,
  opt_state: optax.OptState,
  x_fuzzy: Array,
  x_nonfuzzy: Array,
  y: Array,
  mask_fuzzy: Array,
  mask_nonfuzzy: Array,
  lr: float = 0.1,
  steps: int = 1,
) -> tuple[Array, Array, Array]:
  """Label confidences ω* by loss consistency (Eq. 9, Eq. 10), exact one-step meta-gradients.

  From ω0 = 1, `steps` (K) times: the virtual step θ_p(ω) = θ_n + U(∇θ mean(ω·M^f·CE(F(x_f;
  θ_n), y)), s) of the real (clip-free) update U at the real state s (Eq. 8); the gradient
  `G = ∂/∂ω mean(M^n·CE(F(x_n; θ_p(ω)), y))` (Eq. 9, Eq. 11, `meta.unrolled_meta_grad`); one Adam
  step (lr `lr`, state kept across the K steps) on ω. BatchNorm in train mode; no running
  statistics change.

  Args:
    apply_fn: the flax `model.apply` returning `((logits, features), updates)` in train mode.
    variables: `{"params": θ_n, "batch_stats": ...}` (constant).
    optimizer: the real optimizer; opt_state: its state after the non-fuzzy step.
    x_fuzzy, x_nonfuzzy: (B,H,W,C) the masked images M^f ⊙ x, M^n ⊙ x (Eq. 7).
    y: (B,H,W) int noisy labels.
    mask_fuzzy, mask_nonfuzzy: (B,H,W) M^f and M^n (Eq. 6).
    lr: Adam's lr on ω.
    steps: K ≥ 1.

  Returns:
    `(ω* (B,H,W), G (B,H,W) of the first step, the meta loss at θ_p(ω0))`, gradient-free.
  """
  variables = jax.lax.stop_gradient(variables)
  params = variables["params"]

  def train_loss(p, w):
    return jnp.mean(w * mask_fuzzy * losses.ce_map(_logits(apply_fn, variables, p, x_fuzzy), y))

  def meta_loss(p):
    logits = _logits(apply_fn, variables, p, x_nonfuzzy)
    return jnp.mean(mask_nonfuzzy * losses.ce_map(logits, y))

  omega = jnp.ones(y.shape, mask_fuzzy.dtype)
  tx = optax.adam(lr)
  tx_state = tx.init(omega)
  first = None
  for _ in range(steps):
    lval, g = meta.unrolled_meta_grad(
      train_loss, meta_loss, optimizer=optimizer, opt_state=opt_state, params=params, w0=omega
    )
    if first is None:
      first = (g, lval)
    updates, tx_state = tx.update(g, tx_state, omega)
    omega = optax.apply_updates(omega, updates)
  return jax.tree.map(jax.lax.stop_gradient, (omega, *first))


def class_gaussians(
  features: Array, labels: Array, weights: Array, num_classes: int
) -> tuple[Array, Array, Array]:
  """Weighted Gaussian fit of each class's features, pooled over the batch (DALE §3.3).

  Args:
    features: (B,H,W,D).
    labels: (B,H,W) int, the class of each pixel.
    weights: (B,H,W) ≥ 0 pixel weights (a soft mask, times Eq. 12's indicator).
    num_classes: L.

  Returns:
    `(μ (L,D), Σ (L,D,D), total weight (L,))`.
  """
  x = features.reshape(-1, features.shape[-1])
  y, w = labels.reshape(-1), weights.reshape(-1).astype(x.dtype)
  per_class = lambda c: wasserstein.weighted_gaussian(x, jnp.where(y == c, w, 0.0))
  return jax.vmap(per_class)(jnp.arange(num_classes))


def alignment_loss(
  features_fuzzy: Array,
  labels: Array,
  weights_fuzzy: Array,
  gaussians_nonfuzzy: tuple[Array, Array, Array],
  eps: Array,
  *,
  min_pixels: float = 10.0,
  jitter: float = 1e-4,
) -> tuple[Array, Array]:
  """The distribution alignment loss L_W (Eq. 13, Eq. 14).

  `L_W = Σ_c W2²(N(μ_n^c, Σ_n^c + ε_c·11ᵀ), N(μ_f^c, Σ_f^c))` over the classes c with at least
  `min_pixels` weight in both sets; differentiable in the fuzzy features.

  Args:
    features_fuzzy: (B,H,W,D) features of the fuzzy forward.
    labels: (B,H,W) int.
    weights_fuzzy: (B,H,W) M^f times Eq. 12's indicator.
    gaussians_nonfuzzy: `class_gaussians` of the non-fuzzy features, ((L,D), (L,D,D), (L,)).
    eps: (L,) Eq. 13's perturbations.
    min_pixels: least total weight per class and set.
    jitter: `wasserstein.gaussian_w2_squared`'s ε·I.

  Returns:
    `(L_W, number of classes in it)`, scalars.
  """
  mu_n, cov_n, total_n = gaussians_nonfuzzy
  num_classes, dim = mu_n.shape
  mu_f, cov_f, total_f = class_gaussians(features_fuzzy, labels, weights_fuzzy, num_classes)
  cov_n = cov_n + eps[:, None, None] * jnp.ones((dim, dim), cov_n.dtype)
  w2 = jax.vmap(
    lambda m1, c1, m2, c2: wasserstein.gaussian_w2_squared(m1, c1, mu2=m2, cov2=c2, jitter=jitter)
  )(mu_n, cov_n, mu_f, cov_f)
  valid = (total_n >= min_pixels) & (total_f >= min_pixels)
  return jnp.sum(jnp.where(valid, w2, 0.0)), jnp.sum(valid)


# ----------------------------------------------------------------------------- the method


def _masked_mean(values: Array, weights: Array) -> Array:
  total = jnp.sum(weights)
  return jnp.where(total > 0, jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0), jnp.nan)


def make_adam(lr: float, weight_decay: float = 0.0) -> optim.Optimizer:
  """Adam (PyTorch semantics, L2 penalty before Adam), no clipping, `eps_root` ADAM_EPS_ROOT."""
  return optim.make_optimizer(
    name="adam", learning_rate=lr, weight_decay=weight_decay, eps_root=ADAM_EPS_ROOT
  )


class DALE(base.SingleNetworkMethod):
  """DALE (Algorithm 1): a non-fuzzy Adam step, then a ω-weighted, W2-aligned fuzzy Adam step.

  Settings in `config.dale` (`default_config`). Batch keys: "image", "noisy_label"; the masks
  are computed inside the step from them.
  """

  name = "dale"

  # Checked when it is built (`_check_config`): patch_size must divide the run's image size.
  config_sections = {"dale": default_config}

  def __init__(self, config, *, steps_per_epoch):
    super().__init__(config, steps_per_epoch=steps_per_epoch)
    d = config.dale
    _check_config(d, config.data.size)
    self.mask_options = dict(
      patch_size=int(d.patch_size),
      num_bins=int(d.num_bins),
      kind=str(d.fuzziness),
      tau=float(d.tau),
      nonfuzzy_mask=str(d.nonfuzzy_mask),
    )

  def make_optimizer(self):
    # The paper's optimizer (§4.1), whatever config.train says: Adam, constant lr, no clipping.
    d = self.config.dale
    return optax.constant_schedule(float(d.lr)), make_adam(float(d.lr), float(d.weight_decay))

  def updates_per_step(self):
    return 2  # the non-fuzzy and the fuzzy update (the lr is constant either way)

  def phase(self, epoch):
    return "warmup" if epoch < self.config.dale.warmup_epochs else "main"

  def train_step(self, phase):
    if phase == "warmup":
      return self.plain_step(losses.ce_map)
    return self.alternating_step()

  # The pieces of one iteration, shared by the step and `diagnostics`.

  def _masked_inputs(self, batch):
    x, y = batch["image"], batch["noisy_label"]
    m, mf, mn = fuzzy_masks(x, y, **self.mask_options)
    if self.config.dale.mask_image:
      return m, mf, mn, x * mf[..., None], x * mn[..., None]
    return m, mf, mn, x, x

  def _nonfuzzy(self, state, xn, y, mn):
    """Eq. 1's loss and gradient at θ: `(loss, grads, batch_stats, features (B,H,W,D))`."""

    def loss_fn(params):
      (logits, features), stats = self.forward(params, state.batch_stats, xn)
      return jnp.mean(mn * losses.ce_map(logits, y)), (stats, features)

    (loss, (stats, features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, grads, stats, features

  def _omega(self, params, stats, opt_state, xf, xn, y, mf, mn):
    d = self.config.dale
    if not d.use_omega:
      ones = jnp.ones(y.shape, mf.dtype)
      return ones, jnp.zeros_like(ones), jnp.asarray(jnp.nan, mf.dtype)
    return omega_weights(
      self.model.apply,
      {"params": params, "batch_stats": stats},
      optimizer=self.optimizer,
      opt_state=opt_state,
      x_fuzzy=xf,
      x_nonfuzzy=xn,
      y=y,
      mask_fuzzy=mf,
      mask_nonfuzzy=mn,
      lr=float(d.omega_lr),
      steps=int(d.omega_steps),
    )

  def _fuzzy_loss(self, stats, xf, y, mf, omega, features_n, mn, rng):
    """Eq. 15's loss as a function of the parameters: `params -> (L_f, (stats, aux))`."""
    d = self.config.dale
    num_classes = self.config.data.num_classes
    keep = (omega > 1.0) if d.use_omega else jnp.ones(y.shape, bool)  # Eq. 12
    gaussians_n = class_gaussians(features_n, y, mn, num_classes)
    eps = float(d.cov_perturb) * jax.random.uniform(rng, (num_classes,), features_n.dtype)

    def loss_fn(params):
      (logits, features), new_stats = self.forward(params, stats, xf)
      seg = jnp.mean(omega * mf * losses.ce_map(logits, y))
      if d.alpha:
        w2, n_classes = alignment_loss(
          features,
          y,
          mf * keep,
          gaussians_n,
          eps,
          min_pixels=float(d.min_pixels),
          jitter=float(d.jitter),
        )
      else:
        w2, n_classes = jnp.zeros((), seg.dtype), jnp.zeros((), jnp.int32)
      loss = seg + float(d.alpha) * jnp.mean(omega) * w2
      aux = {"seg_term": seg, "w2_term": w2, "w2_classes": n_classes, "keep": keep}
      return loss, (new_stats, aux)

    return loss_fn

  def alternating_step(self) -> base.StepFn:
    """One iteration of Algorithm 1: non-fuzzy step, ω, fuzzy step (Eq. 1, Eq. 2, Eq. 15)."""

    def step(state: base.TrainState, batch, rng):
      y = batch["noisy_label"]
      m, mf, mn, xf, xn = self._masked_inputs(batch)
      loss_n, grads_n, stats, features_n = self._nonfuzzy(state, xn, y, mn)
      params_n, opt_state_n = self.update_params(state.params, state.opt_state, grads_n)
      omega, _, meta_loss = self._omega(params_n, stats, opt_state_n, xf, xn, y, mf, mn)
      loss_fn = self._fuzzy_loss(stats, xf, y, mf, omega, features_n, mn, rng)
      (loss_f, (stats, aux)), grads_f = jax.value_and_grad(loss_fn, has_aux=True)(params_n)
      params, opt_state = self.update_params(params_n, opt_state_n, grads_f)
      new_state = self.finish_step(state, params, opt_state, stats)
      metrics = {
        **self.measurements(loss_n + loss_f, grads_f, new_state.params),
        "grad_norm_nonfuzzy": optax.tree.norm(grads_n),
        "loss_nonfuzzy": loss_n,
        "loss_fuzzy": loss_f,
        "w2_term": aux["w2_term"],
        "meta_loss": meta_loss,
        "fuzzy_frac": jnp.mean(m > self.config.dale.tau),
        "omega_step": jnp.mean(jnp.abs(omega - 1.0)),
      }
      return new_state, metrics

    return step

  def diagnostics(self, state, batch):
    """What the iteration does on one batch at `state`, nothing trained.

    fuzzy_frac: share of pixels in patches with m > τ; mask_f_mean / mask_n_mean: mean M^f, M^n;
    omega_fuzzy / omega_nonfuzzy: mean ω* on pixels with m > τ / m ≤ τ (NaN if none);
    omega_keep_frac: M^f-weighted share of pixels Eq. 12 keeps (ω rose); omega_grad_abs: mean
    |G| (against Adam's eps 1e-8: ≫ means ω ≈ 1 ∓ lr·sign G); meta_loss; w2_term (L_W, before
    α) and w2_classes; seg_term: the ω-weighted fuzzy CE.
    """
    y = batch["noisy_label"]
    m, mf, mn, xf, xn = self._masked_inputs(batch)
    _, grads_n, stats, features_n = self._nonfuzzy(state, xn, y, mn)
    params_n, opt_state_n = self.update_params(state.params, state.opt_state, grads_n)
    omega, g_omega, meta_loss = self._omega(params_n, stats, opt_state_n, xf, xn, y, mf, mn)
    rng = jax.random.fold_in(state.rng, state.step)
    _, (_, aux) = self._fuzzy_loss(stats, xf, y, mf, omega, features_n, mn, rng)(params_n)
    fuzzy = (m > self.config.dale.tau).astype(mf.dtype)
    return {
      "fuzzy_frac": jnp.mean(fuzzy),
      "mask_f_mean": jnp.mean(mf),
      "mask_n_mean": jnp.mean(mn),
      "omega_fuzzy": _masked_mean(omega, fuzzy),
      "omega_nonfuzzy": _masked_mean(omega, 1.0 - fuzzy),
      "omega_keep_frac": _masked_mean(aux["keep"].astype(mf.dtype), mf),
      "omega_grad_abs": jnp.mean(jnp.abs(g_omega)),
      "meta_loss": meta_loss,
      "w2_term": aux["w2_term"],
      "w2_classes": aux["w2_classes"],
      "seg_term": aux["seg_term"],
    }


def _check_config(d: ml_collections.ConfigDict, size: int) -> None:
  if d.nonfuzzy_mask not in NONFUZZY_MASKS:
    raise ConfigError(f"dale.nonfuzzy_mask={d.nonfuzzy_mask!r}: choose one of {NONFUZZY_MASKS}")
  if d.fuzziness not in FUZZINESS:
    raise ConfigError(f"dale.fuzziness={d.fuzziness!r}: choose one of {FUZZINESS}")
  if d.patch_size < 1 or size % d.patch_size:
    raise ConfigError(f"dale.patch_size={d.patch_size} must divide data.size={size}")
  if d.omega_steps < 1:
    raise ConfigError(f"dale.omega_steps={d.omega_steps} must be >= 1")
  if not 0.0 < d.tau <= 1.0:
    raise ConfigError(f"dale.tau={d.tau} must be in (0, 1]")
  for field in ("lr", "omega_lr"):
    if d[field] <= 0:
      raise ConfigError(f"dale.{field}={d[field]} must be > 0")
  for field in ("alpha", "cov_perturb", "jitter", "weight_decay", "min_pixels"):
    if d[field] < 0:
      raise ConfigError(f"dale.{field}={d[field]} must be >= 0")
