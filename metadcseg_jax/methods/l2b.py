"""L2B: pixel-wise meta-weighted bootstrapping with exact meta-gradients (MetaDCSeg §3.2).

Zhou et al., "L2B: Learning to Bootstrap Robust Models for Combating Label Noise", CVPR 2024;
MetaDCSeg §3.2 and App. A.3. Warm-up epochs train plain CE; then every step takes the exact
one-step meta-gradients of the clean meta loss with respect to per-pixel weights of the
noisy-label and pseudo-label losses (`metadcseg_jax.meta`), and trains on the weighted loss
(Eq. 1). The DCD boundary term and the Dice term are MetaDCSeg's (`methods/metadcseg.py`).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from metadcseg_jax import losses
from metadcseg_jax import meta
from metadcseg_jax import objective
from metadcseg_jax.methods import base
from metadcseg_jax.types import Array

# Loss terms a meta step reports when its loss computes them.
LOSS_TERMS = ("ce_term", "bd_term", "dice_term")


class L2B(base.SingleNetworkMethod):
  """The meta step with the weighted bootstrapping loss alone (paper Table 2's L2B row)."""

  name = "l2b"
  uses_meta_batch = True

  figure_name = "meta_weights.png"

  def __init__(self, config, *, steps_per_epoch):
    super().__init__(config, steps_per_epoch=steps_per_epoch)
    self.meta_options = meta.MetaOptions.from_config(config.meta)

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

  def loss_from_outputs(
    self, state: base.TrainState, x: Array, y: Array
  ) -> Callable[[Array, Array, meta.MetaOutput], tuple[Array, Any]]:
    """The training loss of a meta step given the forward's outputs (Eq. 1, first term of
    Eq. 13): `(logits (B,H,W,L), features (B,H,W,D), MetaOutput) -> (loss, aux)`."""
    del state, x

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
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      grads, stats, loss, mo, aux = meta.meta_step_grads(
        self.model.apply,
        variables,
        state.opt_state,
        self.optimizer,
        x,
        y,
        batch["meta_image"],
        batch["meta_label"],
        self.loss_from_outputs(state, x, y),
        **self.meta_options.kwargs(),
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
    return meta.meta_weights(
      self.model.apply,
      variables,
      state.opt_state,
      self.optimizer,
      x,
      y,
      xv,
      yv,
      **self.meta_options.kwargs(),
    )

  @functools.cached_property
  def _weights_fn(self):
    return jax.jit(self.weights, compiler_options=base.RUN_ONCE_COMPILE)

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
