"""Noise levels that mean what they say: L2B noise scaled per dataset to a nominal corruption.

MetaDCSeg App. A.2.3 calibrates "the kernel sizes and probability distributions for each noise
level" so that the 20/40/60% levels corrupt that share of the masks, measured as 1 - Dice
(Eq. 20, App. A.2.4). The published kernels only do so for the masks they were tuned on: the
same kernels corrupt a small object far more than a large one. `calibrate` finds, for a
dataset's training masks,

1. the factor s that scales every kernel of the level (`l2b.l2b_kernel_sizes(kernel_scale=s)`):
   the smallest s on a geometric grid over [1/32, 8], refined by bisection in log s, whose mean
   corruption reaches the nominal share;
2. then, because kernel sizes are integers (the corruption jumps between two of them) and
   rotation and ellipse alone corrupt small objects by more than 20%, the `strength` in
   (0, MAX_STRENGTH] that scales the rotation range and the ellipse probability (the paper's
   "probability distributions"), by bisection, to bring the corruption to the nominal share
   within `TOLERANCE`: below 1 at the scale just above the crossing, above 1 at the one below.

The search uses the seed the final corruption uses (common random numbers), so the corruption
is a deterministic and nearly monotone function of both knobs.
"""

import math
from typing import Any, Mapping

import numpy as np

from metadcseg_jax.data import noise

# The nominal corruption 1 - Dice of each L2B level (its name).
NOMINAL = {"l2b20": 0.20, "l2b40": 0.40, "l2b60": 0.60}
TOLERANCE = 0.03
SEARCH_MASKS = 256  # masks the search corrupts per trial (the final check uses all)
_GRID = tuple(2.0**e for e in np.linspace(-5, 3, 17))
_BISECTIONS = 8


def _corruption(masks, kind, seed, options, scale, indices) -> float:
  noisy = noise.corrupt_masks(
    masks, kind=kind, seed=seed, indices=indices, **{**options, "kernel_scale": scale}
  )
  return float(np.mean(noise.measured_corruption(masks, noisy)))


def calibrate(
  masks: np.ndarray,
  *,
  kind: str,
  seed: int,
  options: Mapping[str, Any] | None = None,
  tolerance: float = TOLERANCE,
) -> dict[str, Any]:
  """The kernel scale and strength that give L2B level `kind` its nominal corruption on `masks`.

  Args:
    masks: (N, H, W) clean label maps (the training masks; mask i is dataset index i).
    kind: "l2b20", "l2b40" or "l2b60".
    seed: the noise seed training will use.
    options: the other L2B options (`small_mask`, ...); `kernel_scale`, `strength` and
      `calibrate` are what this chooses.
    tolerance: how close the mean corruption must come to the nominal share.

  Returns:
    {"kernel_scale": s, "strength": u, "corruption": mean 1 - Dice over all masks, "target":
    nominal share, "within_tolerance": bool, "kernels": the scaled kernel sizes, "trials":
    [[s, u, corruption on the search subset], ...], "noisy": the (N, H, W) masks corrupted at
    the chosen setting (what the final corruption was measured on; every other entry is
    JSON-serialisable)}. When no setting reaches the tolerance (a
    level too weak for these masks even at scale 8), the closest is returned with
    within_tolerance False.
  """
  if kind not in NOMINAL:
    raise ValueError(f"only the L2B levels {tuple(NOMINAL)} are calibrated, got {kind!r}")
  masks = noise.check_label_array(masks, "masks", 3)
  target = NOMINAL[kind]
  drop = ("kernel_scale", "strength", "calibrate")
  opts = {k: v for k, v in (options or {}).items() if k not in drop}
  pick = np.sort(np.random.default_rng(seed).permutation(len(masks))[:SEARCH_MASKS])
  subset = masks[pick]
  trials: dict[tuple[float, float], float] = {}

  def trial(s: float, u: float = 1.0) -> float:
    if (s, u) not in trials:
      trials[s, u] = _corruption(subset, kind, seed, {**opts, "strength": u}, s, pick)
    return trials[s, u]

  reached = [s for s in _GRID if trial(s) >= target]
  if not reached:  # too weak even at the largest scale: the strongest setting is the closest
    return _result(
      masks, kind, seed, opts, _GRID[-1], noise.l2b.MAX_STRENGTH, trials, target, tolerance
    )
  s_hi = reached[0]
  s_lo = None if s_hi == _GRID[0] else _GRID[_GRID.index(s_hi) - 1]
  if s_lo is not None:  # the kernel scale where the corruption crosses the target
    for _ in range(_BISECTIONS):
      mid = math.sqrt(s_lo * s_hi)
      s_lo, s_hi = (mid, s_hi) if trial(mid) < target else (s_lo, mid)
  # Kernel sizes are integers, so the corruption jumps at the crossing: the strength (rotation
  # range, ellipse probability) closes the gap, from above at s_hi (u < 1) or from below at
  # s_lo (u > 1); the setting nearest the paper's (u = 1) that reaches the target wins.
  candidates = [(s_hi, 0.0, 1.0)] + (
    [(s_lo, 1.0, noise.l2b.MAX_STRENGTH)] if s_lo is not None else []
  )
  found = []
  for scale, lo, hi in candidates:
    for _ in range(_BISECTIONS + 4):
      mid = (lo + hi) / 2
      value = trial(scale, mid)
      if abs(value - target) <= tolerance / 3:
        break
      lo, hi = (mid, hi) if value < target else (lo, mid)
    found += [(scale, u) for (s2, u) in trials if s2 == scale]
  scale, strength = min(
    found, key=lambda su: (abs(trials[su] - target) > tolerance / 3, abs(math.log(su[1])))
  )
  return _result(masks, kind, seed, opts, scale, strength, trials, target, tolerance)


def _result(masks, kind, seed, opts, scale, strength, trials, target, tolerance):
  noisy = noise.corrupt_masks(
    masks, kind=kind, seed=seed, **{**opts, "kernel_scale": scale, "strength": strength}
  )
  final = float(np.mean(noise.measured_corruption(masks, noisy)))
  kernels, _ = noise.l2b.l2b_kernel_sizes(kind, masks.shape, kernel_scale=scale)
  return {
    "kernel_scale": scale,
    "strength": strength,
    "corruption": final,
    "target": target,
    "within_tolerance": abs(final - target) <= tolerance,
    "kernels": list(kernels),
    "trials": [[s, u, c] for (s, u), c in sorted(trials.items())],
    "noisy": noisy,
  }
