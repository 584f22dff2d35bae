"""L2B: pixel-wise meta-weighted bootstrapping with exact meta-gradients (MetaDCSeg §3.2).

Zhou et al., "L2B: Learning to Bootstrap Robust Models for Combating Label Noise", CVPR 2024;
MetaDCSeg §3.2 and App. A.3. Warm-up epochs train plain CE; then every step takes the exact
one-step meta-gradients of the clean meta loss with respect to per-pixel weights of the
noisy-label and pseudo-label losses (`metadcseg_jax.core.meta`), and trains on the weighted loss
(Eq. 1). The DCD boundary term and the Dice term are MetaDCSeg's (`methods/metadcseg.py`).
"""

import contextlib
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metadcseg_jax import settings
from metadcseg_jax.core import losses
from metadcseg_jax.core import meta
from metadcseg_jax.core import objective
from metadcseg_jax.methods import base
from metadcseg_jax.types import Array

# Loss terms a meta step reports when its loss computes them.
LOSS_TERMS = ("ce_term", "bd_term", "dice_term")


def default_config() -> ml_collections.ConfigDict:
  """`config.meta`: the L2B meta step (l2b, metadcseg); `meta.MetaOptions` reads its fields."""
  c = ml_collections.ConfigDict()
  c.route = "jvp"  # "jvp" (forward-over-reverse, linear updates) | "reverse"
  c.a0 = 0.0  # (a0, b0) = (0, 0): L2B's code; (1, 0): the paper's Eq. 2
  c.b0 = 0.0
  c.eta = 0.01  # meta lr (Table 8 "Meta LR Scale"); cancels when (a0, b0) = (0, 0)
  c.normalizer = "image"  # "image" (Eq. 24) | "batch" (L2B)
  c.extra_clean_step = False  # L2B code: extra real step on the clean meta batch
  # The pseudo-label term's weight b̃ (L2B's bootstrapping); False: b̃ = 0, the weights re-weight
  # the given labels only (learning to reweight, Ren et al. 2018).
  c.bootstrap = True
  c.use = True  # ablation "meta off": plain CE weights (MetaDCSeg §3.4)
  # Matmul/convolution precision of the meta step: "highest" (true float32; a GPU's default
  # TF32 rounds the per-pixel meta-gradients, BUILD_NOTES.md, "Precision of the meta step") |
  # "high" | "default".
  c.precision = "highest"
  return c


RULES: settings.Rules = (
  ("meta.route", settings.one_of(meta.ROUTES)),
  ("meta.a0", settings.number(0.0)),
  ("meta.b0", settings.number(0.0)),
  ("meta.eta", settings.number(0.0, low_open=True)),
  ("meta.normalizer", settings.one_of(meta.NORMALIZERS)),
  ("meta.extra_clean_step", settings.boolean),
  ("meta.bootstrap", settings.boolean),
  ("meta.use", settings.boolean),
  ("meta.precision", settings.one_of(("default", "high", "highest"))),
)


class L2B(base.SingleNetworkMethod):
  """The meta step with the weighted bootstrapping loss alone (paper Table 2's L2B row)."""

  name = "l2b"
  uses_meta_batch = True
  audits = True

  figure_name = "meta_weights.png"

  config_sections = {"meta": default_config}
  config_rules = RULES

  @classmethod
  def check_settings(cls, config):
    found = super().check_settings(config)
    if found or "meta" not in config:
      return found
    if config.meta.route == "jvp" and config.train.optimizer != "sgd":
      found.append(
        f"config.meta.route='jvp' needs an update linear in the gradient "
        f"(config.train.optimizer='sgd'); use route='reverse' with "
        f"{config.train.optimizer!r}"
      )
    return found

  def __init__(self, config, *, steps_per_epoch):
    super().__init__(config, steps_per_epoch=steps_per_epoch)
    self.meta_options = meta.MetaOptions.from_config(config.meta)
    # bfloat16 rounds the per-pixel meta-gradients beyond use (50-70% relative error,
    # BUILD_NOTES.md, "Precision of the meta step"): with a half-precision model the meta-weights
    # come from a float32 twin on the same parameters, and only the real step is in bf16.
    half = jnp.dtype(config.model.dtype).itemsize < 4
    self.meta_model = self.build_network(jnp.float32) if half else self.model

  def updates_per_step(self):
    # L2B's code makes a second optimizer step per iteration on the clean meta batch, at the
    # same (per-epoch) learning rate.
    return 2 if self.config.meta.extra_clean_step else 1

  def phase(self, epoch):
    return "warmup" if epoch < self.config.train.warmup_epochs else "main"

  def train_step(self, phase):
    if phase == "warmup" or not self.config.meta.use:
      return self.plain_step(losses.ce_map)  # warm-up (MetaDCSeg §3.2), or the "meta off" ablation
    return self.meta_step()

  def meta_precision(self):
    """The matmul/convolution precision the meta step is traced under (`config.meta.precision`).

    The per-pixel meta-gradients are small differences of products (Eq. 28, Eq. 29); TF32 (a GPU's
    default for float32 convolutions) and bf16 round them visibly (BUILD_NOTES.md, "Precision
    of the meta step"). "highest" is exact float32 everywhere; on a CPU every setting is.
    """
    precision = self.config.meta.precision
    if precision == "default":
      return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)

  def loss_from_outputs(
    self, state: base.TrainState, batch: dict[str, Array]
  ) -> Callable[[Array, Array, meta.MetaOutput], tuple[Array, Any]]:
    """The training loss of a meta step given the forward's outputs (Eq. 1, first term of
    Eq. 13): `(logits (B,H,W,L), features (B,H,W,D), MetaOutput) -> (loss, aux)`."""
    del state
    y = batch["noisy_label"]

    def loss_fn(logits, features, mo):
      del features
      loss = objective.l2b_loss(
        logits,
        y,
        a_hat=mo.a_hat,
        b_hat=mo.b_hat,
        y_pseudo=mo.y_pseudo,
        normalizer=self.meta_options.normalizer,
      )
      return loss, {"ce_term": loss}

    return loss_fn

  def extra_from_aux(self, state: base.TrainState, aux: dict[str, Any]) -> dict[str, Array]:
    """The new `state.extra` after a meta step whose loss returned `aux`."""
    del aux
    return state.extra

  def meta_step(self) -> base.StepFn:
    """Meta-weights from the exact meta-gradients, then the real step (MetaDCSeg App. A.3)."""

    def step(state: base.TrainState, batch, rng):
      del rng
      x, y = batch["image"], batch["noisy_label"]
      if self.meta_model is not self.model:
        grads, stats, loss, mo, aux = self._half_precision_grads(state, batch)
      else:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        with self.meta_precision():
          grads, stats, loss, mo, aux = meta.meta_step_grads(
            self.model.apply,
            variables,
            optimizer=self.optimizer,
            opt_state=state.opt_state,
            x=x,
            y=y,
            xv=batch["meta_image"],
            yv=batch["meta_label"],
            loss_from_outputs=self.loss_from_outputs(state, batch),
            options=self.meta_options,
          )
      params, opt_state = self.update_params(state.params, state.opt_state, grads)
      if self.config.meta.extra_clean_step:
        params, opt_state, stats = self._clean_step(params, opt_state, stats, batch)
      new_state = self.finish_step(
        state, params, opt_state, stats, extra=self.extra_from_aux(state, aux)
      )
      metrics = {
        **self.measurements(loss, grads, new_state.params),
        **mo.summary(),
        **{k: aux[k] for k in LOSS_TERMS if k in aux},
      }
      return new_state, metrics

    return step

  def _half_precision_grads(self, state: base.TrainState, batch):
    """`meta_step_grads` with a half-precision model: float32 meta-weights (`weights`), then
    the gradient of the loss on the model's own (bf16) training forward."""
    mo = self.weights(
      state, batch["image"], batch["noisy_label"], batch["meta_image"], batch["meta_label"]
    )
    loss_from_outputs = self.loss_from_outputs(state, batch)

    def loss_fn(params):
      outputs, stats = self.forward(params, state.batch_stats, batch["image"])
      loss, aux = loss_from_outputs(*outputs, mo)
      return loss, (stats, aux)

    (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, stats, loss, mo, aux

  def _clean_step(self, params, opt_state, batch_stats, batch):
    """L2B's code: one more real optimizer step on the clean meta batch (default off)."""

    def clean_loss(p):
      (logits, _), stats = self.forward(p, batch_stats, batch["meta_image"])
      return losses.mean_ce(logits, batch["meta_label"]), stats

    grads, stats = jax.grad(clean_loss, has_aux=True)(params)
    params, opt_state = self.update_params(params, opt_state, grads)
    return params, opt_state, stats

  def weights(self, state, x, y, xv, yv) -> meta.MetaOutput:
    """The meta step's weights (MetaDCSeg App. A.3) at `state`, nothing trained (traceable).

    Args: x (B,H,W,C), y (B,H,W) noisy labels, xv (Bv,H,W,C), yv (Bv,H,W) a clean meta batch.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    with self.meta_precision():
      return meta.meta_weights(
        self.meta_model.apply,
        variables,
        optimizer=self.optimizer,
        opt_state=state.opt_state,
        x=x,
        y=y,
        xv=xv,
        yv=yv,
        options=self.meta_options,
      )

  def audit_maps(self, state, batch):
    mo = self.weights(
      state, batch["image"], batch["noisy_label"], batch["meta_image"], batch["meta_label"]
    )
    return _audit_maps(batch["noisy_label"], mo)

  @property
  def audit_shares_direction(self) -> bool:
    # At (a0, b0) = (0, 0) with an update linear in the gradient, the meta batch's part of the
    # weights is the same for every training batch (`meta.MetaDirection`).
    o = self.meta_options
    return float(o.a0) == 0.0 and float(o.b0) == 0.0 and self.optimizer.linear_in_grad

  def audit_direction(self, state, meta_image, meta_label) -> meta.MetaDirection:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    with self.meta_precision():
      return meta.meta_direction(
        self.meta_model.apply,
        variables,
        optimizer=self.optimizer,
        opt_state=state.opt_state,
        xv=meta_image,
        yv=meta_label,
      )

  def audit_maps_along(self, state, batch, direction):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    with self.meta_precision():
      mo = meta.meta_weights_along(
        self.meta_model.apply,
        variables,
        x=batch["image"],
        y=batch["noisy_label"],
        direction=direction,
        options=self.meta_options,
      )
    return _audit_maps(batch["noisy_label"], mo)

  @functools.cached_property
  def _weights_fn(self):
    return jax.jit(self.weights, compiler_options=base.RUN_ONCE_COMPILE)

  def term_weights(self) -> dict[str, float]:
    """The weight of each loss term of `loss_from_outputs`' aux in the total loss."""
    return {"ce_term": 1.0}

  def diagnostics(self, state, batch):
    """Per loss term: its gradient norm before clipping and the cosine of the total gradient
    with the first (CE) term's; the meta weights' zero share and α's share where the noisy
    label and the pseudo-label disagree (where α and β compete); the effective share of pixels
    (Kish, `meta.effective_fraction` of γ); the mean feature norm; for
    DCD, the boundary weights' effective support 1/Σw² (w normalised to sum 1) and max."""
    mo = self.weights(
      state, batch["image"], batch["noisy_label"], batch["meta_image"], batch["meta_label"]
    )
    loss_fn = self.loss_from_outputs(state, batch)
    weights = self.term_weights()

    def terms(params):
      (logits, features), _ = self.forward(params, state.batch_stats, batch["image"])
      _, aux = loss_fn(logits, features, mo)
      return {k: w * aux[k] for k, w in weights.items()}, (aux, features)

    values, vjp, (aux, features) = jax.vjp(terms, state.params, has_aux=True)
    grads = {}
    for k in values:
      cotangent = {j: jnp.asarray(j == k, v.dtype) for j, v in values.items()}
      (grads[k],) = vjp(cotangent)
    total = jax.tree.map(lambda *g: sum(g), *grads.values())
    norm = optax.tree.norm
    out = {f"grad_norm_{k}": norm(g) for k, g in grads.items()}
    out["grad_norm_total"] = norm(total)
    out["cos_total_ce"] = optax.tree.vdot(total, grads["ce_term"]) / jnp.maximum(
      norm(total) * norm(grads["ce_term"]), 1e-30
    )
    disagree = batch["noisy_label"] != mo.y_pseudo
    a_on = jnp.sum(jnp.where(disagree, mo.a_hat, 0.0))
    ab_on = jnp.sum(jnp.where(disagree, mo.a_hat + mo.b_hat, 0.0))
    out.update(
      weight_zero_frac=jnp.mean(mo.gamma <= 0),
      # The share of the batch's pixels that effectively train (Kish): how far the meta step
      # concentrates the loss on a few pixels, beyond those it zeroes.
      effective_pixel_frac=meta.effective_fraction(mo.gamma),
      alpha_share=jnp.sum(mo.a_hat) / jnp.maximum(jnp.sum(mo.a_hat + mo.b_hat), 1e-30),
      alpha_share_disagree=a_on / jnp.maximum(ab_on, 1e-30),
      disagree_frac=jnp.mean(disagree),
      feature_norm=jnp.mean(jnp.linalg.norm(features, axis=-1)),
    )
    if "w" in aux and "bd" in aux:
      w = jnp.where(aux["bd"], aux["w"], 0.0)
      total = jnp.sum(w, axis=(1, 2), keepdims=True)
      p = w / jnp.where(total > 0, total, 1.0)
      support = jnp.where(
        total[:, 0, 0] > 0, 1.0 / jnp.maximum(jnp.sum(p**2, (1, 2)), 1e-30), jnp.nan
      )
      out["dcd_support"] = jnp.nanmean(support)  # NaN when no image has a boundary set
      out["dcd_w_max"] = jnp.max(w)
      out["bd_frac"] = jnp.mean(aux["bd"])
    return out

  def explain(self, state, batch):
    mo = self.meta_output(state, batch)
    return [
      base.PixelMap("γ = α̃ + β̃ (Eq. 9)", mo.gamma),
      base.PixelMap("πa = α̃ / γ (trust in the label)", mo.pi_a),
    ]

  def meta_output(self, state, batch) -> meta.MetaOutput:
    """The meta step's weights on one batch at `state` (MetaDCSeg App. A.3), nothing trained."""
    return self._weights_fn(
      state,
      jnp.asarray(batch["image"]),
      jnp.asarray(batch["noisy_label"]),
      jnp.asarray(batch["meta_image"]),
      jnp.asarray(batch["meta_label"]),
    )


def _audit_maps(y, mo: meta.MetaOutput) -> dict[str, Array]:
  """`audit_maps`' output from the noisy labels y (B,H,W) and the weights."""
  return {
    "suspicion": meta.suspicion_map(y, mo.y_pseudo, a_tilde=mo.a_tilde, b_tilde=mo.b_tilde),
    "pseudo": mo.y_pseudo,
    "probs": jax.nn.softmax(mo.logits, axis=-1),
  }
