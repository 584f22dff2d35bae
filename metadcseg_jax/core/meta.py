"""Exact pixel-wise meta-gradients: meta-weighted bootstrapping (MetaDCSeg §3.2, App. A.3).

One training iteration at parameters θ with optimizer state s (MetaDCSeg §3.2, App. A.3):

  p = softmax(F(x; θ)),  y_pseudo = argmax p                         (held fixed)
  f = CE(p, y),  g = CE(p, y_pseudo)                                  per pixel, (B,H,W)  (Eq. 25)
  θ̂(a, b) = θ + U(∇θ Σ_{i,h,w} (a·f + b·g) / (B·H·W), s)                         (Eq. 21)
  Lval(θ̂) = mean CE(F(xv; θ̂), yv)
  Ga, Gb = ∂Lval/∂a, ∂Lval/∂b  at (a, b) = (a0, b0)                                 (Eq. 22, Eq. 28)
  ã = max(a0 − η·Ga, 0),  b̃ = max(b0 − η·Gb, 0)                                          (Eq. 23)
  â = ã / (Z + 1e-10),  b̂ = b̃ / (Z + 1e-10),  Z = Σ_hw (ã + b̃)  per image or batch       (Eq. 24)
  γ = ã + b̃  (Eq. 9),  πa = ã / γ,  πb = b̃ / γ  (0 where γ = 0)

`U` is the real optimizer's clip-free update (`Optimizer.base`), momentum buffer and weight
decay included. `Ga`, `Gb` are exact derivatives of this one-step unrolled objective, by either
of two routes:

* "reverse": `jax.grad` of `Lval(θ̂(a, b))` through the virtual step (reverse-over-reverse);
  any optax update.
* "jvp": for an update affine in the gradient, `U(g) = U(0) + L g`, so
  `Ga_k = <v, L ∇θ f_k> = <Lᵀv, ∇θ f_k>` with `v = ∇θ Lval(θ̂)`: one JVP of the training
  forward along `u = Lᵀv` gives the logit tangents, and the chain rule through the per-pixel
  CE gives every pixel's `Ga` and `Gb` at once (Eq. 29; for plain SGD `Lᵀv = −λ v`).
  `L` and `Lᵀ` come from `jax.linearize` / `jax.linear_transpose` of `U`, so momentum and
  weight decay need no special casing.

At (a0, b0) = (0, 0) the virtual step θ̂ = θ + U(0, s) does not depend on the training batch, nor
does `u`: `meta_direction` computes it from the meta batch alone and `meta_weights_along` gives
any training batch's weights from it with one JVP (the label audit scores a whole split so).

BatchNorm runs in train mode (batch statistics) in every forward here; none of them changes
the running statistics: `meta_weights` returns none, and `meta_step_grads` returns only those of
the real training forward at θ.

References:
  Zhou et al., "L2B: Learning to Bootstrap Robust Models for Combating Label Noise", CVPR 2024.
  Ren et al., "Learning to Reweight Examples for Robust Deep Learning", ICML 2018.
"""

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metadcseg_jax import settings
from metadcseg_jax.core.losses import ce_map
from metadcseg_jax.core.optim import Optimizer
from metadcseg_jax.types import Array, Params, Variables

# The two exact routes to the meta-gradients, and where Eq. 24 normalises the weights.
ROUTES = ("reverse", "jvp")
NORMALIZERS = ("image", "batch")
EPS_Z = 1e-10  # Eq. 24's guard against an all-zero image


@dataclasses.dataclass(frozen=True)
class MetaOptions:
  """The options of one meta step, read by name from `config.meta` (`from_config`).

  Frozen, so it hashes: a jitted function can take it as a static argument.

  Attributes:
    a0, b0: the point (a0, b0) where the meta-gradients are taken (MetaDCSeg §3.2.2, App. A.3),
      Python floats: (0, 0) as in L2B's code (default), or (1, 0), the paper's Eq. 2.
    eta: meta learning rate η (Eq. 22); cancels in â, b̂, πa, πb when (a0, b0) = (0, 0).
    normalizer: "image" (Z per image, Eq. 24) or "batch" (Z over the batch, L2B's code).
    route: "reverse" (reverse-over-reverse, any optimizer) or "jvp" (forward-over-reverse,
      `Optimizer.linear_in_grad` only).
    bootstrap: the pseudo-label term takes its weight b̃ (L2B); False: b̃ = 0, and the weights
      re-weight the given labels only (learning to reweight, Ren et al. 2018).
  """

  a0: float = 0.0
  b0: float = 0.0
  eta: float = 1.0
  normalizer: str = "image"
  route: str = "reverse"
  bootstrap: bool = True

  @classmethod
  def from_config(cls, meta_config: Mapping[str, Any]) -> "MetaOptions":
    """From the `meta` section of a config; its other fields are the method's."""
    return settings.from_section(cls, meta_config)


class MetaOutput(NamedTuple):
  """Result of one meta step; every field is gradient-free.

  Attributes:
    ga: ∂Lval/∂a at (a0, b0), (B,H,W).
    gb: ∂Lval/∂b at (a0, b0), (B,H,W).
    a_tilde: ã = max(a0 − η·Ga, 0), (B,H,W) (Eq. 23).
    b_tilde: b̃ = max(b0 − η·Gb, 0), (B,H,W).
    a_hat: â, normalised ã (Eq. 24), (B,H,W).
    b_hat: b̂, normalised b̃, (B,H,W).
    gamma: reliability γ = ã + b̃ (Eq. 9), (B,H,W).
    pi_a: πa = ã / γ (0 where γ = 0), (B,H,W).
    pi_b: πb = b̃ / γ (0 where γ = 0), (B,H,W).
    y_pseudo: argmax of the prediction at θ, (B,H,W) int32.
    logits: the train-mode training forward at θ, (B,H,W,L).
    features: its penultimate features, (B,H,W,D).
    meta_loss: Lval(θ̂(a0, b0)), scalar.
  """

  ga: Array
  gb: Array
  a_tilde: Array
  b_tilde: Array
  a_hat: Array
  b_hat: Array
  gamma: Array
  pi_a: Array
  pi_b: Array
  y_pseudo: Array
  logits: Array
  features: Array
  meta_loss: Array

  def summary(self) -> dict[str, Array]:
    """Scalar diagnostics: the meta loss, α's share of the weight, the zero-weight share."""
    total = jnp.sum(self.a_hat + self.b_hat)
    return {
      "meta_loss": self.meta_loss,
      "alpha_share": jnp.sum(self.a_hat) / jnp.maximum(total, 1e-12),
      "weight_zero_frac": jnp.mean(self.gamma <= 0),
    }


def effective_fraction(weights: Array) -> Array:
  """Kish's effective sample size of non-negative `weights` (any shape) as a share of their
  count: (Σw)² / (n Σw²), 1 when all are equal, 1/n when one carries all; 0 when all are 0.

  >>> float(effective_fraction(jnp.array([1.0, 1.0, 0.0, 0.0])))
  0.5
  """
  w = jnp.ravel(weights)
  sq = jnp.sum(w**2)
  return jnp.where(sq > 0, jnp.sum(w) ** 2 / (w.size * jnp.where(sq > 0, sq, 1.0)), 0.0)


def suspicion_map(y: Array, y_pseudo: Array, *, a_tilde: Array, b_tilde: Array) -> Array:
  """Per-pixel label suspicion s = [y ≠ ŷ] · πb from the rectified weights (Eq. 23): how far the
  clean meta set moved a pixel's weight from its given label y to the pseudo-label ŷ where the
  two disagree (πb = b̃ / (ã + b̃), 1/2 where ã = b̃ = 0: neither is trusted; 0 where they agree).
  The label audit's pixel score (`metadcseg_jax.training.audit_passes`).

  Args:
    y: the given labels (B,H,W) int.
    y_pseudo: the pseudo-labels ŷ (B,H,W) int (`MetaOutput.y_pseudo`).
    a_tilde: ã (B,H,W) (`MetaOutput.a_tilde`).
    b_tilde: b̃ (B,H,W) (`MetaOutput.b_tilde`).

  Returns:
    s (B,H,W), in [0, 1]; numpy in, numpy out.

  >>> import numpy as np
  >>> y, y_pseudo = np.array([[1, 0, 1, 0]]), np.array([[1, 1, 0, 0]])
  >>> a_tilde, b_tilde = np.array([[0.3, 0.0, 0.1, 0.2]]), np.array([[0.1, 0.0, 0.3, 0.0]])
  >>> suspicion_map(y, y_pseudo, a_tilde=a_tilde, b_tilde=b_tilde)
  array([[0.  , 0.5 , 0.75, 0.  ]])
  """
  xp = jnp if isinstance(a_tilde, jax.Array) else np
  gamma = a_tilde + b_tilde
  share_b = xp.where(gamma > 0, b_tilde / xp.where(gamma > 0, gamma, 1.0), 0.5)
  return xp.where(y != y_pseudo, share_b, 0.0)


class MetaDirection(NamedTuple):
  """What the "jvp" route takes from the meta batch: the direction of its training-forward JVP.

  At (a0, b0) = (0, 0) the virtual step is θ̂ = θ + U(0, s) (Eq. 21 with a = b = 0), whatever the
  training batch, so `u` and `meta_loss` depend on θ, s and the meta batch alone, and one
  direction serves every training batch (`meta_direction`, `meta_weights_along`).

  Attributes:
    u: `Lᵀ ∇θ Lval(θ̂)`, a pytree like θ (Eq. 29; for plain SGD `−λ ∇θ Lval(θ̂)`).
    meta_loss: Lval(θ̂), scalar.
  """

  u: Params
  meta_loss: Array


LossFromOutputs = Callable[[Array, Array, MetaOutput], Tuple[Array, Any]]


def _forward(apply_fn, variables, params, *, x):
  """Train-mode forward: `((logits, features), new_batch_stats)`."""
  outputs, updates = apply_fn(
    {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
  )
  logits, features = outputs
  return (logits, features), updates.get("batch_stats", {})


def _meta_loss(apply_fn, variables, params, *, xv, yv):
  (logits, _), _ = _forward(apply_fn, variables, params, x=xv)
  return jnp.mean(ce_map(logits, yv))


def _virtual_update(optimizer, opt_state, params):
  """`g -> U(g, s)`: the clip-free real update at θ with the real state."""
  base_state = optimizer.base_state(opt_state)

  def update(grads):
    updates, _ = optimizer.base.update(grads, base_state, params)
    return updates

  return update


def linearize_update(
  optimizer: Optimizer, opt_state: optax.OptState, *, params: Params, grads: Params
) -> Tuple[Params, Callable[[Params], Params], Callable[[Params], Params]]:
  """The virtual step's update `U(·, s)` at `grads`, with its linear part and transpose.

  For an update affine in the gradient, `U(g) = U(0) + L g`, these are `U(grads)`, `g -> L g`
  and `v -> Lᵀ v` (for SGD with momentum and weight decay, `L = Lᵀ = −λ·I`; with Nesterov
  `−λ(1 + μ)·I`), found by `jax.linearize` / `jax.linear_transpose`, so nothing is hard-coded.

  Args:
    optimizer: the `Optimizer`; its clip-free `base` is used.
    opt_state: the state of `optimizer.tx`.
    params: θ, where `U` is evaluated (weight decay reads it).
    grads: the gradient at which to linearise (any point, if the update is affine).

  Returns:
    `(updates, linear, transpose)`.
  """
  updates, linear = jax.linearize(_virtual_update(optimizer, opt_state, params), grads)
  transpose = jax.linear_transpose(linear, grads)
  return updates, linear, lambda v: transpose(v)[0]


class _Problem(NamedTuple):
  """What one meta step is taken on: the model, its variables and optimizer, the two batches.

  x (B,H,W,C) training images, y (B,H,W) their noisy labels, xv (Bv,H',W',C) and yv (Bv,H',W')
  the clean meta batch; the rest as in `meta_weights`.
  """

  apply_fn: Callable[..., Any]
  variables: Variables
  optimizer: Optimizer
  opt_state: optax.OptState
  x: Array
  y: Array
  xv: Array
  yv: Array


class _TrainForward(NamedTuple):
  """The train-mode training forward at θ, as the meta step reuses it.

  Attributes:
    outputs: `(logits (B,H,W,L), features (B,H,W,D))`.
    jvp: its linear map in θ (route "jvp"), or None.
    vjp: `cotangents -> (grads,)`, its transpose, or None where nothing is differentiated.
    new_stats: the running statistics it updated, or None where they are not kept.
  """

  outputs: Tuple[Array, Array]
  jvp: Callable[[Params], Tuple[Array, Array]] | None
  vjp: Callable[[Tuple[Array, Array | None]], Tuple[Params]] | None
  new_stats: Any


def _checked(pb: _Problem, options: MetaOptions) -> MetaOptions:
  """`options` with (a0, b0) as Python floats, once `pb` and `options` are checked."""
  if not isinstance(pb.optimizer, Optimizer):
    raise ValueError(
      f"optimizer must be a metadcseg_jax.core.optim.Optimizer, got {type(pb.optimizer)}"
    )
  if options.route not in ROUTES:
    raise ValueError(f"route must be one of {ROUTES}, got {options.route!r}")
  if options.normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {options.normalizer!r}")
  if options.route == "jvp" and not pb.optimizer.linear_in_grad:
    raise ValueError(
      f"route='jvp' needs an update linear in the gradient; optimizer {pb.optimizer.name!r} is "
      "not: use route='reverse'"
    )
  if isinstance(options.eta, (int, float)) and options.eta <= 0:
    raise ValueError(f"eta must be > 0, got {options.eta}")
  _check_batch(pb.x, pb.y, names=("x", "y"))
  _check_batch(pb.xv, pb.yv, names=("xv", "yv"))
  a0, b0 = _static_float(options.a0, "a0"), _static_float(options.b0, "b0")
  return dataclasses.replace(options, a0=a0, b0=b0)


def _check_batch(img, lab, *, names=("x", "y")):
  """Images (B,H,W,C) and integer labels (B,H,W) of the same batch, or a ValueError naming them
  by `names` (images, labels)."""
  image_name, label_name = names
  if img.ndim != 4:
    raise ValueError(f"{image_name} must be (B,H,W,C), got shape {img.shape}")
  if lab.shape != img.shape[:3]:
    raise ValueError(f"{label_name} must be (B,H,W) = {img.shape[:3]}, got shape {lab.shape}")
  if not jnp.issubdtype(lab.dtype, jnp.integer):
    raise ValueError(f"{label_name} must hold integer class ids, got dtype {lab.dtype}")


def _static_float(value, name):
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(f"{name} must be a Python float (static), got {value!r}") from e


def _ce_logit_grads(logits, y, y_pseudo):
  """∂f/∂logits and ∂g/∂logits of the pixel losses f, g (Eq. 25): softmax − one-hot.

  Args: logits (B,H,W,L); y, y_pseudo (B,H,W) int. Returns: two (B,H,W,L) arrays.
  """
  p = jax.nn.softmax(logits, axis=-1)
  num_classes = logits.shape[-1]
  df = p - jax.nn.one_hot(y, num_classes, dtype=logits.dtype)
  dg = p - jax.nn.one_hot(y_pseudo, num_classes, dtype=logits.dtype)
  return df, dg


def _pseudo_labels_and_logit_grads(logits, y):
  """y_pseudo = argmax of the logits (B,H,W,L), and `_ce_logit_grads` of f and g (Eq. 25)."""
  if logits.shape[:3] != y.shape:
    raise ValueError(
      f"logits have shape {logits.shape}; expected (B,H,W,L) with (B,H,W) = y.shape {y.shape}"
    )
  y_pseudo = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return (y_pseudo, *_ce_logit_grads(logits, y, y_pseudo))


def _rectify_normalize(ga, gb, options):
  """Meta update a0 − η·Ga (Eq. 22, Eq. 28), rectify (Eq. 23), normalise (Eq. 24), γ (Eq. 9).

  Args: Ga, Gb (B,H,W); the `MetaOptions` (a0, b0, η, the normaliser).

  Returns: `(ã, b̃, â, b̂, γ, πa, πb)`, (B,H,W) each.
  """
  a0, b0, eta, normalizer = options.a0, options.b0, options.eta, options.normalizer
  a_t = jnp.maximum(a0 - eta * ga, 0.0)
  b_t = jnp.maximum(b0 - eta * gb, 0.0) if options.bootstrap else jnp.zeros_like(gb)
  gamma = a_t + b_t
  axes = (1, 2) if normalizer == "image" else None
  z = jnp.sum(gamma, axis=axes, keepdims=normalizer == "image")
  a_hat = a_t / (z + EPS_Z)
  b_hat = b_t / (z + EPS_Z)
  positive = gamma > 0
  safe_gamma = jnp.where(positive, gamma, 1.0)
  pi_a = jnp.where(positive, a_t / safe_gamma, 0.0)
  pi_b = jnp.where(positive, b_t / safe_gamma, 0.0)
  return a_t, b_t, a_hat, b_hat, gamma, pi_a, pi_b


def _reverse_grads(pb: _Problem, y_pseudo, *, a0, b0, dtype):
  """Reverse-over-reverse: `jax.grad` of Lval(θ̂(a, b)) w.r.t. (a, b) (Eq. 21, Eq. 22)."""
  apply_fn, variables, x, y = pb.apply_fn, pb.variables, pb.x, pb.y
  params = variables["params"]
  update = _virtual_update(pb.optimizer, pb.opt_state, params)

  def weighted_train_loss(p, a, b):
    (logits, _), _ = _forward(apply_fn, variables, p, x=x)
    # Per image Σ_hw / (H·W), averaged over the batch: at (1, 0) exactly a mean-CE step.
    return jnp.sum(a * ce_map(logits, y) + b * ce_map(logits, y_pseudo)) / y.size

  def unrolled(ab):
    grads = jax.grad(weighted_train_loss)(params, *ab)
    theta_hat = optax.apply_updates(params, update(grads))
    return _meta_loss(apply_fn, variables, theta_hat, xv=pb.xv, yv=pb.yv)

  ab0 = (jnp.full(y.shape, a0, dtype), jnp.full(y.shape, b0, dtype))
  meta_loss, (ga, gb) = jax.value_and_grad(unrolled)(ab0)
  return ga, gb, meta_loss


def _direction(pb: _Problem, grads0) -> MetaDirection:
  """`u = Lᵀ∇θ Lval(θ̂)` at `θ̂ = θ + U(grads0, s)` (the virtual step's gradient `grads0`)."""
  params = pb.variables["params"]
  update0, _, update_transpose = linearize_update(
    pb.optimizer, pb.opt_state, params=params, grads=grads0
  )
  theta_hat = optax.apply_updates(params, update0)
  meta_loss, v = jax.value_and_grad(_meta_loss, argnums=2)(
    pb.apply_fn, pb.variables, theta_hat, xv=pb.xv, yv=pb.yv
  )
  return MetaDirection(update_transpose(v), meta_loss)


def _grads_along(df, dg, dlogits):
  """Every pixel's `Ga`, `Gb` (B,H,W) from the logit tangents along `u` (Eq. 29): the chain rule
  through the per-pixel CE, whose logit gradients are `df`, `dg` (B,H,W,L); the virtual loss
  is Σ (a·f + b·g) / n over the n = B·H·W pixels."""
  n = df.size // df.shape[-1]
  return jnp.sum(df * dlogits, axis=-1) / n, jnp.sum(dg * dlogits, axis=-1) / n


def _jvp_grads(pb: _Problem, fwd: _TrainForward, *, a0, b0, df, dg):
  """Forward-over-reverse: `Ga_k = <Lᵀ∇Lval(θ̂), ∇θ f_k>` from one JVP (Eq. 29).

  `fwd.jvp` / `fwd.vjp` are the linearised training forward at θ and its transpose.
  """
  params = pb.variables["params"]
  if a0 == 0.0 and b0 == 0.0:
    # θ̂ = θ + U(0, s): no backward pass on the training batch.
    grads0 = jax.tree.map(jnp.zeros_like, params)
  else:
    n = df.size // df.shape[-1]
    (grads0,) = fwd.vjp(((a0 * df + b0 * dg) / n, None))
  direction = _direction(pb, grads0)
  dlogits, _ = fwd.jvp(direction.u)
  ga, gb = _grads_along(df, dg, dlogits)
  return ga, gb, direction.meta_loss


def _meta_from_forward(pb: _Problem, fwd: _TrainForward, options: MetaOptions) -> MetaOutput:
  """The meta step (Eq. 21, Eq. 22, Eq. 23, Eq. 24) on the training forward `fwd` at θ."""
  logits, features = fwd.outputs
  y_pseudo, df, dg = _pseudo_labels_and_logit_grads(logits, pb.y)
  if options.route == "reverse":
    ga, gb, meta_loss = _reverse_grads(
      pb, y_pseudo, a0=options.a0, b0=options.b0, dtype=logits.dtype
    )
  else:
    ga, gb, meta_loss = _jvp_grads(pb, fwd, a0=options.a0, b0=options.b0, df=df, dg=dg)
  return _output(
    ga,
    gb,
    y_pseudo=y_pseudo,
    logits=logits,
    features=features,
    meta_loss=meta_loss,
    options=options,
  )


def _output(ga, gb, *, y_pseudo, logits, features, meta_loss, options) -> MetaOutput:
  """The rectified, normalised weights (Eq. 23, Eq. 24) of `Ga`, `Gb`, gradient-free."""
  weights = _rectify_normalize(ga, gb, options)
  out = MetaOutput(ga, gb, *weights, y_pseudo, logits, features, meta_loss)
  return jax.tree.map(jax.lax.stop_gradient, out)


def _linearized_forward(apply_fn, variables, x) -> _TrainForward:
  """Training forward at θ, linearised (`jax.linearize`), with its transpose."""
  params = variables["params"]
  outputs, fwd_jvp, new_stats = jax.linearize(
    lambda p: _forward(apply_fn, variables, p, x=x), params, has_aux=True
  )
  fwd_transpose = jax.linear_transpose(fwd_jvp, params)

  def fwd_vjp(cotangents):
    ct_logits, ct_features = cotangents
    if ct_features is None:
      ct_features = jnp.zeros_like(outputs[1])
    return fwd_transpose((ct_logits, ct_features))

  return _TrainForward(outputs, fwd_jvp, fwd_vjp, new_stats)


def meta_weights(
  apply_fn: Callable[..., Any],
  variables: Variables,
  *,
  optimizer: Optimizer,
  opt_state: optax.OptState,
  x: Array,
  y: Array,
  xv: Array,
  yv: Array,
  options: MetaOptions = MetaOptions(),
) -> MetaOutput:
  """Pixel-wise meta-weights from exact one-step meta-gradients (MetaDCSeg App. A.3).

  With the per-pixel losses f, g (Eq. 25), the virtual step θ̂(a, b) (Eq. 21), the meta-gradients
  Ga, Gb of the clean meta loss at θ̂ (Eq. 22, Eq. 28; by one JVP on the "jvp" route, Eq. 29),
  rectified (Eq. 23) and normalised (Eq. 24) into the weights of the bootstrapping loss (Eq. 1).

  Args:
    apply_fn: the flax `model.apply`; called as `apply_fn(variables, x, train=True,
      mutable=["batch_stats"])` and returning `((logits (B,H,W,L), features (B,H,W,D)),
      updates)`.
    variables: `{"params": θ, "batch_stats": ...}` (batch stats are read, never changed).
    optimizer: from `metadcseg_jax.core.optim.make_optimizer`; its clip-free `base` is the
      virtual step's `U`.
    opt_state: the state of `optimizer.tx` (the real momentum buffer and step count).
    x: training images (B,H,W,C).
    y: noisy labels (B,H,W) int.
    xv: clean meta images (Bv,H',W',C).
    yv: clean meta labels (Bv,H',W') int.
    options: the point (a0, b0) ((0, 0) as in L2B's code, or (1, 0), the paper's Eq. 2), η,
      the normaliser and the route (`MetaOptions`; a0, b0 Python floats, η may be traced).

  Returns:
    A gradient-free `MetaOutput`.

  Raises:
    ValueError: for bad shapes, an unknown route or normalizer, or route="jvp" with an update
      that is not linear in the gradient.

  A one-weight "network" (a 1×1 convolution) on one 2×4 image whose noisy label claims the
  first row's last pixel and the whole second row; the clean meta batch labels x > 0. At (0, 0)
  only b̂'s pixels where the pseudo-label helps and â's where the given label does get weight,
  each image's weights summing to 1 (Eq. 24):

  >>> import numpy as np
  >>> from metadcseg_jax.core import optim
  >>> def apply_fn(variables, x, *, train, mutable):  # ((logits, features), updated stats)
  ...   return (x @ variables["params"]["w"], x), {}
  >>> params = {"w": jnp.array([[1.0, -1.0]])}
  >>> opt = optim.make_optimizer(learning_rate=0.1)
  >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(1, 2, 4, 1)
  >>> y_noisy = jnp.array([[[0, 0, 0, 1], [1, 1, 1, 1]]])
  >>> mo = meta_weights(
  ...   apply_fn, {"params": params}, optimizer=opt, opt_state=opt.tx.init(params),
  ...   x=x, y=y_noisy, xv=x, yv=(x[..., 0] > 0).astype(jnp.int32),
  ... )
  >>> np.round(np.asarray(mo.a_hat, np.float64), 2).tolist()
  [[[0.24, 0.16, 0.08, 0.0], [0.02, 0.08, 0.16, 0.24]]]
  >>> round(float(jnp.sum(mo.a_hat + mo.b_hat)), 4), mo.y_pseudo.tolist()
  (1.0, [[[1, 1, 1, 1], [0, 0, 0, 0]]])
  """
  pb = _Problem(
    apply_fn, jax.lax.stop_gradient(variables), optimizer, opt_state, x=x, y=y, xv=xv, yv=yv
  )
  options = _checked(pb, options)
  if options.route == "jvp":
    fwd = _linearized_forward(apply_fn, pb.variables, x)
  else:
    outputs, _ = _forward(apply_fn, pb.variables, pb.variables["params"], x=x)
    fwd = _TrainForward(outputs, None, None, None)
  return _meta_from_forward(pb, fwd, options)


def meta_direction(
  apply_fn: Callable[..., Any],
  variables: Variables,
  *,
  optimizer: Optimizer,
  opt_state: optax.OptState,
  xv: Array,
  yv: Array,
) -> MetaDirection:
  """The meta batch's part of `meta_weights` at (a0, b0) = (0, 0), route "jvp" (Eq. 29).

  `meta_weights_along(..., meta_direction(...), options)` equals `meta_weights(..., options)`
  for every training batch (to float32 rounding), at the cost of one training-forward JVP per
  training batch: a pass over many training batches against one meta batch (the label audit)
  computes the meta forward and backward once.

  Args:
    apply_fn, variables, optimizer, opt_state: as in `meta_weights`.
    xv: clean meta images (Bv,H,W,C).
    yv: clean meta labels (Bv,H,W) int.

  Raises:
    ValueError: bad shapes, or an update not linear in the gradient.
  """
  if not isinstance(optimizer, Optimizer) or not optimizer.linear_in_grad:
    name = getattr(optimizer, "name", type(optimizer).__name__)
    raise ValueError(
      f"meta_direction needs an update linear in the gradient; optimizer {name!r} is not: "
      "use meta_weights with route='reverse'"
    )
  _check_batch(xv, yv, names=("xv", "yv"))
  pb = _Problem(
    apply_fn, jax.lax.stop_gradient(variables), optimizer, opt_state, x=xv, y=yv, xv=xv, yv=yv
  )
  return jax.lax.stop_gradient(_direction(pb, jax.tree.map(jnp.zeros_like, pb.variables["params"])))


def meta_weights_along(
  apply_fn: Callable[..., Any],
  variables: Variables,
  *,
  x: Array,
  y: Array,
  direction: MetaDirection,
  options: MetaOptions = MetaOptions(),
) -> MetaOutput:
  """`meta_weights` at (a0, b0) = (0, 0) from a meta batch's `meta_direction` (Eq. 29, Eq. 23,
  Eq. 24): the training forward at θ and its JVP along `direction.u`.

  Args:
    apply_fn, variables: as in `meta_weights` (the same θ as the direction's).
    x: training images (B,H,W,C).
    y: noisy labels (B,H,W) int.
    direction: `meta_direction` at the same θ and optimizer state.
    options: η and the normaliser; (a0, b0) must be (0, 0) (the route is not used).

  Raises:
    ValueError: bad shapes, an unknown normalizer, or (a0, b0) ≠ (0, 0) (then θ̂ depends on
      the training batch).
  """
  a0, b0 = _static_float(options.a0, "a0"), _static_float(options.b0, "b0")
  if (a0, b0) != (0.0, 0.0):
    raise ValueError(
      f"meta_weights_along needs (a0, b0) = (0, 0), got ({a0}, {b0}): elsewhere the virtual "
      "step depends on the training batch; use meta_weights"
    )
  if options.normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {options.normalizer!r}")
  _check_batch(x, y, names=("x", "y"))
  variables = jax.lax.stop_gradient(variables)
  (logits, features), (dlogits, _) = jax.jvp(
    lambda p: _forward(apply_fn, variables, p, x=x)[0], (variables["params"],), (direction.u,)
  )
  y_pseudo, df, dg = _pseudo_labels_and_logit_grads(logits, y)
  ga, gb = _grads_along(df, dg, dlogits)
  return _output(
    ga,
    gb,
    y_pseudo=y_pseudo,
    logits=logits,
    features=features,
    meta_loss=direction.meta_loss,
    options=options,
  )


def meta_step_grads(
  apply_fn: Callable[..., Any],
  variables: Variables,
  *,
  optimizer: Optimizer,
  opt_state: optax.OptState,
  x: Array,
  y: Array,
  xv: Array,
  yv: Array,
  loss_from_outputs: LossFromOutputs,
  options: MetaOptions = MetaOptions(),
) -> Tuple[Params, Any, Array, MetaOutput, Any]:
  """Meta-weights plus the real training gradient, sharing the training forward.

  Computes `meta = meta_weights(...)`, then `∇θ loss` where
  `(loss, aux) = loss_from_outputs(logits, features, meta)` on the train-mode forward at θ.
  With route="jvp" the forward is linearised once (`jax.linearize`): its linear map gives the
  meta JVP and its transpose the virtual step's gradient ((a0, b0) ≠ (0, 0)) and the real
  loss's VJP. With route="reverse" one `jax.vjp` forward serves the pseudo labels and the real
  gradient; the unrolled meta objective recomputes its own forward. (Under `jit`, XLA's CSE
  merges a repeated identical forward anyway: a separate `meta_weights` + `value_and_grad`
  compiles to the same convolutions and FLOPs; the sharing is explicit here so it does not
  depend on that.)

  Cost at (0, 0), route="jvp", in forward-pass units F: training forward F, real backward 2F,
  meta forward+backward at θ̂ 3F, JVP tangent ~2F: ~8F against 3F for a plain step (XLA cost
  analysis on U-Net++: 2.65x the FLOPs; route="reverse" 3.3x).

  Args:
    apply_fn, variables, optimizer, opt_state, x, y, xv, yv: as in `meta_weights`.
    loss_from_outputs: `(logits (B,H,W,L), features (B,H,W,D), MetaOutput) -> (loss, aux)`,
      differentiable in logits and features (the MetaOutput is constant).
    options: as in `meta_weights`.

  Returns:
    `(grads, new_batch_stats, loss, meta_output, aux)`: the gradient w.r.t. params, the
    running statistics updated by the training forward at θ (only that one), the loss value,
    the gradient-free `MetaOutput` and the loss's aux.
  """
  pb = _Problem(apply_fn, variables, optimizer, opt_state, x=x, y=y, xv=xv, yv=yv)
  options = _checked(pb, options)
  if options.route == "jvp":
    fwd = _linearized_forward(apply_fn, variables, x)
  else:
    outputs, fwd_vjp, new_stats = jax.vjp(
      lambda p: _forward(apply_fn, variables, p, x=x), variables["params"], has_aux=True
    )
    fwd = _TrainForward(outputs, None, fwd_vjp, new_stats)
  # The scope names the meta-gradient's operations in XLA's profile (metadcseg_jax.tools.profiling).
  with jax.named_scope("meta_weights"):
    meta = _meta_from_forward(
      pb._replace(variables=jax.lax.stop_gradient(variables)),
      fwd._replace(outputs=jax.lax.stop_gradient(fwd.outputs)),
      options,
    )
  loss, loss_vjp, aux = jax.vjp(
    lambda lo, fe: loss_from_outputs(lo, fe, meta), *fwd.outputs, has_aux=True
  )
  cotangents = loss_vjp(jnp.ones_like(loss))
  (grads,) = fwd.vjp(cotangents)
  return grads, fwd.new_stats, loss, meta, aux


def unrolled_meta_grad(
  train_loss: Callable[[Params, Array], Array],
  meta_loss: Callable[[Params], Array],
  *,
  optimizer: Optimizer,
  opt_state: optax.OptState,
  params: Params,
  w0: Array,
) -> Tuple[Array, Array]:
  """The exact one-step meta-gradient of any per-pixel weights, reverse-over-reverse.

  `G = ∂/∂w meta_loss(θ + U(∇θ train_loss(θ, w), s))` at `w = w0`, with `U` the real
  optimizer's clip-free update (`Optimizer.base`) at θ with its real state s: the "reverse" route
  of `meta_weights` for losses the caller writes (DALE's ω, its Eq. 10, uses it with Adam).
  Nothing is linearised, so any optax update works.

  Args:
    train_loss: `(params, w) -> scalar`, the virtual step's loss, differentiable in both.
    meta_loss: `params -> scalar`, evaluated at the virtual parameters θ̂.
    optimizer: the `Optimizer`; its clip-free `base` is the virtual step's `U`.
    opt_state: the state of `optimizer.tx` (momentum, Adam moments, step count).
    params: θ.
    w0: the weights (any shape) where the gradient is taken.

  Returns:
    `(meta_loss(θ̂(w0)), G)`, G of the shape of w0.
  """
  update = _virtual_update(optimizer, opt_state, params)

  def unrolled(w):
    grads = jax.grad(train_loss)(params, w)
    return meta_loss(optax.apply_updates(params, update(grads)))

  return jax.value_and_grad(unrolled)(w0)
