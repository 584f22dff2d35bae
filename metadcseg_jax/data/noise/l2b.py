"""L2B / MetaDCSeg label noise: rotation, erosion or dilation, the bounding-box ellipse.

MetaDCSeg App. A.2 (Eq. 15, Eq. 16, Eq. 17, Eq. 18, Eq. 19) and L2B's
`L2B_segmentation/data_preprocess.py`. Everything after the random draws is integer arithmetic
(fixed-point rotation, integer ellipse test, min/max filters), so a seed gives the same mask on
any machine. `corrupt` is called by `metadcseg_jax.data.noise.corrupt_mask`, which owns the draws'
generator and the multi-class handling.
"""

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

# L2B's size rule: masks with more foreground pixels than this are corrupted;
# the rest become empty (or stay clean with small_mask="keep").
SMALL_MASK_PIXELS = 300
# Image side the L2B kernels are taken to be tuned for when
# scale_kernels_with_size=True (PROMISE12 / Kvasir crops are 144-320 px).
REFERENCE_SIZE = 256

# (kernel sizes, cumulative thresholds): MetaDCSeg App. A.2; MetaDCSeg Table 9 swaps the
# first two columns; L2B's code names them by Dice: "08", "06", "04" levels.
L2B_LEVELS = {
  "l2b20": ((7, 11, 13, 17, 21), (0.4, 0.6, 0.8, 0.9, 1.0)),
  "l2b40": ((7, 14, 21, 28, 35), (0.1, 0.2, 0.5, 0.7, 1.0)),
  "l2b60": ((7, 14, 21, 49, 63), (0.05, 0.1, 0.2, 0.6, 1.0)),
}

# L2B draws rotations in [-20, 20] degrees; `strength` (the calibration's second knob, at most
# MAX_STRENGTH) scales them, so rotations reach ±MAX_ANGLE.
L2B_ANGLE = 20
MAX_STRENGTH = 2.0
MAX_ANGLE = int(L2B_ANGLE * MAX_STRENGTH)

# Fixed-point (Q20) cos/sin of integer degrees 0..MAX_ANGLE. The exact products
# lie at least 0.006 units from a rounding tie, far beyond any libm error, so
# the tables are identical on every platform.
_ROT_BITS = 20
_COS_Q = tuple(round(math.cos(math.radians(a)) * (1 << _ROT_BITS)) for a in range(MAX_ANGLE + 1))
_SIN_Q = tuple(round(math.sin(math.radians(a)) * (1 << _ROT_BITS)) for a in range(MAX_ANGLE + 1))


def rotate_nearest(mask: np.ndarray, angle: int) -> np.ndarray:
  """Rotates a mask by an integer angle about the image centre (Eq. 15).

  Nearest-neighbour, no resize (PIL's `Image.rotate(angle)`, as in L2B):
  positive angles turn the content counter-clockwise as displayed (row 0 on
  top); pixels whose source falls outside the image are 0. The source position
  is computed in Q20 fixed point, rounding halves up, so the result is exact.

  Args:
    mask: (H, W) array.
    angle: integer degrees in [-MAX_ANGLE, MAX_ANGLE] (L2B draws [-20, 20]).

  Returns:
    (H, W) array of `mask`'s dtype.
  """
  angle = int(angle)
  if not -MAX_ANGLE <= angle <= MAX_ANGLE:
    raise ValueError(f"angle must be an integer in [-{MAX_ANGLE}, {MAX_ANGLE}], got {angle}")
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
  out[y0 : y1 + 1, x0 : x1 + 1] = h2**2 * rx**2 + w2**2 * ry**2 <= rx**2 * ry**2
  return out


def l2b_kernel_sizes(
  kind: str,
  shape: Sequence[int],
  *,
  scale_kernels_with_size: bool = False,
  reference_size: int = REFERENCE_SIZE,
  kernel_scale: float | None = None,
) -> tuple[tuple[int, ...], float]:
  """Kernel sizes and small-mask threshold of an L2B level for an image shape.

  Without scaling: the MetaDCSeg App. A.2 kernels and 300 pixels. With scaling by s
  (`kernel_scale` when given, e.g. from `noise.calibrate`, else min(H, W) / reference_size with
  `scale_kernels_with_size`), each kernel k becomes the nearest odd integer to
  k·s (halves up), at least 1: k' = max(1, 2·floor(k·s/2) + 1); the threshold
  becomes 300·s². Odd kernels keep erosion/dilation centred (L2B's 14 and 28
  shift the mask by half a pixel, as cv2 does). At s = 1 the even 14 and 28
  become 15 and 29; the rest are unchanged.

  Args:
    kind: the L2B level (`L2B_LEVELS`).
    shape: the mask's (H, W).
    scale_kernels_with_size: scale by min(H, W) / `reference_size`.
    reference_size: the image size the published kernels suit.
    kernel_scale: the scale s itself (calibrated), overriding the size's.

  Returns:
    (kernel sizes, small-mask threshold in pixels).
  """
  kernels, _ = L2B_LEVELS[kind]
  if kernel_scale is not None:
    s = float(kernel_scale)
  elif scale_kernels_with_size:
    s = min(shape[-2:]) / reference_size
  else:
    return kernels, float(SMALL_MASK_PIXELS)
  scaled = tuple(max(1, 2 * math.floor(k * s / 2) + 1) for k in kernels)
  return scaled, SMALL_MASK_PIXELS * s * s


def select_kernel(u: float, thresholds: Sequence[float]) -> int:
  """Index of the first cumulative threshold above `u` (L2B's if/elif chain)."""
  return min(int(np.searchsorted(thresholds, u, side="right")), len(thresholds) - 1)


def _morph(mask: np.ndarray, k: int, erode: bool) -> np.ndarray:
  # cv2.erode/dilate with np.ones((k, k)): window [i - k//2, i - k//2 + k - 1]
  # (scipy's and cv2's anchor agree, even k included); cv2's default border
  # leaves erosion unaffected by the image edge, hence cval=1 there.
  m = mask.astype(np.uint8)
  if erode:
    return ndimage.minimum_filter(m, size=k, mode="constant", cval=1) > 0
  return ndimage.maximum_filter(m, size=k, mode="constant", cval=0) > 0


def corrupt(
  fg: np.ndarray, rng: np.random.Generator, kind: str, opts: Mapping[str, Any]
) -> np.ndarray:
  """L2B corruption of a binary (H, W) mask (Eq. 15, Eq. 16, Eq. 17, Eq. 18).

  See `metadcseg_jax.data.noise.corrupt_mask` for the draw order and `opts`. `opts["strength"]`
  (default 1) scales the rotation angle (rounded half away from zero) and the ellipse
  probability 0.5 of the paper: the calibration's second knob, applied to the same draws.

  Args:
    fg: (H, W) bool foreground.
    rng: the mask's random generator.
    kind: the L2B level.
    opts: the noise options (`noise.corrupt_mask`).
  """
  kernels, small = l2b_kernel_sizes(
    kind,
    fg.shape,
    scale_kernels_with_size=opts["scale_kernels_with_size"],
    reference_size=opts["reference_size"],
    kernel_scale=opts.get("kernel_scale"),
  )
  n = int(fg.sum())
  if n <= small:
    return fg if opts["small_mask"] == "keep" and n else np.zeros_like(fg)
  strength = float(opts.get("strength", 1.0))
  angle = int(rng.integers(-L2B_ANGLE, L2B_ANGLE + 1))
  r_c, r_p, r_e = rng.random(3)
  angle = int(np.sign(angle) * math.floor(abs(angle) * strength + 0.5))
  y = rotate_nearest(fg, angle)
  y = _morph(y, kernels[select_kernel(r_p, L2B_LEVELS[kind][1])], erode=r_c < 0.5)
  if r_e < 0.5 * strength and y.sum() > small:  # strength <= MAX_STRENGTH: at most 1
    y = bbox_ellipse(y)
  return y
