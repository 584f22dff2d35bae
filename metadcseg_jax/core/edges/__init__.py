"""Edge detectors for the boundary region of DCD (MetaDCSeg Eq. 8): PiDiNet, Canny, Sobel.

The paper adds "edge pixels detected using PiDiNet" to the boundary set. `config.dcd.edges`:

* "pidinet": the Flax port of PiDiNet (`edges/pidinet.py`) with the released weights at
  `config.dcd.pidinet_weights`; runs inside the jitted train step.
* "canny": scikit-image's Canny detector, which smooths before it differentiates and so marks
  object outlines rather than texture; runs on the host, in the input pipeline, per example.
* "sobel": the top 5% of the Sobel magnitude, in JAX (marks texture on textured images).
* "auto" (default): PiDiNet when weights are given, else Canny.

`make_detector(dcd_config)` returns an `EdgeDetector` saying where its edges are computed.
"""

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from skimage import feature

from metadcseg_jax.core.edges import pidinet
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.types import Array

DETECTORS = ("auto", "pidinet", "canny", "sobel")
# Canny's hysteresis thresholds as quantiles of the image's gradient magnitude: scale-free for
# z-scored images and photographs alike.
CANNY_LOW_QUANTILE = 0.8
CANNY_HIGH_QUANTILE = 0.9


def _check_rank(name: str, x: Array, rank: int) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}.")


def sobel_magnitude(image: Array) -> Array:
  """Sobel gradient magnitude of one image, summed over channels.

  Borders are padded symmetrically (scipy.ndimage's "reflect"), so a constant
  image has zero magnitude everywhere, borders included.

  Args:
    image: (H, W, C) or (H, W) float image.

  Returns:
    (H, W) float: Σ_c sqrt(Gx_c² + Gy_c²) with the unnormalised 3x3 Sobel
    kernels, equal per channel to `hypot(ndimage.sobel(x, 0),
    ndimage.sobel(x, 1))`.
  """
  if image.ndim == 2:
    image = image[..., None]
  _check_rank("image", image, 3)
  if not jnp.issubdtype(image.dtype, jnp.floating):
    image = image.astype(jnp.float32)
  p = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="symmetric")
  # Separable Sobel from shifted slices: [1,2,1] smoothing one way, [-1,0,1]
  # differences the other.
  rows_smooth = p[:-2] + 2 * p[1:-1] + p[2:]  # (H, W+2, C)
  cols_smooth = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # (H+2, W, C)
  gx = rows_smooth[:, 2:] - rows_smooth[:, :-2]  # d/dw, (H, W, C)
  gy = cols_smooth[2:] - cols_smooth[:-2]  # d/dh, (H, W, C)
  return jnp.sum(jnp.sqrt(gx**2 + gy**2), axis=-1)


def sobel_edges(image: Array, *, top_fraction: float = 0.05) -> Array:
  """Edge pixels of one image: the top `top_fraction` of the Sobel magnitude.

  One of the detectors of P_edge in Eq. 8 (config.dcd.edges="sobel"). The threshold is the
  k-th largest magnitude, k = max(1, round(top_fraction·H·W)), found with `lax.top_k`.

  Ties: every pixel whose magnitude equals the threshold is kept, so a mask can
  hold more than k pixels when values tie at the threshold (e.g. both sides of
  a straight step edge); no tie is broken by pixel position. Pixels with zero
  magnitude are never edges, so a flat image has no edges at all.

  Args:
    image: (H, W, C) or (H, W) float image.
    top_fraction: share of pixels to keep, in [0, 1]; 0 gives no edges.

  Returns:
    (H, W) bool edge mask. Carries no gradient.
  """
  if not 0.0 <= top_fraction <= 1.0:
    raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}.")
  mag = jax.lax.stop_gradient(sobel_magnitude(image))
  if top_fraction == 0.0:
    return jnp.zeros(mag.shape, bool)
  k = max(1, int(round(top_fraction * mag.size)))
  threshold = jax.lax.top_k(mag.reshape(-1), k)[0][-1]
  return (mag >= threshold) & (mag > 0)


def canny_edges(image: np.ndarray, *, sigma: float = 2.0) -> np.ndarray:
  """Canny edges of one image (host, numpy), on the mean over its channels.

  Args:
    image: (H, W, C) or (H, W) float image, any intensity range.
    sigma: width of the Gaussian smoothing in pixels (larger: fewer texture edges).

  Returns:
    (H, W) bool edge mask (thin, non-maximum suppressed outlines).
  """
  image = np.asarray(image, np.float64)
  grey = image.mean(axis=-1) if image.ndim == 3 else image
  if grey.std() == 0:
    return np.zeros(grey.shape, bool)
  return feature.canny(
    grey,
    sigma=sigma,
    low_threshold=CANNY_LOW_QUANTILE,
    high_threshold=CANNY_HIGH_QUANTILE,
    use_quantiles=True,
  )


@dataclasses.dataclass(frozen=True)
class EdgeDetector:
  """Where and how the edge pixels of Eq. 8 are found.

  Attributes:
    name: "pidinet", "canny" or "sobel".
    on_host: edges come with the batch, as "edges" (B,H,W) bool, made per example by
      `example_fn` in the input pipeline; otherwise `batch_fn` computes them in the step.
    example_fn: (H,W,C) numpy image -> (H,W) bool (host detectors).
    batch_fn: (B,H,W,C) images -> (B,H,W) bool, jittable (device detectors).
  """

  name: str
  on_host: bool
  example_fn: Callable[[np.ndarray], np.ndarray] | None = None
  batch_fn: Callable[[Array], Array] | None = None

  def add_edges(self, example: dict[str, Any]) -> dict[str, Any]:
    """A pipeline transform: the example with its "edges" (host detectors)."""
    return {**example, "edges": self.example_fn(example["image"])}

  def edges(self, batch: dict[str, Array]) -> Array:
    """The batch's edge pixels (B,H,W) bool, inside a step."""
    if self.on_host:
      return batch["edges"]
    return jax.lax.stop_gradient(self.batch_fn(batch["image"]))


@functools.lru_cache(maxsize=4)
def _load_pidinet(path: str):
  return pidinet.load_pidinet(path)


def resolve(name: str, pidinet_weights: str) -> str:
  """The detector "auto" stands for: PiDiNet when weights are given, else Canny."""
  if name not in DETECTORS:
    raise ConfigError(f"config.dcd.edges={name!r}: choose one of {DETECTORS}")
  if name == "auto":
    return "pidinet" if pidinet_weights else "canny"
  return name


def make_detector(dcd_config) -> EdgeDetector:
  """The detector of `config.dcd` (fields edges, pidinet_weights, canny_sigma,
  edge_top_fraction)."""
  name = resolve(dcd_config.edges, dcd_config.pidinet_weights)
  if name == "canny":
    return EdgeDetector(
      "canny", True, example_fn=functools.partial(canny_edges, sigma=float(dcd_config.canny_sigma))
    )
  if name == "sobel":
    one = functools.partial(sobel_edges, top_fraction=float(dcd_config.edge_top_fraction))
    return EdgeDetector("sobel", False, batch_fn=jax.vmap(one))
  path = pathlib.Path(dcd_config.pidinet_weights).expanduser()
  if not path.is_file():
    raise ConfigError(
      f"config.dcd.pidinet_weights={str(path)!r}: no such file (PiDiNet's "
      f"released weights, e.g. table5_pidinet.pth)"
    )
  module, variables = _load_pidinet(str(path.resolve()))
  return EdgeDetector(
    "pidinet", False, batch_fn=functools.partial(pidinet.pidinet_edges, module, variables)
  )
