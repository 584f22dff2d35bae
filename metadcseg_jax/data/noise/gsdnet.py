"""GSD-Net's label noise: Markov boundary noise M(T, θ1, θ2) and distance-transform noise.

GSD-Net §4.3 (after Yao et al. 2023) and its `scripts/generate_simulated_noise.py`:
"markov_sr" = M(200, 0.2, 0.05) shrinks, "markov_se" = M(200, 0.8, 0.05) expands; "dist"
dilates or erodes by a radius n ~ U{9..11}. Exact integer arithmetic after the draws.
"""

from typing import Sequence

import numpy as np
from scipy import ndimage

# (T, θ1, θ2) of M(T, θ1, θ2) (GSD-Net Table 3, 2D datasets).
MARKOV_SETTINGS = {
  "markov_sr": (200, 0.2, 0.05),
  "markov_se": (200, 0.8, 0.05),
}
DIST_RADIUS_RANGE = (9, 11)

# 5-tap Gaussian, σ 2, in Q16 (sums to 2**16): [9992, 14539, 16474, ...].
_BLUR_BITS = 16
_BLUR_Q = (9992, 14539, 16474, 14539, 9992)


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
  rows = sum(q[i] * p[:, i : i + w] for i in range(5))
  full = sum(q[i] * rows[i : i + h, :] for i in range(5))
  return full > (1 << (2 * _BLUR_BITS - 1))


def markov_boundary_noise(
  fg: np.ndarray, rng: np.random.Generator, *, steps: int, theta1: float, theta2: float
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


def distance_noise(
  fg: np.ndarray,
  rng: np.random.Generator,
  *,
  radius_range: Sequence[int] = DIST_RADIUS_RANGE,
  mode: str = "random",
) -> np.ndarray:
  """GSD-Net's distance-transform dilation / erosion with radius n.

  Draw order: `u = rng.random()` (dilate if u > 0.5, as in the official
  script; drawn even when `mode` fixes the choice, so the radius stream does
  not depend on `mode`), then `n = rng.integers(lo, hi + 1)`. Dilation: pixels
  at Euclidean distance < n from the foreground join it; erosion: foreground
  pixels at distance < n from the background (inside the image) leave it. The
  official script draws a continuous n ~ U(9, 11); this project uses U{9..11}.

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
