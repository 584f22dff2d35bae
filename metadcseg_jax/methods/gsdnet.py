"""GSD-Net: two U-Nets with distance-aware weights, superpixel label refinement and region mixing.

Wang et al., "From Noisy Labels to Intrinsic Structure: A Geometric-Structural Dual-Guided
Framework for Noise-Robust Medical Image Segmentation" (GSD-Net), §3, with the details its
equations leave open taken from the authors' `train_GSD-Net.py`. Per step, on a batch with
noisy labels ỹ:

1. Two views: network 1 sees the image, network 2 a colour/intensity-jittered copy.
2. Small-loss selection (GSD-Net Eq. 5): the JoCoR-style per-pixel loss
   `ℓ = CE1 + CE2 + 0.5·(KL(p2‖p1) + KL(p1‖p2))` (GSD-Net Eq. 2 plus GSD-Net Eq. 4), the
   `1 − τ_e` share of the batch's pixels with the smallest ℓ kept, `τ_e = τ·min(e/(T_k − 1), 1)`.
3. Geometric distance-aware weight (GSD-Net Eq. 9):
   `W = clip(min(EDT(ỹ), D) + min(EDT(1 − ỹ), D), 1, max(D + 1 − ⌊e / s⌋, 1))`, D = 10, s = 10
   epochs of the paper's 100; the selected pixels' ℓ is averaged with weight W (GSD-Net Eq. 10).
4. From the SGLR start epoch on (30 of 100): structure-guided label refinement (GSD-Net Eq. 14):
   the α-mix (α ~ U(0,1)) of both networks' softmax, averaged over each SLIC superpixel,
   thresholded at 0.5, replaces ỹ on the unselected pixels; knowledge transfer (GSD-Net Eq. 15)
   pastes a partner image's regions (and labels and W) into each image; both networks train on
   the mixed images with `0.5·mean(CE·W) + 0.5·mean(W)·Dice` each (GSD-Net Eq. 17) plus the
   W-weighted symmetric KL between them (GSD-Net Eq. 18).

Inference sums the two networks' logits (`two_network.TwoNetworkMethod.predict`).

Host side (`example_transform`, after augmentation): the clipped distance maps "edt_fg",
"edt_bg" (H,W) float32 of the noisy label and the SLIC map "superpixels" (H,W) int32.

`official_bugs=True` reproduces the released code's two bugs: its SLIC map is overwritten by the
(truncated) distance map, so "superpixels" are the bands of equal integer distance to the label
boundary; and the mixed-image cross-entropy is taken of softmax outputs, `-log softmax(p)[y]`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage
from skimage import segmentation

from metadcseg_jax import settings
from metadcseg_jax.core import losses
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.methods import two_network
from metadcseg_jax.types import Array

# Batch keys `GSDNet.example_transform` adds.
DISTANCE_KEYS = ("edt_fg", "edt_bg")
SUPERPIXEL_KEY = "superpixels"
# ITU-R 601 luma weights, torchvision's `rgb_to_grayscale` (the jitter's grey level).
_LUMA = (0.299, 0.587, 0.114)


def default_config() -> ml_collections.ConfigDict:
  """`config.gsdnet`: GSD-Net's settings (the forget rate τ is `config.coteach.forget_rate`)."""
  c = ml_collections.ConfigDict()
  # Each KL direction's weight in the selection loss (the code's 1 − co_lambda, co_lambda 0.5).
  c.co_lambda = 0.5
  # Epoch counts of the paper's 100-epoch schedule; with scale_schedule they are scaled by
  # num_epochs / reference_epochs (GSD-Net Eq. 9 decays W's cap over the maximum epoch count).
  c.reference_epochs = 100
  c.scale_schedule = True
  c.num_gradual = 20  # T_k: τ_e = τ·min(e/19, 1)
  c.sglr_start = 30  # first epoch of label refinement and knowledge transfer
  c.cap_every = 10  # epochs per unit decrease of W's cap 11 − ⌊e/10⌋
  c.max_distance = 10.0  # D: each EDT clipped here (the paper: 10 at 256 px, 5 at 128 px)
  c.jitter_strength = 0.5  # s of ColorJitter(0.8s, 0.8s, 0.8s): 0.5 (0.05 for BUS_UC)
  # SLIC (scikit-image) on the augmented image; n_segments is for reference_size² pixels and,
  # with scale_slic_with_size, scaled with the image area (~64 px per superpixel).
  c.slic_segments = 1024
  c.slic_compactness = 10.0  # for Lab colour (0-100); divided by 100 for non-RGB images
  c.slic_sigma = 1.0
  c.slic_reference_size = 256
  c.scale_slic_with_size = True
  c.pseudo_threshold = 0.5  # superpixel mean foreground probability for a foreground label
  c.kt_share_threshold = 0.5  # foreground share above which an image keeps its background
  c.official_bugs = False  # reproduce the released code's two bugs (module docstring)
  return c


RULES: settings.Rules = (
  ("gsdnet.co_lambda", settings.number(0.0)),
  ("gsdnet.reference_epochs", settings.integer(1)),
  ("gsdnet.scale_schedule", settings.boolean),
  ("gsdnet.num_gradual", settings.integer(1)),
  ("gsdnet.sglr_start", settings.integer(0)),
  ("gsdnet.cap_every", settings.number(0.0, low_open=True)),
  ("gsdnet.max_distance", settings.number(0.0, low_open=True)),
  ("gsdnet.jitter_strength", settings.number(0.0, 1.25, high_open=True)),
  ("gsdnet.slic_segments", settings.integer(1)),
  ("gsdnet.slic_compactness", settings.number(0.0, low_open=True)),
  ("gsdnet.slic_sigma", settings.number(0.0)),
  ("gsdnet.slic_reference_size", settings.integer(1)),
  ("gsdnet.scale_slic_with_size", settings.boolean),
  ("gsdnet.pseudo_threshold", settings.number(0.0, 1.0)),
  ("gsdnet.kt_share_threshold", settings.number(0.0, 1.0)),
  ("gsdnet.official_bugs", settings.boolean),
)


# ----------------------------------------------------------------------------- host side


def distance_maps(noisy_label: np.ndarray, *, max_distance: float) -> tuple[np.ndarray, ...]:
  """The two clipped Euclidean distance transforms of a label (GSD-Net Eq. 8).

  Args:
    noisy_label: (H,W) integers; classes > 0 are foreground.
    max_distance: D, the clip of each transform.

  Returns:
    `(min(EDT(ỹ), D), min(EDT(1 − ỹ), D))`, each (H,W) float32: a foreground pixel's distance
    to the nearest background pixel (0 on background), and the converse. With no pixel of the
    other class the distance is unbounded, so D (scipy's EDT has no defined answer there).
  """
  fg = np.asarray(noisy_label) > 0
  full = np.full(fg.shape, max_distance, np.float64)
  d_fg = ndimage.distance_transform_edt(fg) if (~fg).any() else full
  d_bg = ndimage.distance_transform_edt(~fg) if fg.any() else full
  clip = lambda d: np.minimum(d, max_distance).astype(np.float32)
  return clip(d_fg), clip(d_bg)


def superpixels(
  image: np.ndarray, *, n_segments: int, compactness: float, sigma: float
) -> np.ndarray:
  """SLIC superpixels of one image (GSD-Net §3.4), ids 0..S−1 as an (H,W) int32 map.

  SLIC rescales intensities to [0, 1]; an RGB image (C = 3) is then converted to Lab (0-100),
  where `compactness` is meant. Other images are clustered on their rescaled intensities with
  `compactness / 100`, which is the same balance of colour and space distance.

  Args:
    image: (H,W,C) float, any intensity scale.
    n_segments, compactness, sigma: SLIC's parameters (the paper: 1024, 10, 1 at 256 px).
  """
  image = np.asarray(image, np.float64)
  kw = {"n_segments": n_segments, "sigma": sigma, "start_label": 0}
  if image.shape[-1] == 3:
    seg = segmentation.slic(image, compactness=compactness, channel_axis=-1, **kw)
  elif image.shape[-1] == 1:
    seg = segmentation.slic(image[..., 0], compactness=compactness / 100, channel_axis=None, **kw)
  else:
    seg = segmentation.slic(
      image, compactness=compactness / 100, channel_axis=-1, convert2lab=False, **kw
    )
  return seg.astype(np.int32)


# ----------------------------------------------------------------------------- device side


def weight_cap(epoch: Array, *, max_distance: float, cap_every: float) -> Array:
  """The epoch's upper clip of W, `max(D + 1 − ⌊e / s⌋, 1)` (GSD-Net Eq. 9); float32 scalar."""
  decay = jnp.floor(jnp.asarray(epoch, jnp.float32) / cap_every)
  return jnp.maximum(max_distance + 1.0 - decay, 1.0)


def distance_weight(edt_fg: Array, edt_bg: Array, cap: Array, *, truncate: bool = False) -> Array:
  """The geometric distance-aware weight `W = clip(d_fg + d_bg, 1, cap)` (GSD-Net Eq. 9).

  Args:
    edt_fg, edt_bg: (B,H,W) clipped distance maps (`distance_maps`).
    cap: the epoch's clip (`weight_cap`), scalar.
    truncate: first round the distance down to an integer, as the released code's `.long()`.

  Returns:
    (B,H,W) float32 weights in [1, cap]: 1 at the label boundary, growing with the distance
    from it; no gradient.
  """
  d = edt_fg + edt_bg
  if truncate:
    d = jnp.floor(d)
  return jax.lax.stop_gradient(jnp.clip(d, 1.0, cap))


def superpixel_pseudo_label(prob_fg: Array, segments: Array, *, threshold: float = 0.5) -> Array:
  """Superpixel-mean foreground probability thresholded (GSD-Net Eq. 12, GSD-Net Eq. 13).

  Args:
    prob_fg: (B,H,W) foreground probabilities.
    segments: (B,H,W) int superpixel ids in [0, H·W) (ids are per image).
    threshold: a superpixel whose mean is >= threshold is foreground.

  Returns:
    (B,H,W) int32 pseudo-labels in {0, 1}, constant on each superpixel; no gradient.
  """
  n = prob_fg.shape[1] * prob_fg.shape[2]

  def one(p, s):
    p, s = p.reshape(-1), jnp.clip(s.reshape(-1), 0, n - 1)
    total = jax.ops.segment_sum(p, s, num_segments=n)
    count = jax.ops.segment_sum(jnp.ones_like(p), s, num_segments=n)
    mean = total[s] / count[s]  # count[s] >= 1: pixel s is in its own segment
    return mean.reshape(prob_fg.shape[1:])

  mean = jax.vmap(one)(jax.lax.stop_gradient(prob_fg), segments)
  return (mean >= threshold).astype(jnp.int32)


def transfer_mask(labels: Array, *, share_threshold: float = 0.5) -> Array:
  """Which pixels an image keeps in knowledge transfer (the masks of GSD-Net Eq. 15).

  An image whose foreground covers more than `share_threshold` of it keeps its background and
  takes the partner's pixels where it is foreground; otherwise it keeps its foreground.

  Args:
    labels: (B,H,W) {0, 1} labels (the refined labels).

  Returns:
    (B,H,W) float32, 1 on kept pixels.
  """
  fg = (labels > 0).astype(jnp.float32)
  share = jnp.mean(fg, axis=(1, 2), keepdims=True)
  return jnp.where(share > share_threshold, 1.0 - fg, fg)


def knowledge_transfer(keep: Array, partner: Array, *maps: Array) -> tuple[Array, ...]:
  """`keep·a + (1 − keep)·a[partner]` for each map a (GSD-Net Eq. 15).

  Args:
    keep: (B,H,W) float mask from `transfer_mask`.
    partner: (B,) int index of each image's partner in the batch.
    *maps: arrays (B,H,W) or (B,H,W,C): images, labels, weights; mixed alike.

  Returns:
    The mixed maps, each of its input's shape and dtype.
  """
  out = []
  for a in maps:
    k = keep.reshape(keep.shape + (1,) * (a.ndim - keep.ndim))
    out.append((k * a + (1.0 - k) * a[partner]).astype(a.dtype))
  return tuple(out)


def color_jitter(images: Array, rng: Array, *, strength: float) -> Array:
  """The second view: per-image random brightness, contrast (and RGB saturation), (B,H,W,C).

  torchvision's `ColorJitter(0.8s, 0.8s, 0.8s)` made independent of the intensity scale:
  brightness scales towards the image's darkest value (black for photographs in [0, 1]),
  contrast towards its mean grey level, saturation towards each pixel's grey level, each factor
  ~ U(1 − 0.8s, 1 + 0.8s); the result is clipped to the image's own range.
  """
  amount = 0.8 * strength
  if not 0.0 <= amount < 1.0:
    raise ValueError(f"jitter strength must be in [0, 1.25), got {strength}")
  b, c = images.shape[0], images.shape[-1]
  kb, kc, ks = jax.random.split(rng, 3)
  factor = lambda k: jax.random.uniform(k, (b, 1, 1, 1), minval=1 - amount, maxval=1 + amount)
  grey = lambda x: (x @ jnp.asarray(_LUMA))[..., None] if c == 3 else jnp.mean(x, -1, keepdims=True)
  lo = jnp.min(images, axis=(1, 2, 3), keepdims=True)
  hi = jnp.max(images, axis=(1, 2, 3), keepdims=True)
  x = lo + factor(kb) * (images - lo)
  m = jnp.mean(grey(x), axis=(1, 2, 3), keepdims=True)
  x = m + factor(kc) * (x - m)
  if c == 3:
    g = grey(x)
    x = g + factor(ks) * (x - g)
  return jnp.clip(x, lo, hi)


def selection_pixel_loss(logits1: Array, logits2: Array, labels: Array, *, co_lambda: float):
  """`CE1 + CE2 + λ·(KL(p1‖p2) + KL(p2‖p1))` per pixel, (B,H,W): the two networks' supervised
  loss (GSD-Net Eq. 2) plus λ times their disagreement (GSD-Net Eq. 4), what small-loss
  selection ranks (GSD-Net Eq. 5).

  Args:
    logits1, logits2: (B,H,W,L) of network 1 (image) and network 2 (jittered image).
    labels: (B,H,W) noisy labels.
    co_lambda: λ, each KL direction's weight.
  """
  ce = losses.ce_map(logits1, labels) + losses.ce_map(logits2, labels)
  return ce + co_lambda * two_network.symmetric_kl_map(logits1, logits2)


def class_dice_loss(probs: Array, labels: Array, *, smooth: float = 1.0) -> Array:
  """Soft Dice loss averaged over the classes, background included (GSD-Net Eq. 16).

  Per image and class c: `1 − (2 Σ p_c·t_c + smooth) / (Σ p_c + Σ t_c + smooth)`, then the mean
  over classes (the released code's `SoftDiceLoss(do_bg=True)`).

  Args:
    probs: (B,H,W,L) class probabilities.
    labels: (B,H,W) ints in [0, L).

  Returns:
    (B,) losses.
  """
  t = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
  inter = jnp.sum(probs * t, axis=(1, 2))
  denom = jnp.sum(probs, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))
  return 1.0 - jnp.mean((2.0 * inter + smooth) / (denom + smooth), axis=-1)


def transfer_losses(
  logits1: Array, logits2: Array, labels: Array, weights: Array, *, official_bugs: bool = False
) -> dict[str, Array]:
  """The losses on the mixed images (GSD-Net Eq. 17, GSD-Net Eq. 18).

  Per network i: `0.5·mean(CE_i·W) + 0.5·mean(W)·Dice_i` (the code scales the Dice term by the
  batch's mean weight, keeping its balance with the W-weighted CE); and the consistency
  `0.5·mean(W·(KL(p1‖p2) + KL(p2‖p1)))`.

  Args:
    logits1, logits2: (B,H,W,L) of both networks on their mixed views.
    labels: (B,H,W) mixed refined labels.
    weights: (B,H,W) mixed W.
    official_bugs: CE of the softmax outputs, `-log softmax(softmax(z))[y]`, as the released
      code (bounded in [log(1 + 1/e), log(1 + e)] for two classes: a weak, flat signal).

  Returns:
    {"ce_1", "ce_2", "dice_1", "dice_2", "consistency"}: scalars whose sum is the loss.
  """
  out = {}
  w_mean = jnp.mean(weights)
  for i, logits in ((1, logits1), (2, logits2)):
    probs = jax.nn.softmax(logits, axis=-1)
    ce = losses.ce_map(probs if official_bugs else logits, labels)
    out[f"ce_{i}"] = 0.5 * jnp.mean(ce * weights)
    out[f"dice_{i}"] = 0.5 * w_mean * jnp.mean(class_dice_loss(probs, labels))
  sym = two_network.symmetric_kl_map(logits1, logits2)
  out["consistency"] = 0.5 * jnp.mean(sym * weights)
  return out


# ----------------------------------------------------------------------------- the method


def scaled_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings a run of `config` uses: the epoch counts scaled by num_epochs /
  reference_epochs (with scale_schedule), SLIC's n_segments by the image area (with
  scale_slic_with_size). At 100 epochs and 256 px they are the paper's: 20, 30, 10, 1024.

  Returns:
    {"num_gradual": int >= 1, "sglr_start": int, "cap_every": float > 0, "slic_segments": int}.
  """
  g = config.gsdnet
  scale = config.train.num_epochs / g.reference_epochs if g.scale_schedule else 1.0
  area = (config.data.size / g.slic_reference_size) ** 2 if g.scale_slic_with_size else 1.0
  return {
    "num_gradual": max(round(g.num_gradual * scale), 1),
    "sglr_start": round(g.sglr_start * scale),
    "cap_every": max(g.cap_every * scale, 1e-6),
    "slic_segments": max(round(g.slic_segments * area), 1),
  }


class GSDNet(two_network.TwoNetworkMethod):
  """GSD-Net (module docstring). Phases: "select" before the SGLR start epoch, then "refine"."""

  name = "gsdnet"

  config_sections = {**two_network.TwoNetworkMethod.config_sections, "gsdnet": default_config}
  config_rules = two_network.TwoNetworkMethod.config_rules + RULES

  def __init__(self, config, *, steps_per_epoch):
    super().__init__(config, steps_per_epoch=steps_per_epoch)
    if config.data.num_classes != 2:
      raise ConfigError(f"gsdnet is binary; config.data.num_classes={config.data.num_classes}")
    if config.train.batch_size < 2:
      raise ConfigError("gsdnet's knowledge transfer needs config.train.batch_size >= 2")
    scaled = scaled_settings(config)
    self._num_gradual = scaled["num_gradual"]
    self.sglr_start = scaled["sglr_start"]
    self.cap_every = scaled["cap_every"]
    self.slic_segments = scaled["slic_segments"]
    self.example_transform = self.add_maps

  @property
  def num_gradual(self):
    return self._num_gradual  # GSD-Net's T_k (20 of 100 epochs, scaled), not config.coteach's

  # --- host side

  def add_maps(self, example: dict[str, Any]) -> dict[str, Any]:
    """A pipeline transform: the example with "edt_fg", "edt_bg" and (unless official_bugs,
    whose code never reads it) "superpixels", all (H,W), from the augmented noisy label and
    image."""
    g = self.config.gsdnet
    d_fg, d_bg = distance_maps(example["noisy_label"], max_distance=g.max_distance)
    out = {**example, DISTANCE_KEYS[0]: d_fg, DISTANCE_KEYS[1]: d_bg}
    if not g.official_bugs:
      out[SUPERPIXEL_KEY] = superpixels(
        example["image"],
        n_segments=self.slic_segments,
        compactness=g.slic_compactness,
        sigma=g.slic_sigma,
      )
    return out

  # --- schedule

  def phase(self, epoch):
    return "refine" if epoch >= self.sglr_start else "select"

  def weight_map(self, state, batch) -> tuple[Array, Array]:
    """`(W (B,H,W), cap)` of the batch at the state's epoch (GSD-Net Eq. 9)."""
    g = self.config.gsdnet
    cap = weight_cap(self.epoch(state), max_distance=g.max_distance, cap_every=self.cap_every)
    w = distance_weight(batch["edt_fg"], batch["edt_bg"], cap, truncate=g.official_bugs)
    return w, cap

  def segments(self, batch) -> Array:
    """The superpixel map (B,H,W) SGLR averages over; the integer distance map with
    official_bugs (the released code's overwritten SLIC map)."""
    if self.config.gsdnet.official_bugs:
      return jnp.floor(batch["edt_fg"] + batch["edt_bg"]).astype(jnp.int32)
    return batch[SUPERPIXEL_KEY]

  # --- the objective

  def objective(self, params, state, batch, rng, *, refine: bool):
    """The step's loss of `params` (a pair) and its auxiliaries.

    Args:
      params: (network 1, network 2) parameters, differentiated.
      state: the train state (epoch, batch statistics).
      batch: "image" (B,H,W,C), "noisy_label" (B,H,W), "edt_fg"/"edt_bg" (B,H,W) and
        "superpixels" (B,H,W) (not read with official_bugs).
      rng: the step's key (second view, α, partner shift).
      refine: add SGLR, knowledge transfer and the mixed-image losses.

    Returns:
      `(loss, ((stats_1, stats_2), aux))` with aux a dict of scalars.
    """
    g = self.config.gsdnet
    x, y = batch["image"], batch["noisy_label"]
    rng_view, rng_alpha, rng_partner = jax.random.split(rng, 3)
    x2 = color_jitter(x, rng_view, strength=g.jitter_strength)
    w, cap = self.weight_map(state, batch)
    keep = self.keep_share(state)

    (l1, _), s1 = self.forward(params[0], state.batch_stats[0], x)
    (l2, _), s2 = self.forward(params[1], state.batch_stats[1], x2)
    pixel = selection_pixel_loss(l1, l2, y, co_lambda=g.co_lambda)
    pick = two_network.small_loss_mask(pixel, keep)
    loss_select = two_network.masked_mean(pixel * w, pick)  # GSD-Net Eq. 10
    aux = {
      "loss_select": loss_select,
      "keep_share": jnp.mean(pick),
      "w_mean": jnp.mean(w),
      "w_cap": cap,
      "sym_kl": jnp.mean(two_network.symmetric_kl_map(l1, l2)),
      "disagree_share": jnp.mean(jnp.argmax(l1, -1) != jnp.argmax(l2, -1)),
    }
    if not refine:
      return loss_select, ((s1, s2), aux)

    # SGLR (GSD-Net Eq. 11): a random mix keeps the two networks' pseudo-labels diverse.
    alpha = jax.random.uniform(rng_alpha)
    prob = alpha * jax.nn.softmax(l1, -1) + (1.0 - alpha) * jax.nn.softmax(l2, -1)
    pseudo = superpixel_pseudo_label(
      prob[..., 1], self.segments(batch), threshold=g.pseudo_threshold
    )
    # GSD-Net Eq. 14: selected pixels are trusted as labelled; refinement only fills the rest.
    refined = jnp.where(pick > 0, y, pseudo)
    # A roll by a random non-zero shift pairs every image with another one of the batch.
    b = x.shape[0]
    partner = (jnp.arange(b) + jax.random.randint(rng_partner, (), 1, b)) % b
    mask = transfer_mask(refined, share_threshold=g.kt_share_threshold)
    xm1, xm2, ym, wm = knowledge_transfer(mask, partner, x, x2, refined, w)
    (m1, _), s1 = self.forward(params[0], s1, xm1)
    (m2, _), s2 = self.forward(params[1], s2, xm2)
    terms = transfer_losses(m1, m2, ym, wm, official_bugs=g.official_bugs)
    aux.update({f"loss_{k}": v for k, v in terms.items()})
    aux.update(
      alpha=alpha,
      relabel_share=jnp.mean(refined != y),
      pseudo_fg_share=jnp.mean(pseudo),
      transfer_keep_share=jnp.mean(mask),
    )
    return loss_select + sum(terms.values()), ((s1, s2), aux)

  def train_step(self, phase):
    refine = phase == "refine"

    def step(state, batch, rng):
      loss_fn = lambda p: self.objective(p, state, batch, rng, refine=refine)
      (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      new_state = self.update_pair(state, grads, stats)
      return new_state, {**self.pair_measurements(loss, grads, new_state.params), **aux}

    return step

  def diagnostics(self, state, batch):
    """The refine objective's scalars on the batch (with the step's own random draws), at any
    epoch, and `sglr_active` (1 once the refine phase has begun): keep share, W's mean and cap,
    the share of pixels SGLR relabels, the networks' disagreement and symmetric KL, the loss
    terms."""
    rng = jax.random.fold_in(state.rng, state.step)
    loss, (_, aux) = self.objective(state.params, state, batch, rng, refine=True)
    active = (self.epoch(state) >= self.sglr_start).astype(jnp.float32)
    return {**aux, "loss_refine": loss, "sglr_active": active}
