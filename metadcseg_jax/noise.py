"""Label-noise injection: L2B/MetaDCSeg corruption levels and GSD-Net's noise.

Host-side numpy code, run once per dataset (never inside `jit`). Three families:

* L2B levels "l2b20", "l2b40", "l2b60" (MetaDCSeg App. A.2, Eqs. 15-19, and
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
  MetaDCSeg App. A.2 (Eqs. 15-20); Zhou et al., "L2B: Learning to Bootstrap
  Robust Models for Combating Label Noise", CVPR 2024 (public code); Wang et al.,
  "GSD-Net" §4.3 and its `scripts/generate_simulated_noise.py`.
"""

import datetime
import hashlib
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np
from scipy import ndimage

# Bump when any change alters the masks produced for a given (seed, options).
NOISE_VERSION = "noise-v1"

KINDS = ("l2b20", "l2b40", "l2b60", "markov_sr", "markov_se", "dist")

# L2B's size rule: masks with more foreground pixels than this are corrupted;
# the rest become empty (or stay clean with small_mask="keep").
SMALL_MASK_PIXELS = 300
# Image side the L2B kernels are taken to be tuned for when
# scale_kernels_with_size=True (PROMISE12 / Kvasir crops are 144-320 px).
REFERENCE_SIZE = 256

# (kernel sizes, cumulative thresholds): SPEC §5; MetaDCSeg Table 9 swaps the
# first two columns; L2B's code names them by Dice: "08", "06", "04" levels.
L2B_LEVELS = {
    "l2b20": ((7, 11, 13, 17, 21), (0.4, 0.6, 0.8, 0.9, 1.0)),
    "l2b40": ((7, 14, 21, 28, 35), (0.1, 0.2, 0.5, 0.7, 1.0)),
    "l2b60": ((7, 14, 21, 49, 63), (0.05, 0.1, 0.2, 0.6, 1.0)),
}
# (T, θ1, θ2) of M(T, θ1, θ2) (GSD-Net Table 3, 2D datasets).
MARKOV_SETTINGS = {
    "markov_sr": (200, 0.2, 0.05),
    "markov_se": (200, 0.8, 0.05),
}
DIST_RADIUS_RANGE = (9, 11)

_DEFAULTS = {
    **{k: {"small_mask": "empty", "scale_kernels_with_size": False,
           "reference_size": REFERENCE_SIZE} for k in L2B_LEVELS},
    **{k: {"steps": t, "theta1": a, "theta2": b}
       for k, (t, a, b) in MARKOV_SETTINGS.items()},
    "dist": {"radius_range": DIST_RADIUS_RANGE, "mode": "random"},
}

# Fixed-point (Q20) cos/sin of integer degrees 0..20. The exact products
# lie at least 0.006 units from a rounding tie, far beyond any libm error, so
# the tables are identical on every platform.
_ROT_BITS = 20
_COS_Q = tuple(round(math.cos(math.radians(a)) * (1 << _ROT_BITS))
               for a in range(21))
_SIN_Q = tuple(round(math.sin(math.radians(a)) * (1 << _ROT_BITS))
               for a in range(21))
# 5-tap Gaussian, σ 2, in Q16 (sums to 2**16): [9992, 14539, 16474, ...].
_BLUR_BITS = 16
_BLUR_Q = (9992, 14539, 16474, 14539, 9992)


def resolve_options(kind: str, options: Optional[Mapping[str, Any]] = None
                    ) -> dict[str, Any]:
  """Validates `options` for `kind` and fills in the defaults.

  Args:
    kind: one of `KINDS`.
    options: overrides. L2B kinds: `small_mask` ("empty" | "keep"),
      `scale_kernels_with_size` (bool), `reference_size` (int > 0). Markov
      kinds: `steps` (T), `theta1`, `theta2`. "dist": `radius_range`
      (lo, hi) integers, `mode` ("random" | "dilate" | "erode").

  Returns:
    A JSON-friendly dict with every option of `kind` (lists, not tuples).
  """
  if kind not in _DEFAULTS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  options = dict(options or {})
  unknown = sorted(set(options) - set(_DEFAULTS[kind]))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for kind {kind!r}; "
                     f"valid: {sorted(_DEFAULTS[kind])}")
  out = {**_DEFAULTS[kind], **options}
  if kind in L2B_LEVELS:
    if out["small_mask"] not in ("empty", "keep"):
      raise ValueError(
          f"small_mask must be 'empty' or 'keep', got {out['small_mask']!r}")
    out["scale_kernels_with_size"] = bool(out["scale_kernels_with_size"])
    if int(out["reference_size"]) <= 0:
      raise ValueError(f"reference_size must be > 0, got {out['reference_size']}")
    out["reference_size"] = int(out["reference_size"])
  elif kind in MARKOV_SETTINGS:
    out["steps"] = int(out["steps"])
    if out["steps"] < 0:
      raise ValueError(f"steps must be >= 0, got {out['steps']}")
    for name in ("theta1", "theta2"):
      out[name] = float(out[name])
      if not 0.0 <= out[name] <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {out[name]}")
  else:
    lo, hi = (int(v) for v in out["radius_range"])
    if not 1 <= lo <= hi:
      raise ValueError(
          f"radius_range must be integers 1 <= lo <= hi, got {out['radius_range']}")
    out["radius_range"] = [lo, hi]
    if out["mode"] not in ("random", "dilate", "erode"):
      raise ValueError(
          f"mode must be 'random', 'dilate' or 'erode', got {out['mode']!r}")
  return out


# ----------------------------------------------------------------------------
# Geometric primitives (deterministic, integer arithmetic).
# ----------------------------------------------------------------------------


def rotate_nearest(mask: np.ndarray, angle: int) -> np.ndarray:
  """Rotates a mask by an integer angle about the image centre (Eq. 15).

  Nearest-neighbour, no resize (PIL's `Image.rotate(angle)`, as in L2B):
  positive angles turn the content counter-clockwise as displayed (row 0 on
  top); pixels whose source falls outside the image are 0. The source position
  is computed in Q20 fixed point, rounding halves up, so the result is exact.

  Args:
    mask: (H, W) array.
    angle: integer degrees in [-20, 20].

  Returns:
    (H, W) array of `mask`'s dtype.
  """
  angle = int(angle)
  if not -20 <= angle <= 20:
    raise ValueError(f"angle must be an integer in [-20, 20], got {angle}")
  h, w = mask.shape
  c = _COS_Q[abs(angle)]
  s = _SIN_Q[abs(angle)] * (1 if angle >= 0 else -1)
  # Doubled offsets from the centre ((h-1)/2, (w-1)/2) keep everything integral.
  dr = (2 * np.arange(h, dtype=np.int64) - (h - 1))[:, None]
  dc = (2 * np.arange(w, dtype=np.int64) - (w - 1))[None, :]
  one = 1 << _ROT_BITS
  src_r = (dr * c + dc * s + h * one) // (2 * one)
  src_c = (dc * c - dr * s + w * one) // (2 * one)
  inside = (src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w)
  out = np.zeros_like(mask)
  out[inside] = mask[src_r[inside], src_c[inside]]
  return out


def bbox_ellipse(mask: np.ndarray) -> np.ndarray:
  """Filled ellipse inscribed in the mask's bounding box (Eq. 19).

  E(y)_hw = 1[(h - y_c)²/r_y² + (w - x_c)²/r_x² <= 1] with centre
  (x_c, y_c) = ((x_min + x_max)/2, (y_min + y_max)/2) and semi-axes
  r_x = (x_max - x_min)/2, r_y = (y_max - y_min)/2, exactly as the paper
  writes it (L2B's code truncates centre and semi-axes with `int()`). Tested in
  doubled integer coordinates: h2² R_x² + w2² R_y² <= R_x² R_y² with
  h2 = 2h - (y_min + y_max), R_y = y_max - y_min (likewise for w). A zero
  semi-axis gives the degenerate segment (the limit of the ellipse), which is
  why the result is also clipped to the bounding box.

  Args:
    mask: (H, W) array; non-zero is foreground.

  Returns:
    (H, W) bool; all False for an empty mask.
  """
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  out = np.zeros(mask.shape, bool)
  if rows.size == 0:
    return out
  y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
  ry, rx = y1 - y0, x1 - x0
  h2 = 2 * np.arange(y0, y1 + 1, dtype=np.int64)[:, None] - (y0 + y1)
  w2 = 2 * np.arange(x0, x1 + 1, dtype=np.int64)[None, :] - (x0 + x1)
  out[y0:y1 + 1, x0:x1 + 1] = h2**2 * rx**2 + w2**2 * ry**2 <= rx**2 * ry**2
  return out


def l2b_kernel_sizes(kind: str, shape: Sequence[int], *,
                     scale_kernels_with_size: bool = False,
                     reference_size: int = REFERENCE_SIZE
                     ) -> tuple[tuple[int, ...], float]:
  """Kernel sizes and small-mask threshold of an L2B level for an image shape.

  Without scaling: the SPEC §5 kernels and 300 pixels. With scaling, s =
  min(H, W) / reference_size; each kernel k becomes the nearest odd integer to
  k·s (halves up), at least 1: k' = max(1, 2·floor(k·s/2) + 1); the threshold
  becomes 300·s². Odd kernels keep erosion/dilation centred (L2B's 14 and 28
  shift the mask by half a pixel, as cv2 does). At s = 1 the even 14 and 28
  become 15 and 29; the rest are unchanged.

  Returns:
    (kernel sizes, small-mask threshold in pixels).
  """
  kernels, _ = L2B_LEVELS[kind]
  if not scale_kernels_with_size:
    return kernels, float(SMALL_MASK_PIXELS)
  s = min(shape[-2:]) / reference_size
  scaled = tuple(max(1, 2 * math.floor(k * s / 2) + 1) for k in kernels)
  return scaled, SMALL_MASK_PIXELS * s * s


def select_kernel(u: float, thresholds: Sequence[float]) -> int:
  """Index of the first cumulative threshold above `u` (L2B's if/elif chain)."""
  return min(int(np.searchsorted(thresholds, u, side="right")),
             len(thresholds) - 1)


def _morph(mask: np.ndarray, k: int, erode: bool) -> np.ndarray:
  # cv2.erode/dilate with np.ones((k, k)): window [i - k//2, i - k//2 + k - 1]
  # (scipy's and cv2's anchor agree, even k included); cv2's default border
  # leaves erosion unaffected by the image edge, hence cval=1 there.
  m = mask.astype(np.uint8)
  if erode:
    return ndimage.minimum_filter(m, size=k, mode="constant", cval=1) > 0
  return ndimage.maximum_filter(m, size=k, mode="constant", cval=0) > 0


def _l2b(fg: np.ndarray, rng: np.random.Generator, kind: str,
         opts: Mapping[str, Any]) -> np.ndarray:
  """L2B corruption of a binary mask (Eqs. 15-19). See `corrupt_mask`."""
  kernels, small = l2b_kernel_sizes(
      kind, fg.shape, scale_kernels_with_size=opts["scale_kernels_with_size"],
      reference_size=opts["reference_size"])
  n = int(fg.sum())
  if n <= small:
    return fg if opts["small_mask"] == "keep" and n else np.zeros_like(fg)
  angle = int(rng.integers(-20, 21))
  r_c, r_p, r_e = rng.random(3)
  y = rotate_nearest(fg, angle)
  y = _morph(y, kernels[select_kernel(r_p, L2B_LEVELS[kind][1])],
             erode=r_c < 0.5)
  if r_e < 0.5 and y.sum() > small:
    y = bbox_ellipse(y)
  return y


# ----------------------------------------------------------------------------
# GSD-Net noise.
# ----------------------------------------------------------------------------


def _any4(x: np.ndarray) -> np.ndarray:
  """True where a 4-neighbour inside the image is True."""
  p = np.pad(x, 1)
  return p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def blur_threshold(fg: np.ndarray) -> np.ndarray:
  """5x5 Gaussian blur (σ 2) then `> 0.5`, in exact integer arithmetic.

  Matches `cv2.GaussianBlur(m, (5, 5), 2, 2)` (separable, reflect-101 border)
  up to the Q16 weights and cv2's uint8 rounding before the threshold.
  """
  q = np.asarray(_BLUR_Q, np.int64)
  p = np.pad(fg.astype(np.int64), 2, mode="reflect")
  h, w = fg.shape
  rows = sum(q[i] * p[:, i:i + w] for i in range(5))
  full = sum(q[i] * rows[i:i + h, :] for i in range(5))
  return full > (1 << (2 * _BLUR_BITS - 1))


def markov_boundary_noise(fg: np.ndarray, rng: np.random.Generator, *,
                          steps: int, theta1: float, theta2: float
                          ) -> np.ndarray:
  """GSD-Net's Markov boundary noise M(T, θ1, θ2) on a binary mask.

  Draws `p = rng.random(T)` first; then at step t, if p[t] < θ1 the step is an
  expansion over the outer boundary (background pixels with a 4-adjacent
  foreground pixel), else an erosion over the inner boundary (foreground pixels
  with a 4-adjacent background pixel inside the image: the image edge is not
  background, as with `distance_transform_edt(m) == 1`); `u = rng.random(n)` is
  drawn for the n boundary pixels in row-major order and those with u < θ2 flip.
  Finally `blur_threshold`. This is the official script's order of draws (with
  a Generator in place of the legacy global state).

  Args:
    fg: (H, W) bool.
    rng: generator.
    steps: T.
    theta1: probability that a step expands.
    theta2: flip probability of each boundary pixel.

  Returns:
    (H, W) bool.
  """
  y = fg.copy()
  p = rng.random(steps)
  for t in range(steps):
    grow = p[t] < theta1
    edge = (~y & _any4(y)) if grow else (y & _any4(~y))
    idx = np.flatnonzero(edge)
    flip = idx[rng.random(idx.size) < theta2]
    y.flat[flip] = grow
  return blur_threshold(y)


def distance_noise(fg: np.ndarray, rng: np.random.Generator, *,
                   radius_range: Sequence[int] = DIST_RADIUS_RANGE,
                   mode: str = "random") -> np.ndarray:
  """GSD-Net's distance-transform dilation / erosion with radius n.

  Draw order: `u = rng.random()` (dilate if u > 0.5, as in the official
  script; drawn even when `mode` fixes the choice, so the radius stream does
  not depend on `mode`), then `n = rng.integers(lo, hi + 1)`. Dilation: pixels
  at Euclidean distance < n from the foreground join it; erosion: foreground
  pixels at distance < n from the background (inside the image) leave it. The
  official script draws a continuous n ~ U(9, 11); SPEC §5 says U{9..11}.

  Args:
    fg: (H, W) bool.
    rng: generator.
    radius_range: (lo, hi) inclusive integer range of n.
    mode: "random" (p 0.5 each), "dilate" or "erode".

  Returns:
    (H, W) bool.
  """
  dilate = rng.random() > 0.5
  n = int(rng.integers(radius_range[0], radius_range[1] + 1))
  if mode != "random":
    dilate = mode == "dilate"
  if dilate:
    if not fg.any():
      return fg.copy()
    # sqrt is correctly rounded, so d < n is exact for integer squared d.
    return ndimage.distance_transform_edt(~fg) < n
  if fg.all():
    return fg.copy()
  return ~(ndimage.distance_transform_edt(fg) < n) & fg


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------


def _check_label_array(x: Any, name: str, ndim: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
  if x.dtype != bool and not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{name} must be an integer or bool label array, "
                     f"got dtype {x.dtype}")
  if x.size and (x.min() < 0 or x.max() > 255):
    raise ValueError(f"{name} values must lie in [0, 255], "
                     f"got [{x.min()}, {x.max()}]")
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


def corrupt_mask(mask: np.ndarray, *, kind: str, rng: np.random.Generator,
                 **options: Any) -> np.ndarray:
  """Corrupts one label map.

  L2B kinds (Eqs. 15-19), on the binary foreground F = mask > 0 with
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
  mask = _check_label_array(mask, "mask", 2)
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng)}")
  opts = resolve_options(kind, options)
  fg = mask > 0
  if kind in L2B_LEVELS:
    noisy = _l2b(fg, rng, kind, opts)
  elif kind in MARKOV_SETTINGS:
    noisy = markov_boundary_noise(fg, rng, **opts)
  else:
    noisy = distance_noise(fg, rng, **opts)
  return _restore_classes(mask, noisy)


def mask_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of mask `index`: PCG64(SeedSequence(seed, spawn_key=(index,)))."""
  return np.random.Generator(np.random.PCG64(
      np.random.SeedSequence(int(seed), spawn_key=(int(index),))))


def corrupt_masks(masks: np.ndarray, *, kind: str, seed: int,
                  indices: Optional[Sequence[int]] = None,
                  **options: Any) -> np.ndarray:
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
  masks = _check_label_array(masks, "masks", 3)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  idx = np.arange(len(masks)) if indices is None else np.asarray(indices)
  if idx.shape != (len(masks),) or (idx.size and (
      not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0)):
    raise ValueError(f"indices must be {len(masks)} non-negative integers, "
                     f"got shape {idx.shape} dtype {idx.dtype}")
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
    raise ValueError(f"clean and noisy must share a (..., H, W) shape, "
                     f"got {clean.shape} and {noisy.shape}")
  inter = (clean & noisy).sum(axis=(-2, -1))
  total = clean.sum(axis=(-2, -1)) + noisy.sum(axis=(-2, -1))
  dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
  return 1.0 - dice


# ----------------------------------------------------------------------------
# Cache.
# ----------------------------------------------------------------------------


def _sha256(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _atomic_write(path: pathlib.Path, write_fn) -> None:
  """Writes via a temp file in the same folder and `os.replace`."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _read_manifest(path: pathlib.Path) -> dict[str, Any]:
  if not path.exists():
    return {}
  try:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable noise manifest %s: %s", path, e)
    return {}


def _cache_mismatch(entry: Any, want: Mapping[str, Any]) -> Optional[str]:
  if not isinstance(entry, dict):
    return "no manifest entry"
  for key, value in want.items():
    if entry.get(key) != value:
      return f"{key} differs (cached {entry.get(key)!r}, wanted {value!r})"
  return None


def cached_noisy_labels(labels: np.ndarray, *, cache_dir: str | os.PathLike,
                        dataset_key: str, kind: str, seed: int,
                        options: Optional[Mapping[str, Any]] = None
                        ) -> np.ndarray:
  """Noisy labels from `cache_dir`, built with `corrupt_masks` when stale.

  Files: `noisy_{kind}_seed{seed}.npy` and `manifest.json`, a dict keyed by
  the .npy name whose entries hold the parameters (kind, seed, resolved
  options, `NOISE_VERSION`, dataset_key, N, shape, sha256 of the clean labels),
  the sha256 of the noisy array, the measured corruption (Eq. 20)
  mean/std/min/max and the creation time (UTC). The cache is reused only when
  every parameter matches and the file's hash agrees; otherwise it is rebuilt
  and the reason logged. Both files are written to a temp file and renamed, so
  a crash leaves either the old cache or none. Concurrent writers of different
  kinds can at worst drop each other's manifest entry, which costs a rebuild.

  Args:
    labels: (N, H, W) uint8 (or any integer/bool) clean labels; mask i uses
      dataset index i.
    cache_dir: folder (created if missing).
    dataset_key: names the dataset and split, e.g. "kvasir/train@256".
    kind: one of `KINDS`.
    seed: non-negative integer.
    options: see `resolve_options`.

  Returns:
    (N, H, W) uint8 noisy labels.
  """
  labels = _check_label_array(labels, "labels", 3).astype(np.uint8)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  opts = resolve_options(kind, options)
  cache = pathlib.Path(cache_dir)
  cache.mkdir(parents=True, exist_ok=True)
  name = f"noisy_{kind}_seed{int(seed)}.npy"
  path, manifest_path = cache / name, cache / "manifest.json"
  want = json.loads(json.dumps({
      "noise_version": NOISE_VERSION, "dataset_key": str(dataset_key),
      "kind": kind, "seed": int(seed), "options": opts,
      "n": int(labels.shape[0]), "shape": list(labels.shape[1:]),
      "labels_sha256": _sha256(labels)}))
  entry = _read_manifest(manifest_path).get(name)
  reason = _cache_mismatch(entry, want)
  if reason is None:
    try:
      noisy = np.load(path, allow_pickle=False)
      if noisy.dtype != np.uint8 or noisy.shape != labels.shape:
        reason = f"{name} has dtype {noisy.dtype} shape {noisy.shape}"
      elif _sha256(noisy) != entry.get("noisy_sha256"):
        reason = f"{name} does not match its manifest hash"
      else:
        logging.info("Reusing cached noisy labels %s", path)
        return noisy
    except (OSError, ValueError) as e:
      reason = f"cannot read {name}: {e}"
  logging.info("Building noisy labels %s (%s)", path, reason)
  noisy = corrupt_masks(labels, kind=kind, seed=int(seed), **opts)
  rate = measured_corruption(labels, noisy)
  _atomic_write(path, lambda f: np.save(f, noisy, allow_pickle=False))
  entry = {**want, "noisy_sha256": _sha256(noisy),
           "corruption": {"mean": float(rate.mean()), "std": float(rate.std()),
                          "min": float(rate.min()), "max": float(rate.max())}
           if rate.size else None,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  manifest = _read_manifest(manifest_path)  # re-read: keep others' entries
  manifest[name] = entry
  _atomic_write(manifest_path, lambda f: f.write(
      json.dumps(manifest, indent=2, sort_keys=True).encode()))
  return noisy


def synthetic_blobs(n: int, size: int, *, seed: int = 0) -> np.ndarray:
  """Random blob masks for tests and calibration tables (not for training).

  Each mask is the union of 1-3 rotated ellipses with centres in the middle
  60% of the image and semi-axes of 12-30% of the side.

  Returns:
    (n, size, size) uint8 in {0, 1}.
  """
  from skimage import draw  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = np.zeros((n, size, size), np.uint8)
  for i in range(n):
    for _ in range(rng.integers(1, 4)):
      r, c = rng.uniform(0.3, 0.7, 2) * size
      a, b = rng.uniform(0.12, 0.3, 2) * size
      rr, cc = draw.ellipse(r, c, a, b, shape=(size, size),
                            rotation=rng.uniform(0, np.pi))
      out[i, rr, cc] = 1
  return out
