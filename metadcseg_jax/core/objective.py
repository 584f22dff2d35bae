"""The MetaDCSeg training objective (Eq. 13, MetaDCSeg §3.4).

Per image i, with L^hw = â·f + b̂·g the meta-weighted pixel loss of Eq. 1 (the same weights in
both terms, as Eq. 13 writes it),

  L_i = Σ_hw L^hw + λ1·Σ_{bd} w·L^hw + λ2·Dice(M̂_i, y_i),

f = CE(p, y) on the noisy labels, g = CE(p, y_pseudo) on the model's own prediction, â, b̂ the
normalised meta weights (Eq. 24), w the DCD boundary weights (Eq. 12, by default with mean 1
over the boundary set, so a boundary pixel's weight is â·(1 + λ1·w)) and Dice the soft
foreground Dice loss (smooth 1). The batch loss is the mean of L_i ("image" normaliser,
Σ_hw â = 1 per image); with the "batch" normaliser (Σ_batch â = 1, L2B's code) the
meta-weighted terms are summed over the batch and the Dice term averaged.

`ObjectiveOptions(pixel_loss="mixing")` uses πa·f + πb·g (πa = ã/γ, the paper's α + β = 1)
in the boundary term instead of L^hw: an earlier reading kept for the ablation table.

Ablations (paper Table 5): meta off = `meta_off_weights` (plain CE on the noisy labels), DCD off
= `DCDOptions(use=False)`, Dice off = `ObjectiveOptions(use_dice=False)`. L2B is `l2b_loss`,
the first term alone. The options' fields are named as in `config.dcd`, which they are read from.

The meta weights (â, b̂, γ, πa, πb, y_pseudo) are used as given: for the real step pass them
without gradient (the meta module's outputs are constants there); γ is stop-gradiented inside
the centers regardless (MetaDCSeg §3.3).

References:
  MetaDCSeg §3.3, §3.4 and App. A.5.
"""

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from metadcseg_jax import settings
from metadcseg_jax.core import dcd
from metadcseg_jax.core.dcd import DCDOptions
from metadcseg_jax.core.losses import ce_map, foreground_prob, soft_dice_loss
from metadcseg_jax.core.meta import MetaOutput
from metadcseg_jax.core.meta import NORMALIZERS
from metadcseg_jax.types import Array

# What the boundary term weights (`ObjectiveOptions.pixel_loss`).
PIXEL_LOSSES = ("meta", "mixing")


class PixelWeights(NamedTuple):
  """The per-pixel weights of Eq. 13, (B,H,W) each (`pixel_weights` takes them from a meta step).

  Attributes:
    a_hat, b_hat: normalised meta weights â, b̂ (Eq. 24).
    gamma: reliability γ = ã + b̃ (Eq. 9).
    pi_a, pi_b: mixing ã/γ and b̃/γ (0 where γ = 0).
    y_pseudo: int pseudo-labels.
  """

  a_hat: Array
  b_hat: Array
  gamma: Array
  pi_a: Array
  pi_b: Array
  y_pseudo: Array


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
  """The settings of Eq. 13, read by name from `config.dcd` (`from_config`).

  Frozen, so it hashes: a jitted function can take it as a static argument.

  Attributes:
    lambda_bd: λ1, weight of the boundary term.
    lambda_dice: λ2, weight of the Dice term.
    use_dice: include the Dice term (False: the "Dice off" ablation).
    pixel_loss: "meta" (L^hw in the boundary term, default) or "mixing" (πa·f + πb·g).
    normalizer: "image" or "batch" (see the module docstring): the meta step's, `config.meta`.
    dcd: the boundary weights (Eq. 12) and whether the boundary term is on at all.
  """

  lambda_bd: float
  lambda_dice: float
  use_dice: bool = True
  pixel_loss: str = "meta"
  normalizer: str = "image"
  dcd: DCDOptions = DCDOptions()

  @classmethod
  def from_config(cls, dcd_config: Mapping[str, Any], *, normalizer: str) -> "ObjectiveOptions":
    """From the `dcd` section of a config and the meta step's normaliser."""
    return settings.from_section(
      cls, dcd_config, normalizer=normalizer, dcd=DCDOptions.from_config(dcd_config)
    )


def pixel_weights(weights: MetaOutput | PixelWeights) -> PixelWeights:
  """The per-pixel weights of a meta step (or `weights` itself), (B,H,W) each."""
  return PixelWeights(*(getattr(weights, k) for k in PixelWeights._fields))


def _check_normalizer(normalizer: str) -> None:
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}.")


def meta_off_weights(
  y_pseudo: Array, *, normalizer: str = "image", dtype=jnp.float32
) -> PixelWeights:
  """Weights of the "meta off" ablation: plain CE on the noisy labels.

  â = 1/HW (1/(B·HW) with the batch normaliser, so the first term is the
  plain mean CE either way), b̂ = 0, γ = 1, πa = 1, πb = 0.

  Args:
    y_pseudo: (B, H, W) int pseudo-labels (they enter with weight b̂ = 0).
    normalizer: "image" or "batch", as `ObjectiveOptions.normalizer`.
    dtype: float dtype of the weights.

  Returns:
    The `PixelWeights`, (B, H, W) each.
  """
  _check_normalizer(normalizer)
  shape = y_pseudo.shape
  if len(shape) != 3:
    raise ValueError(f"y_pseudo must be (B, H, W), got shape {shape}.")
  b, h, w = shape
  n = h * w if normalizer == "image" else b * h * w
  ones = jnp.ones(shape, dtype)
  zeros = jnp.zeros(shape, dtype)
  return PixelWeights(
    a_hat=ones / n, b_hat=zeros, gamma=ones, pi_a=ones, pi_b=zeros, y_pseudo=y_pseudo
  )


def _check_maps(shape: tuple[int, ...], **maps: Array) -> None:
  for name, x in maps.items():
    if x.shape != shape:
      raise ValueError(f"{name} must have shape {shape}, got {x.shape}.")


def _weighted_sum(f: Array, g: Array, *, a: Array, b: Array) -> Array:
  """Σ_hw (a·f + b·g) per image, (B,)."""
  return jnp.sum(a * f + b * g, axis=(1, 2))


def l2b_loss(
  logits: Array,
  noisy_label: Array,
  *,
  a_hat: Array,
  b_hat: Array,
  y_pseudo: Array,
  normalizer: str = "image",
) -> Array:
  """First term of Eq. 13: the meta-weighted bootstrapping loss (Eq. 1, L2B).

  Args:
    logits: (B, H, W, L).
    noisy_label: (B, H, W) int noisy labels y.
    a_hat: (B, H, W) normalised weight of the noisy-label loss f.
    b_hat: (B, H, W) normalised weight of the pseudo-label loss g.
    y_pseudo: (B, H, W) int pseudo-labels (argmax of the prediction).
    normalizer: "image" (mean over images of Σ_hw) or "batch" (Σ over batch).

  Returns:
    Scalar loss. Differentiable in logits and in (a_hat, b_hat), so the meta
    step can reuse it for its virtual update.

  Σ_hw (â·f + b̂·g) on a 1×2 image with uniform logits (f = g = log 2 at every pixel):

  >>> y = jnp.array([[[0, 1]]])
  >>> a_hat, b_hat = jnp.array([[[0.5, 0.25]]]), jnp.array([[[0.0, 0.25]]])
  >>> loss = l2b_loss(jnp.zeros((1, 1, 2, 2)), y, a_hat=a_hat, b_hat=b_hat, y_pseudo=1 - y)
  >>> round(float(loss), 4)  # log 2
  0.6931
  """
  _check_normalizer(normalizer)
  _check_maps(
    logits.shape[:3], noisy_label=noisy_label, a_hat=a_hat, b_hat=b_hat, y_pseudo=y_pseudo
  )
  per_image = _weighted_sum(ce_map(logits, noisy_label), ce_map(logits, y_pseudo), a=a_hat, b=b_hat)
  return jnp.mean(per_image) if normalizer == "image" else jnp.sum(per_image)


def _check_loss_inputs(logits, features, noisy_label, *, edges, weights, default_centers, options):
  _check_normalizer(options.normalizer)
  if options.pixel_loss not in PIXEL_LOSSES:
    raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {options.pixel_loss!r}.")
  if logits.ndim != 4 or logits.shape[-1] < 2:
    raise ValueError(f"logits must be (B, H, W, L) with L >= 2, got {logits.shape}.")
  shape = logits.shape[:3]
  _check_maps(shape, noisy_label=noisy_label, edges=edges, **weights._asdict())
  if features.ndim != 4 or features.shape[:3] != shape:
    raise ValueError(f"features must be (B, H, W, D) with B, H, W = {shape}, got {features.shape}.")
  if default_centers.shape != (3, features.shape[-1]):
    raise ValueError(
      f"default_centers must be (3, {features.shape[-1]}), got {default_centers.shape}."
    )


def _dcd_off_aux(default_centers: Array, shape: tuple[int, int, int], dtype) -> dict[str, Array]:
  """The DCD entries of `metadcseg_loss`'s aux with the boundary term off: defaults, zeros."""
  b = shape[0]
  return dict(
    centers=jnp.broadcast_to(default_centers, (b,) + default_centers.shape),
    used_fallback=jnp.ones((b, 3), bool),
    w=jnp.zeros(shape, dtype),
    dcd=jnp.zeros(shape, dtype),
    bd=jnp.zeros(shape, bool),
    new_default_centers=default_centers,
  )


def metadcseg_loss(
  logits: Array,
  features: Array,
  noisy_label: Array,
  *,
  edges: Array,
  weights: PixelWeights,
  default_centers: Array,
  options: ObjectiveOptions,
) -> tuple[Array, dict[str, Any]]:
  """The full MetaDCSeg objective (Eq. 13, MetaDCSeg §3.4).

  Args:
    logits: (B, H, W, L) float; class 0 is background.
    features: (B, H, W, D) penultimate decoder features h (Eq. 5).
    noisy_label: (B, H, W) int noisy labels y.
    edges: (B, H, W) bool edge pixels of Eq. 8 (`metadcseg_jax.core.edges`).
    weights: â, b̂ (Eq. 24), γ (Eq. 9), πa, πb and y_pseudo, (B, H, W) each.
    default_centers: (3, D) fallback centers (Eq. 47), from the train state.
    options: λ1, λ2, the terms switched on, the normaliser and the DCD options.

  Returns:
    loss: scalar, = ce_term + λ1·bd_term + λ2·dice_term (per the normaliser).
    aux: dict with
      "ce_term": scalar first term (per the normaliser);
      "bd_term", "dice_term": scalars, the boundary and Dice terms without their λ and
        combined over the batch as the first term is (0 when switched off);
      "centers" (B, 3, D), "used_fallback" (B, 3) bool, "w" (B, H, W), "dcd" (B, H, W),
        "bd" (B, H, W) bool: the DCD quantities (defaults, all-True fallback and zeros when
        `options.dcd.use` is False);
      "new_default_centers" (3, D): EMA update of `default_centers` with this batch's
        non-fallback centers (unchanged when the boundary term is off).

  Uniform logits over two classes on one 2×2 image, meta off (`meta_off_weights`: â = 1/(H·W)),
  no edges: every pixel's CE is log 2, the boundary term weights it alike over bd (the whole
  image: M̂ = 1/2), and 1 − soft Dice of p = 1/2 against three foreground pixels is 1/3:

  >>> y = jnp.array([[[0, 1], [1, 1]]])
  >>> loss, aux = metadcseg_loss(
  ...   jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 3)), y,
  ...   edges=jnp.zeros((1, 2, 2), bool), weights=meta_off_weights(y),
  ...   default_centers=jnp.zeros((3, 3)),
  ...   options=ObjectiveOptions(lambda_bd=0.35, lambda_dice=0.08),
  ... )
  >>> [round(float(aux[k]), 4) for k in ("ce_term", "bd_term", "dice_term")], round(float(loss), 4)
  ([0.6931, 0.6931, 0.3333], 0.9624)
  """
  _check_loss_inputs(
    logits,
    features,
    noisy_label,
    edges=edges,
    weights=weights,
    default_centers=default_centers,
    options=options,
  )
  a_hat, b_hat, gamma, pi_a, pi_b, y_pseudo = weights
  normalizer, pixel_loss = options.normalizer, options.pixel_loss

  f = ce_map(logits, noisy_label)
  g = ce_map(logits, y_pseudo)
  per_pixel = a_hat * f + b_hat * g  # L^hw of Eq. 1
  reduce = jnp.mean if normalizer == "image" else jnp.sum
  ce_term = reduce(jnp.sum(per_pixel, axis=(1, 2)))

  if options.dcd.use:
    with jax.named_scope("dcd"):  # names DCD's operations in XLA's profile
      out = dcd.dcd_weights(
        features,
        foreground_prob(logits),
        edges,
        gamma=gamma,
        default_centers=default_centers,
        options=options.dcd,
      )
    boundary_loss = per_pixel if pixel_loss == "meta" else pi_a * f + pi_b * g
    bd_term = reduce(jnp.sum(out["w"] * boundary_loss, axis=(1, 2)))
    dcd_aux = dict(
      centers=out["centers"],
      used_fallback=out["used_fallback"],
      w=out["w"],
      dcd=out["dcd"],
      bd=out["masks"][:, dcd.BD],
      new_default_centers=dcd.update_default_centers(
        default_centers,
        out["centers"],
        ~out["used_fallback"],
        momentum=options.dcd.center_momentum,
      ),
    )
  else:
    bd_term = jnp.zeros((), f.dtype)
    dcd_aux = _dcd_off_aux(default_centers, logits.shape[:3], f.dtype)
  use_dice, lambda_bd, lambda_dice = options.use_dice, options.lambda_bd, options.lambda_dice
  dice_term = jnp.mean(soft_dice_loss(logits, noisy_label)) if use_dice else jnp.zeros((), f.dtype)

  loss = ce_term + lambda_bd * bd_term + lambda_dice * dice_term
  aux = dict(ce_term=ce_term, bd_term=bd_term, dice_term=dice_term, **dcd_aux)
  return loss, aux
