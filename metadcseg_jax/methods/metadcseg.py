"""MetaDCSeg: L2B's meta-weighted pixel loss plus the Dynamic Center Distance boundary term and
Dice (MetaDCSeg §3, Eq. 13).

The meta step is L2B's (`methods/l2b.py`); the loss adds λ1 times the DCD-weighted boundary term and
λ2 times the soft Dice loss (`metadcseg_jax.core.objective`), on the very logits and features the
meta step linearised (no extra forward). The state carries the DCD fallback centers (Eq. 47). The
edge pixels of Eq. 8 come from `metadcseg_jax.core.edges`: PiDiNet inside the step, or Canny in the
input pipeline (`example_transform`).
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from metadcseg_jax import settings
from metadcseg_jax.core import dcd
from metadcseg_jax.core import edges as edges_lib
from metadcseg_jax.core import objective
from metadcseg_jax.methods import base
from metadcseg_jax.methods import l2b


def default_config() -> ml_collections.ConfigDict:
  """`config.dcd`: Dynamic Center Distance and the boundary terms (metadcseg).

  `objective.ObjectiveOptions` and `dcd.DCDOptions` read their fields by name, the edge
  detector (`edges.make_detector`) edges, pidinet_weights, canny_sigma and edge_top_fraction.
  """
  c = ml_collections.ConfigDict()
  c.use = True
  c.use_dice = True
  c.tau = 0.7
  c.tau_dcd = 1.0
  c.lambda_bd = 0.35
  c.lambda_dice = 0.08
  # Edge pixels of Eq. 8: "auto" (PiDiNet if pidinet_weights is set, else Canny) | "pidinet" |
  # "canny" | "sobel" (top edge_top_fraction of the Sobel magnitude).
  c.edges = "auto"
  c.pidinet_weights = ""  # the released table5_pidinet.pth (see the README)
  c.canny_sigma = 2.0
  c.edge_top_fraction = 0.05
  # How Eq. 12 and Eq. 13 are read (BUILD_NOTES.md, "DCD and the objective"): DCD divided by
  # its boundary mean ("mean") or not ("none"); weights with mean 1 ("mean_one") or sum 1
  # ("sum_one"); the boundary term on the meta-weighted loss ("meta") or on πa·f + πb·g ("mixing").
  c.dcd_scale = "mean"
  c.weight_sum = "mean_one"
  c.pixel_loss = "meta"
  c.detach_weights = True  # no gradient through h into w (Eq. 43, Eq. 44)
  c.center_momentum = 0.9
  return c


RULES: settings.Rules = (
  ("dcd.use", settings.boolean),
  ("dcd.use_dice", settings.boolean),
  ("dcd.tau", settings.number(0.5, 1.0, low_open=True, high_open=True)),
  ("dcd.tau_dcd", settings.number(0.0, low_open=True)),
  ("dcd.lambda_bd", settings.number(0.0)),
  ("dcd.lambda_dice", settings.number(0.0)),
  ("dcd.edge_top_fraction", settings.number(0.0, 1.0)),
  ("dcd.edges", settings.one_of(edges_lib.DETECTORS)),
  ("dcd.canny_sigma", settings.number(0.0, low_open=True)),
  ("dcd.dcd_scale", settings.one_of(dcd.DCD_SCALES)),
  ("dcd.weight_sum", settings.one_of(dcd.WEIGHT_SUMS)),
  ("dcd.pixel_loss", settings.one_of(objective.PIXEL_LOSSES)),
  ("dcd.detach_weights", settings.boolean),
  ("dcd.center_momentum", settings.number(0.0, 1.0)),
)


def _edge_problems(dcd_config: ml_collections.ConfigDict) -> list[str]:
  """PiDiNet's weights: asked for but not given, or given but not there."""
  weights = dcd_config.pidinet_weights
  if dcd_config.edges == "pidinet" and not weights:
    return [
      "config.dcd.edges='pidinet' needs config.dcd.pidinet_weights, the path of "
      "PiDiNet's released weights (table5_pidinet.pth)"
    ]
  if weights and not pathlib.Path(weights).expanduser().is_file():
    return [f"config.dcd.pidinet_weights={weights!r}: no such file"]
  return []


class MetaDCSeg(l2b.L2B):
  """MetaDCSeg §3; ablations (paper Table 5) via config.meta.use, config.dcd.use, use_dice."""

  name = "metadcseg"
  figure_name = "dcd.png"

  config_sections = {**l2b.L2B.config_sections, "dcd": default_config}
  config_rules = l2b.L2B.config_rules + RULES

  @classmethod
  def check_settings(cls, config):
    found = super().check_settings(config)
    if not settings.problems(config, RULES):  # single values first
      found += _edge_problems(config.dcd)
    return found

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
        edges=edges,
        weights=objective.pixel_weights(weights),
        default_centers=state.extra["dcd_centers"],
        options=self.loss_options,
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
