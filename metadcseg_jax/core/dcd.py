"""Dynamic Center Distance boundary weighting (MetaDCSeg §3.3, App. A.5).

Per image, the prediction splits the pixels into three regions (Eq. 6, Eq. 7, Eq. 8):
confident foreground, confident background and a boundary band (the
uncertain pixels plus image edges). Each region gets a feature center weighted
by the meta-learned reliability γ (Eq. 9, Eq. 10, fallback Eq. 47), each pixel a
Dynamic Center Distance (Eq. 11, clipped as in Eq. 46), and the boundary pixels
a softmax weight over that distance (Eq. 12).

Every kernel here is written for one image and vmapped over the batch by
`dcd_weights`, the batched entry point the objective uses. The edge pixels of
Eq. 8 come from `metadcseg_jax.core.edges` (PiDiNet, Canny or Sobel).

References:
  MetaDCSeg §3.3, App. A.4.2 and App. A.5.1.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from metadcseg_jax import settings
from metadcseg_jax.types import Array

# Region order used by every (3, ...) array in this module.
FG, BG, BD = 0, 1, 2
REGION_NAMES = ("fg", "bg", "bd")

DCD_EPS = 1e-8  # ε of Eq. 11.
DCD_MAX = 100.0  # DCD_max of Eq. 46.
MIN_PIXELS = 10  # τ_min of Eq. 47.


def _check_rank(name: str, x: Array, rank: int) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}.")


def regions(
  fg_prob: Array, edges: Array, *, tau: float = 0.7, exclusive: bool = False
) -> tuple[Array, Array, Array]:
  """Uncertainty-aware region decomposition of one image (Eq. 6, Eq. 7, Eq. 8).

  fg = M̂ > τ (Eq. 6), bg = M̂ < 1 − τ (Eq. 7),
  bd = (1 − τ ≤ M̂ ≤ τ) ∪ edges (Eq. 8).

  As written in the paper, fg and bg are defined by M̂ alone, so an edge pixel
  with a confident prediction lies in both bd and fg (or bg): the default keeps
  that overlap. `exclusive=True` removes the edge pixels from fg and bg so the
  three sets partition the image.

  Args:
    fg_prob: (H, W) predicted foreground probability M̂.
    edges: (H, W) bool edge mask (P_edge).
    tau: confidence threshold τ in (0.5, 1).
    exclusive: remove edge pixels from fg and bg.

  Returns:
    (fg, bg, bd), each (H, W) bool. No gradient.

  >>> fg, bg, bd = regions(jnp.array([[0.9, 0.6, 0.1], [0.8, 0.5, 0.2]]), jnp.eye(2, 3, dtype=bool))
  >>> fg.astype(int).tolist(), bg.astype(int).tolist(), bd.astype(int).tolist()
  ([[1, 0, 0], [1, 0, 0]], [[0, 0, 1], [0, 0, 1]], [[1, 1, 0], [0, 1, 0]])
  """
  if not 0.5 < tau < 1.0:
    raise ValueError(f"tau must be in (0.5, 1), got {tau}.")
  if fg_prob.shape != edges.shape:
    raise ValueError(f"fg_prob {fg_prob.shape} and edges {edges.shape} must have the same shape.")
  m = jax.lax.stop_gradient(fg_prob)
  edges = edges.astype(bool)
  fg = m > tau
  bg = m < 1.0 - tau
  bd = ((m >= 1.0 - tau) & (m <= tau)) | edges
  if exclusive:
    fg = fg & ~edges
    bg = bg & ~edges
  return fg, bg, bd


def region_centers(
  h: Array, gamma: Array, masks: Array, *, default_centers: Array, min_pixels: int = MIN_PIXELS
) -> tuple[Array, Array]:
  """γ-weighted region feature centers of one image (Eq. 10, fallback Eq. 47).

  c_k = Σ_{P_k} γ·h / Σ_{P_k} γ. γ is stop-gradiented; h keeps its gradient.
  A region with fewer than `min_pixels` pixels or with Σγ = 0 uses its
  default center instead (Eq. 47, MetaDCSeg §3.3); no NaN reaches value or gradient.

  Args:
    h: (H, W, D) features.
    gamma: (H, W) reliability γ = ã + b̃ (Eq. 9), ≥ 0.
    masks: (3, H, W) bool region masks in the order (fg, bg, bd).
    default_centers: (3, D) fallback centers.
    min_pixels: τ_min of Eq. 47.

  Returns:
    centers: (3, D) region centers.
    used_fallback: (3,) bool, True where the default center was used.

  Two pixels per region of a 1×6 image, γ weighting the second of the fg pair thrice; the bd
  region has too few pixels for `min_pixels=3` and takes its default center:

  >>> h = jnp.array([[[2.0], [4.0], [-1.0], [-3.0], [0.0], [1.0]]])
  >>> masks = jnp.repeat(jnp.eye(3, dtype=bool), 2, axis=1).reshape(3, 1, 6)
  >>> gamma = jnp.array([[1.0, 3.0, 1.0, 1.0, 1.0, 1.0]])
  >>> centers, fallback = region_centers(
  ...   h, gamma, masks, default_centers=jnp.full((3, 1), 9.0), min_pixels=2
  ... )
  >>> centers[:, 0].tolist(), fallback.tolist()
  ([3.5, -2.0, 0.5], [False, False, False])
  >>> region_centers(h, gamma, masks, default_centers=jnp.full((3, 1), 9.0), min_pixels=3)[1]
  Array([ True,  True,  True], dtype=bool)
  """
  _check_rank("h", h, 3)
  if gamma.shape != h.shape[:2] or masks.shape != (3,) + h.shape[:2]:
    raise ValueError(
      f"gamma {gamma.shape} must be (H, W) and masks {masks.shape} (3, H, W) for h {h.shape}."
    )
  if default_centers.shape != (3, h.shape[-1]):
    raise ValueError(f"default_centers must be (3, {h.shape[-1]}), got {default_centers.shape}.")
  gamma = jax.lax.stop_gradient(gamma).astype(h.dtype)
  m = masks.astype(h.dtype)  # (3, H, W)
  count = jnp.sum(masks, axis=(1, 2))  # (3,)
  mg = m * gamma  # (3, H, W)
  gsum = jnp.sum(mg, axis=(1, 2))  # (3,)
  num = jnp.einsum("khw,hwd->kd", mg, h)  # (3, D)
  valid = (count >= min_pixels) & (gsum > 0)
  # Double where: the unused division must not produce NaN gradients either.
  safe_gsum = jnp.where(valid, gsum, 1.0)
  centers = jnp.where(
    valid[:, None], num / safe_gsum[:, None], jax.lax.stop_gradient(default_centers).astype(h.dtype)
  )
  return centers, ~valid


def _safe_norm(x: Array) -> Array:
  """Euclidean norm over the last axis with gradient 0 (not NaN) at x = 0."""
  sq = jnp.sum(x**2, axis=-1)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def dcd_map(h: Array, centers: Array, *, eps: float = DCD_EPS, dcd_max: float = DCD_MAX) -> Array:
  """Dynamic Center Distance of every pixel of one image (Eq. 11, Eq. 46).

  DCD = min(‖h − c_fg‖·‖h − c_bg‖ / (‖h − c_bd‖ + ε), DCD_max).

  Norms have gradient 0 where a feature equals a center, and where the clip is
  active the division is replaced by a constant, so the gradient stays finite
  (zero through the clipped pixel) even when h = c_bd exactly.

  Args:
    h: (H, W, D) features.
    centers: (3, D) centers (fg, bg, bd).
    eps: ε of Eq. 11.
    dcd_max: DCD_max of Eq. 46.

  Returns:
    (H, W) DCD values in [0, dcd_max].

  A pixel at the fg center is 0; one between fg and bg, far from both and at the bd center, is
  clipped at `dcd_max`; one at (0, 1) is ‖·‖ 2·2 / (1 + ε):

  >>> centers = jnp.array([[1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]])  # fg, bg, bd
  >>> h = jnp.array([[[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]])
  >>> [round(v, 3) for v in dcd_map(h, centers, eps=1e-6, dcd_max=10.0)[0].tolist()]
  [0.0, 10.0, 1.0]
  """
  _check_rank("h", h, 3)
  if centers.shape != (3, h.shape[-1]):
    raise ValueError(f"centers must be (3, {h.shape[-1]}), got {centers.shape}.")
  d = _safe_norm(h[:, :, None, :] - centers[None, None])  # (H, W, 3)
  num = d[..., FG] * d[..., BG]
  den = d[..., BD] + eps
  clipped = num >= dcd_max * den
  safe_den = jnp.where(clipped, 1.0, den)
  return jnp.where(clipped, dcd_max, num / safe_den)


# How Eq. 12's softmax is read (MetaDCSeg §3.3.4; BUILD_NOTES.md, "DCD and the objective").
DCD_SCALES = ("mean", "none")
WEIGHT_SUMS = ("mean_one", "sum_one")


def boundary_weights(
  dcd: Array,
  bd: Array,
  *,
  tau_dcd: float = 1.0,
  scale: str = "mean",
  weight_sum: str = "mean_one",
) -> Array:
  """Softmax of DCD/τ_dcd over the boundary pixels of one image (Eq. 12).

  DCD grows linearly with the feature norm, so the literal softmax (scale="none") is one-hot
  at ordinary feature scales. scale="mean" divides DCD by its mean over bd first, making τ_dcd
  scale-free. weight_sum="sum_one" is Eq. 12 literally (the weights sum to 1 over bd);
  "mean_one" multiplies them by |bd|, so they average 1 and λ1 re-weights the boundary pixels
  rather than a one-pixel share of them.

  Args:
    dcd: (H, W) DCD map.
    bd: (H, W) bool boundary mask.
    tau_dcd: temperature τ_dcd > 0.
    scale: "mean" or "none".
    weight_sum: "mean_one" or "sum_one".

  Returns:
    (H, W) weights, 0 outside bd; all zeros (no NaN, zero gradient) when bd is empty.

  >>> dcd, bd = jnp.array([[1.0, 2.0, 3.0, 5.0]]), jnp.array([[True, True, True, False]])
  >>> w = boundary_weights(dcd, bd)  # softmax of DCD / mean over bd, averaging 1 there
  >>> [round(v, 3) for v in w[0].tolist()], round(float(w.sum()), 3)
  ([0.559, 0.922, 1.519, 0.0], 3.0)
  >>> boundary_weights(dcd, bd, weight_sum="sum_one").sum().round(3)  # Eq. 12 as written
  Array(1., dtype=float32)
  """
  if tau_dcd <= 0:
    raise ValueError(f"tau_dcd must be > 0, got {tau_dcd}.")
  if scale not in DCD_SCALES or weight_sum not in WEIGHT_SUMS:
    raise ValueError(
      f"scale must be in {DCD_SCALES} and weight_sum in {WEIGHT_SUMS}, got "
      f"{scale!r}, {weight_sum!r}."
    )
  if dcd.shape != bd.shape:
    raise ValueError(f"dcd {dcd.shape} and bd {bd.shape} must match.")
  bd = bd.astype(bool)
  count = jnp.sum(bd)
  if scale == "mean":
    mean = jnp.sum(jnp.where(bd, dcd, 0.0)) / jnp.maximum(count, 1)
    dcd = dcd / jnp.where(mean > 0, mean, 1.0)
  z = jnp.where(bd, dcd / tau_dcd, 0.0)
  zmax = jax.lax.stop_gradient(jnp.max(jnp.where(bd, z, -jnp.inf)))
  zmax = jnp.where(count > 0, zmax, 0.0)
  e = jnp.where(bd, jnp.exp(z - zmax), 0.0)
  total = jnp.sum(e)
  w = e / jnp.where(total > 0, total, 1.0)
  return w * count if weight_sum == "mean_one" else w


@dataclasses.dataclass(frozen=True)
class DCDOptions:
  """How the DCD boundary weights are computed, read by name from `config.dcd` (`from_config`).

  Frozen, so it hashes: a jitted function can take it as a static argument.

  Attributes:
    use: the DCD boundary term is on (False: the "DCD off" ablation, paper Table 5).
    tau: region threshold τ in (0.5, 1) (Eq. 6, Eq. 7, Eq. 8).
    tau_dcd: temperature τ_dcd > 0 of Eq. 12.
    dcd_scale, weight_sum: how Eq. 12 is read (`boundary_weights`' scale and weight_sum).
    detach_weights: stop the gradient at w (default); False lets it flow through h into the
      weights (Eq. 43, Eq. 44), via the pixel features and via the centers.
    center_momentum: EMA momentum of the fallback centers (Eq. 47, `update_default_centers`).
  """

  use: bool = True
  tau: float = 0.7
  tau_dcd: float = 1.0
  dcd_scale: str = "mean"
  weight_sum: str = "mean_one"
  detach_weights: bool = True
  center_momentum: float = 0.9

  @classmethod
  def from_config(cls, dcd_config: Mapping[str, Any]) -> "DCDOptions":
    """From the `dcd` section of a config; its other fields are the objective's and the edge
    detector's."""
    return settings.from_section(cls, dcd_config)


def dcd_weights_single(
  h: Array,
  fg_prob: Array,
  edges: Array,
  *,
  gamma: Array,
  default_centers: Array,
  options: DCDOptions = DCDOptions(),
) -> dict[str, Array]:
  """Regions (Eq. 6, Eq. 7, Eq. 8), centers (Eq. 10), DCD (Eq. 11), weights (Eq. 12) of one image.

  The regions overlap as the paper writes them (`regions`), and a region of fewer than
  `MIN_PIXELS` pixels uses its fallback center (Eq. 47).

  Args:
    h: (H, W, D) penultimate decoder features (Eq. 5).
    fg_prob: (H, W) foreground probability M̂ (no gradient is taken through it).
    edges: (H, W) bool edge pixels P_edge of Eq. 8 (`metadcseg_jax.core.edges`).
    gamma: (H, W) reliability γ (Eq. 9).
    default_centers: (3, D) fallback centers (Eq. 47).
    options: τ, τ_dcd, the reading of Eq. 12 and whether w is detached (Eq. 43, Eq. 44).

  Returns:
    dict with "w" (H,W), "dcd" (H,W), "masks" (3,H,W) bool, "centers" (3,D),
    "used_fallback" (3,) bool.
  """
  fg, bg, bd = regions(fg_prob, edges, tau=options.tau)
  masks = jnp.stack([fg, bg, bd])
  centers, used_fallback = region_centers(h, gamma, masks, default_centers=default_centers)
  dcd = dcd_map(h, centers)
  w = boundary_weights(
    dcd, bd, tau_dcd=options.tau_dcd, scale=options.dcd_scale, weight_sum=options.weight_sum
  )
  if options.detach_weights:
    w = jax.lax.stop_gradient(w)
  return dict(w=w, dcd=dcd, masks=masks, centers=centers, used_fallback=used_fallback)


def dcd_weights(
  h: Array,
  fg_prob: Array,
  edges: Array,
  *,
  gamma: Array,
  default_centers: Array,
  options: DCDOptions = DCDOptions(),
) -> dict[str, Array]:
  """`dcd_weights_single` vmapped over the batch.

  Args:
    h: (B, H, W, D); fg_prob, gamma: (B, H, W); edges: (B, H, W) bool;
    default_centers: (3, D), shared by the batch.
    options: as in `dcd_weights_single`.

  Returns:
    The dict of `dcd_weights_single` with a leading batch axis.
  """
  _check_rank("h", h, 4)
  b, hh, ww = h.shape[:3]
  for name, x in (("fg_prob", fg_prob), ("gamma", gamma), ("edges", edges)):
    if x.shape != (b, hh, ww):
      raise ValueError(f"{name} must be {(b, hh, ww)}, got {x.shape}.")
  fn = lambda h_, p_, e_, g_: dcd_weights_single(
    h_, p_, e_, gamma=g_, default_centers=default_centers, options=options
  )
  return jax.vmap(fn)(h, fg_prob, edges, gamma)


def init_default_centers(dim: int, dtype=jnp.float32) -> Array:
  """Initial default centers (Eq. 47): zeros, (3, D)."""
  return jnp.zeros((3, dim), dtype)


def update_default_centers(
  default_centers: Array, batch_centers: Array, valid: Array, *, momentum: float = 0.9
) -> Array:
  """EMA of the default centers from one batch's valid centers (Eq. 47).

  new_k = momentum·old_k + (1 − momentum)·mean_{b: valid[b,k]} c_{b,k};
  a region with no valid center in the batch keeps old_k. Carries no
  gradient (the result is training state).

  Args:
    default_centers: (3, D) current defaults.
    batch_centers: (B, 3, D) per-image centers.
    valid: (B, 3) bool, True where the center was computed from the image
      (i.e. `~used_fallback`).
    momentum: EMA momentum in [0, 1].

  Returns:
    (3, D) updated defaults.
  """
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
  if batch_centers.ndim != 3 or batch_centers.shape[1:] != default_centers.shape:
    raise ValueError(
      f"batch_centers must be (B, {default_centers.shape[0]}, "
      f"{default_centers.shape[1]}), got {batch_centers.shape}."
    )
  if valid.shape != batch_centers.shape[:2]:
    raise ValueError(f"valid must be {batch_centers.shape[:2]}, got {valid.shape}.")
  batch_centers = jax.lax.stop_gradient(batch_centers)
  v = valid.astype(batch_centers.dtype)[..., None]  # (B, 3, 1)
  n = jnp.sum(v, axis=0)  # (3, 1)
  mean = jnp.sum(v * batch_centers, axis=0) / jnp.maximum(n, 1.0)
  ema = momentum * default_centers + (1.0 - momentum) * mean
  return jnp.where(n > 0, ema, default_centers).astype(default_centers.dtype)
