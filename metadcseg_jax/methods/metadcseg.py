"""MetaDCSeg: L2B's meta-weighted pixel loss plus the Dynamic Center Distance boundary term and
Dice (MetaDCSeg §3, Eq. 13).

The meta step is L2B's (`methods/l2b.py`); the loss adds λ1 times the DCD-weighted boundary term
and λ2 times the soft Dice loss (`metadcseg_jax.objective`), on the very logits and features the
meta step linearised (no extra forward). The state carries the DCD fallback centers (Eq. 47).
The edge pixels of Eq. 8 come from `metadcseg_jax.edges`: PiDiNet inside the step, or Canny in
the input pipeline (`example_transform`).
"""

import functools

import jax
import jax.numpy as jnp

from metadcseg_jax import dcd
from metadcseg_jax import edges as edges_lib
from metadcseg_jax import objective
from metadcseg_jax.methods import base
from metadcseg_jax.methods import l2b


class MetaDCSeg(l2b.L2B):
  """MetaDCSeg §3; ablations (paper Table 5) via config.meta.use, config.dcd.use, use_dice."""

  name = "metadcseg"
  figure_name = "dcd.png"

  def __init__(self, config, *, steps_per_epoch):
    super().__init__(config, steps_per_epoch=steps_per_epoch)
    d = config.dcd
    self.detector = edges_lib.make_detector(d)
    if self.detector.on_host and d.use:
      self.example_transform = self.detector.add_edges
    self.loss_options = objective.ObjectiveOptions.from_config(
      d, normalizer=self.meta_options.normalizer
    )

  def init_extra(self):
    return {"dcd_centers": dcd.init_default_centers(self.config.model.width)}

  def train_step(self, phase):
    if phase == "main" and not self.config.meta.use:
      return self.meta_off_step()
    return super().train_step(phase)

  def _edges(self, batch):
    if not self.config.dcd.use:
      return jnp.zeros(batch["noisy_label"].shape, bool)
    return self.detector.edges(batch)

  def loss_from_outputs(self, state, batch):
    edges = self._edges(batch)

    def loss_fn(logits, features, weights):
      # `weights`: a MetaOutput, or the PixelWeights of the "meta off" ablation.
      return objective.metadcseg_loss(
        logits,
        features,
        batch["noisy_label"],
        edges,
        objective.pixel_weights(weights),
        state.extra["dcd_centers"],
        self.loss_options,
      )

    return loss_fn

  def term_weights(self):
    d = self.config.dcd
    return {"ce_term": 1.0, "bd_term": float(d.lambda_bd), "dice_term": float(d.lambda_dice)}

  def extra_from_aux(self, state, aux):
    return {**state.extra, "dcd_centers": aux["new_default_centers"]}

  def meta_off_step(self) -> base.StepFn:
    """The "meta off" ablation (paper Table 5): plain-CE weights, DCD and Dice as configured."""

    def step(state: base.TrainState, batch, rng):
      del rng
      loss_from_outputs = self.loss_from_outputs(state, batch)

      def loss_fn(params):
        (logits, features), stats = self.forward(params, state.batch_stats, batch["image"])
        weights = objective.meta_off_weights(
          jnp.argmax(logits, -1), normalizer=self.meta_options.normalizer
        )
        loss, aux = loss_from_outputs(logits, features, weights)
        return loss, (stats, aux)

      (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      new_state = self.apply_gradients(state, grads, stats, extra=self.extra_from_aux(state, aux))
      metrics = {
        **self.measurements(loss, grads, new_state.params),
        **{k: aux[k] for k in l2b.LOSS_TERMS},
      }
      return new_state, metrics

    return step

  @functools.cached_property
  def _maps_fn(self):
    def maps(state, batch):
      mo = self.weights(
        state, batch["image"], batch["noisy_label"], batch["meta_image"], batch["meta_label"]
      )
      _, aux = self.loss_from_outputs(state, batch)(mo.logits, mo.features, mo)
      return {"gamma": mo.gamma, "w": aux["w"], "bd": aux["bd"]}

    return jax.jit(maps, compiler_options=base.RUN_ONCE_COMPILE)

  def explain(self, state, batch):
    """γ (Eq. 9) and the DCD boundary weights (Eq. 12) of one batch: the paper's Fig. 3."""
    out = self._maps_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
    w = jnp.where(out["bd"], out["w"], jnp.nan)  # NaN outside the boundary set: not drawn
    # The softmax of Eq. 12 is peaked: a log scale shows the whole ring.
    return [
      base.PixelMap("γ = α̃ + β̃ (Eq. 9)", out["gamma"]),
      base.PixelMap("DCD weight on the boundary (Eq. 12)", w, log=True),
    ]
