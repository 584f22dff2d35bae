"""Label-noise injection (MetaDCSeg App. A.2): L2B/MetaDCSeg levels and GSD-Net's noise, by name.

Host-side numpy code, run once per dataset (never inside `jit`). Three families:

* L2B levels "l2b20", "l2b40", "l2b60" (MetaDCSeg App. A.2, Eq. 15 to Eq. 19, and
  L2B's `L2B_segmentation/data_preprocess.py`): rotation, erosion or dilation
  with a square kernel drawn from cumulative thresholds, then with p 0.5 the
  filled ellipse of the bounding box.
* GSD-Net's Markov boundary noise M(T, θ1, θ2) (GSD-Net §4.3, after Yao et al.
  2023): "markov_sr" = M(200, 0.2, 0.05) shrinks, "markov_se" =
  M(200, 0.8, 0.05) expands.
* GSD-Net's distance-transform dilation / erosion, "dist", radius n ~ U{9..11}.

Reproducibility: `corrupt_masks` gives mask `i` its own generator
`np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed,
spawn_key=(index,))))` (the same stream as `SeedSequence(seed).spawn(...)
[index]`), so a mask's noise depends only on (seed, index, kind, options), not on
the other masks or their order. PCG64 and its `random()` / `integers()` draws are
platform independent; everything downstream of the draws is integer arithmetic
(fixed-point rotation, integer ellipse test, min/max filters, integer Gaussian
blur, exact squared distances), so the same seed gives the same masks on any
machine. Kinds share the stream: with one seed, "l2b20" and "l2b60" of a mask
use the same angle and the same three uniforms (common random numbers), which
makes the levels directly comparable.

Multi-class labels: corruption acts on the binary foreground `label > 0`. A
pixel that is foreground after corruption keeps its own class if it was
foreground before, and otherwise takes the class of the nearest clean foreground
pixel (Euclidean distance transform). Background stays 0; no class is invented.

References:
  MetaDCSeg App. A.2 (Eq. 15, Eq. 16, Eq. 17, Eq. 18, Eq. 19, Eq. 20); Zhou et al.,
  "L2B: Learning to Bootstrap
  Robust Models for Combating Label Noise", CVPR 2024 (public code); Wang et al.,
  "GSD-Net" §4.3 and its `scripts/generate_simulated_noise.py`.
"""

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from metadcseg_jax.data.noise import gsdnet
from metadcseg_jax.data.noise import l2b
from metadcseg_jax.errors import ConfigError

# Bump when any change alters the masks produced for a given (seed, options).
NOISE_VERSION = "noise-v1"

# Every noise kind, by name (config.data.noise.kind; "none" means clean labels).
KINDS = (*l2b.L2B_LEVELS, *gsdnet.MARKOV_SETTINGS, "dist")

_DEFAULTS = {
  **{
    k: {
      "small_mask": "empty",
      "scale_kernels_with_size": False,
      "reference_size": l2b.REFERENCE_SIZE,
      "kernel_scale": None,
      "strength": 1.0,
      "calibrate": False,
    }
    for k in l2b.L2B_LEVELS
  },
  **{k: {"steps": t, "theta1": a, "theta2": b} for k, (t, a, b) in gsdnet.MARKOV_SETTINGS.items()},
  "dist": {"radius_range": gsdnet.DIST_RADIUS_RANGE, "mode": "random"},
}


def resolve_options(kind: str, options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Validates `options` for `kind` and fills in the defaults.

  Args:
    kind: one of `KINDS`.
    options: overrides. L2B kinds: `small_mask` ("empty" | "keep"),
      `scale_kernels_with_size` (bool), `reference_size` (int > 0), `kernel_scale` (float > 0
      or None: scales the kernels, overriding `scale_kernels_with_size`), `strength` (in
      (0, 2]: scales the rotation range and the ellipse probability), `calibrate` (bool:
      choose `kernel_scale` and `strength` so the level's measured corruption is its nominal
      share, see `noise.calibrate`; applied by the cache). Markov
      kinds: `steps` (T), `theta1`, `theta2`. "dist": `radius_range`
      (lo, hi) integers, `mode` ("random" | "dilate" | "erode").

  Returns:
    A JSON-friendly dict with every option of `kind` (lists, not tuples).
  """
  if kind not in _DEFAULTS:
    raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
  options = dict(options or {})
  unknown = sorted(set(options) - set(_DEFAULTS[kind]))
  if unknown:
    raise ConfigError(
      f"unknown option(s) {unknown} for kind {kind!r}; valid: {sorted(_DEFAULTS[kind])}"
    )
  out = {**_DEFAULTS[kind], **options}
  if kind in l2b.L2B_LEVELS:
    if out["small_mask"] not in ("empty", "keep"):
      raise ConfigError(f"small_mask must be 'empty' or 'keep', got {out['small_mask']!r}")
    out["scale_kernels_with_size"] = bool(out["scale_kernels_with_size"])
    if int(out["reference_size"]) <= 0:
      raise ConfigError(f"reference_size must be > 0, got {out['reference_size']}")
    out["reference_size"] = int(out["reference_size"])
    if out["kernel_scale"] is not None:
      out["kernel_scale"] = float(out["kernel_scale"])
      if not out["kernel_scale"] > 0:
        raise ConfigError(f"kernel_scale must be > 0, got {out['kernel_scale']}")
    out["strength"] = float(out["strength"])
    if not 0.0 < out["strength"] <= l2b.MAX_STRENGTH:
      raise ConfigError(f"strength must be in (0, {l2b.MAX_STRENGTH}], got {out['strength']}")
    out["calibrate"] = bool(out["calibrate"])
  elif kind in gsdnet.MARKOV_SETTINGS:
    out["steps"] = int(out["steps"])
    if out["steps"] < 0:
      raise ConfigError(f"steps must be >= 0, got {out['steps']}")
    for name in ("theta1", "theta2"):
      out[name] = float(out[name])
      if not 0.0 <= out[name] <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {out[name]}")
  else:
    lo, hi = (int(v) for v in out["radius_range"])
    if not 1 <= lo <= hi:
      raise ConfigError(f"radius_range must be integers 1 <= lo <= hi, got {out['radius_range']}")
    out["radius_range"] = [lo, hi]
    if out["mode"] not in ("random", "dilate", "erode"):
      raise ConfigError(f"mode must be 'random', 'dilate' or 'erode', got {out['mode']!r}")
  return out


def check_seed(seed: Any) -> None:
  """Raises ConfigError unless `seed` is a non-negative integer (not a bool)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def check_label_array(x: Any, name: str, ndim: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
  if x.dtype != bool and not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{name} must be an integer or bool label array, got dtype {x.dtype}")
  if x.size and (x.min() < 0 or x.max() > 255):
    raise ValueError(f"{name} values must lie in [0, 255], got [{x.min()}, {x.max()}]")
  return x


def _restore_classes(labels: np.ndarray, noisy_fg: np.ndarray) -> np.ndarray:
  """New foreground takes the class of the nearest clean foreground pixel."""
  fg = labels > 0
  if not fg.any():
    return np.zeros(labels.shape, np.uint8)
  if labels.max() <= 1:
    return noisy_fg.astype(np.uint8)
  _, (ir, ic) = ndimage.distance_transform_edt(~fg, return_indices=True)
  return np.where(noisy_fg, labels[ir, ic], 0).astype(np.uint8)


def corrupt_mask(
  mask: np.ndarray, *, kind: str, rng: np.random.Generator, **options: Any
) -> np.ndarray:
  """Corrupts one label map.

  L2B kinds (Eq. 15, Eq. 16, Eq. 17, Eq. 18, Eq. 19), on the binary foreground F = mask > 0 with
  |F| pixels and small-mask threshold t (300, see `l2b_kernel_sizes`):
    - |F| == 0: stays empty; 1 <= |F| <= t: empty (small_mask="empty", L2B) or
      unchanged ("keep"). No draws are made in these cases.
    - otherwise, in this order: angle = rng.integers(-20, 21) (inclusive
      U[-20, 20]); r_c, r_p, r_e = rng.random(3). Rotate by `angle`
      (`rotate_nearest`); erode if r_c < 0.5 else dilate, with the square
      kernel kernels[j], j = the first cumulative threshold > r_p; then if
      r_e < 0.5 and more than t pixels remain, replace by `bbox_ellipse`.
  "markov_sr" / "markov_se": `markov_boundary_noise`; "dist":
  `distance_noise` (their docstrings give the draw order).

  Args:
    mask: (H, W) integer or bool labels in [0, 255]; 0 is background.
    kind: one of `KINDS`.
    rng: `np.random.Generator`; use `corrupt_masks` for per-index streams.
    **options: see `resolve_options`.

  Returns:
    (H, W) uint8 noisy labels (classes restored as in the module docstring).
  """
  mask = check_label_array(mask, "mask", 2)
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng)}")
  opts = resolve_options(kind, options)
  if opts.get("calibrate"):
    raise ConfigError(
      "calibrate=True is applied to a whole dataset by noise.cache.cached_noisy_labels (or "
      "noise.calibrate.calibrate); pass its kernel_scale to corrupt a single mask"
    )
  fg = mask > 0
  if kind in l2b.L2B_LEVELS:
    noisy = l2b.corrupt(fg, rng, kind, opts)
  elif kind in gsdnet.MARKOV_SETTINGS:
    noisy = gsdnet.markov_boundary_noise(fg, rng, **opts)
  else:
    noisy = gsdnet.distance_noise(fg, rng, **opts)
  return _restore_classes(mask, noisy)


def mask_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of mask `index`: PCG64(SeedSequence(seed, spawn_key=(index,)))."""
  return np.random.Generator(
    np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))
  )


def corrupt_masks(
  masks: np.ndarray,
  *,
  kind: str,
  seed: int,
  indices: Optional[Sequence[int]] = None,
  **options: Any,
) -> np.ndarray:
  """Corrupts a stack of label maps, mask i with generator `mask_rng(seed, indices[i])`.

  Args:
    masks: (N, H, W) integer or bool labels.
    kind: one of `KINDS`.
    seed: non-negative integer.
    indices: (N,) non-negative dataset indices (default `arange(N)`); the same
      index gives the same noise whatever else is in the batch.
    **options: see `resolve_options`.

  Returns:
    (N, H, W) uint8.
  """
  masks = check_label_array(masks, "masks", 3)
  check_seed(seed)
  idx = np.arange(len(masks)) if indices is None else np.asarray(indices)
  if idx.shape != (len(masks),) or (
    idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0)
  ):
    raise ValueError(
      f"indices must be {len(masks)} non-negative integers, got shape {idx.shape} dtype {idx.dtype}"
    )
  resolve_options(kind, options)  # fail before any work
  out = np.empty(masks.shape, np.uint8)
  for i, (m, j) in enumerate(zip(masks, idx)):
    out[i] = corrupt_mask(m, kind=kind, rng=mask_rng(seed, j), **options)
  return out


def measured_corruption(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
  """Corruption rate 1 - Dice(y, ỹ) of the foreground (Eq. 20), per mask.

  Dice = 2|y ∩ ỹ| / (|y| + |ỹ|) over pixels with label > 0; Dice(empty,
  empty) = 1, so two empty masks have corruption 0.

  Args:
    clean: (..., H, W) labels.
    noisy: same shape.

  Returns:
    (...) float64; (N,) for (N, H, W) inputs.
  """
  clean, noisy = np.asarray(clean) > 0, np.asarray(noisy) > 0
  if clean.shape != noisy.shape or clean.ndim < 2:
    raise ValueError(
      f"clean and noisy must share a (..., H, W) shape, got {clean.shape} and {noisy.shape}"
    )
  inter = (clean & noisy).sum(axis=(-2, -1))
  total = clean.sum(axis=(-2, -1)) + noisy.sum(axis=(-2, -1))
  dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
  return 1.0 - dice
