"""Synthetic medical-looking segmentation data, generated on the fly and seeded.

Each example is a smooth, textured "tissue" background under a multiplicative
intensity inhomogeneity (bias field), with one to three irregular "lesions"
whose intensity differs from the background only a little, behind blurred
edges, with their own fine texture, anatomy that is not lesion (thin folds or
vessels, an organ border: strong edges away from the lesions, as in real scans),
plus spatially correlated acquisition noise. The label is the union of the lesions.

All amplitudes are in units of the acquisition-noise standard deviation
(sigma_n = 1) before the final normalisation; lengths scale with the image side,
so a 128x128 example looks like a 64x64 one at twice the resolution:

* base tissue level 4.0; background texture: Gaussian-filtered noise fields of
  correlation lengths size/8 and size/24 with standard deviations 0.3 and 0.2;
* bias field exp(0.10 * smooth field (size/3) + linear ramp of up to 0.3 across
  the image): about +-15% gain, so the tissue level drifts by about +-0.6;
* lesion contrast delta ~ U(1.4, 2.0) (negative, a dark lesion, with
  probability 0.15), blurred by a Gaussian of sigma U(0.7, 1.4) * size/64
  pixels; inside the lesion an extra texture (correlation length size/32,
  std 0.4);
* anatomy (since generator 1.1.0, drawn last so masks and everything else are
  unchanged): 1-3 folds of contrast +-U(1, 2) and width ~1-2 px at 64 px, and
  with p 0.7 a soft organ border of contrast +-U(0.5, 1.5) (`_anatomy`);
* acquisition noise: white Gaussian noise filtered with sigma 0.4 * size/64
  pixels (mildly correlated, speckle-like) and rescaled to unit std.

So the pixel-level contrast-to-noise ratio CNR = |delta| / sigma_n is 1.4-2.0.
Measured with experiments/proxy_check.py at 64 px (BUILD_NOTES.md, "The
synthetic set as a proxy"): boundary CNR 0.96 (Kvasir-SEG sample 0.30, BraTS
FLAIR 2.0); 48% of Canny's edge pixels lie within 2 px of a lesion boundary
(real samples 11-28%). A lesion is visible as a region, but its boundary is
uncertain by a pixel or so and texture, bias and anatomy make distractors: a
U-Net++ of width 8 trained with CE on clean labels for 12 epochs (320 images)
reaches test Dice 0.71. With several channels (3: like an RGB
endoscopy frame, pinkish tint) every channel sees the same anatomy, lesions and
bias field, with per-channel base levels and lesion contrasts (x U(0.5, 1.3)),
textures correlated at 0.85 and noise at 0.5 across channels.

Images are normalised to zero mean and unit standard deviation per image (over
all pixels and channels, which keeps the colour balance). Everything is drawn
from one `np.random.Generator`, so an example is a pure function of its
generator; `make_split` seeds each example from `(seed, split, index)` through
`np.random.SeedSequence`, so any example can be regenerated alone
(`split_example`) and splits never share examples.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator
import zlib

import numpy as np
from scipy import ndimage
from skimage import draw
import tensorflow_datasets as tfds

from metadcseg_jax.data import builders
from metadcseg_jax.data import SPLITS

# Bump when the generated arrays change: the TFDS builder uses it as its version.
GENERATOR_VERSION = "1.1.0"

MIN_SIZE = 16
FOREGROUND_FRACTION_RANGE = (0.05, 0.40)

_BASE_LEVEL = 4.0
_BG_TEXTURE = ((1 / 8, 0.3), (1 / 24, 0.2))  # (correlation length / size, std)
_FG_TEXTURE = (1 / 32, 0.4)
_CONTRAST_RANGE = (1.4, 2.0)
_DARK_LESION_PROB = 0.15
_EDGE_SIGMA_RANGE = (0.7, 1.4)  # pixels at size 64
_BIAS_STD = 0.10
_BIAS_RAMP = 0.3
_NOISE_SIGMA = 0.4  # pixels at size 64
_CHANNEL_CORRELATION = 0.85
_NOISE_CORRELATION = 0.5
_RGB_TINT = np.array([1.15, 0.8, 0.65])  # pinkish, like endoscopy
_FOLD_CONTRAST = (1.0, 2.0)
_ORGAN_CONTRAST = (0.5, 1.5)
_ORGAN_PROB = 0.7
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _check_shape_args(size: int, channels: int) -> None:
  if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
    raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
  if not isinstance(channels, (int, np.integer)) or channels < 1:
    raise ValueError(f"channels must be a positive integer, got {channels!r}")


def _smooth_fields(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
  """Gaussian-filtered white noise over the last two axes, unit std per field.

  Args:
    rng: random generator.
    shape: (..., H, W).
    sigma: filter standard deviation in pixels (0 leaves white noise).

  Returns:
    float64 array of `shape`, each (H, W) field with zero mean and unit std.
  """
  z = rng.standard_normal(shape)
  if sigma > 0:
    z = ndimage.gaussian_filter(
      z, sigma=(0,) * (len(shape) - 2) + (sigma, sigma), mode="wrap", truncate=3.0
    )
  z -= z.mean(axis=(-2, -1), keepdims=True)
  z /= z.std(axis=(-2, -1), keepdims=True) + 1e-12
  return z


def _foreground(rng: np.random.Generator, size: int) -> np.ndarray:
  """Union of 1-3 star-shaped blobs with Fourier-perturbed, wiggly outlines.

  Each blob is {x : |x - c| < r(angle)} with
  log r(t) = log r0 + sum_{k=2..6} a_k cos(k t + phi_k); a smooth noise field
  added to the normalised distance roughens the outline. The decision
  threshold is moved, if needed, so the foreground covers
  `FOREGROUND_FRACTION_RANGE` of the image.

  Args:
    rng: random generator.
    size: image side H = W.

  Returns:
    (H, W) bool mask.
  """
  n_blobs = int(rng.integers(1, 4))
  target = rng.uniform(0.08, 0.30)
  # Half equal shares, half random: no blob is a speck.
  shares = 0.5 / n_blobs + 0.5 * rng.dirichlet(np.ones(n_blobs))
  radii = np.sqrt(target * size * size * shares / np.pi)  # (n,)
  lo = 0.7 * radii
  centers = lo[:, None] + rng.uniform(size=(n_blobs, 2)) * (
    size - 2 * lo[:, None]
  )  # (n, 2), blobs mostly inside the image
  ks = np.arange(2, 7)
  amps = rng.normal(size=(n_blobs, ks.size)) * 0.22 / ks**0.8  # (n, K)
  phases = rng.uniform(0, 2 * np.pi, size=(n_blobs, ks.size))
  wiggle = _smooth_fields(rng, (size, size), size / 16)

  yx = np.arange(size) + 0.5
  dy = yx[None, :, None] - centers[:, 0, None, None]  # (n, H, 1)
  dx = yx[None, None, :] - centers[:, 1, None, None]  # (n, 1, W)
  rho = np.hypot(dy, dx)  # (n, H, W)
  theta = np.arctan2(dy, dx)
  log_r = np.log(radii)[:, None, None] + np.einsum(
    "nk,nkhw->nhw", amps, np.cos(ks[None, :, None, None] * theta[:, None] + phases[..., None, None])
  )
  dist = (rho / np.exp(log_r)).min(axis=0) + 0.07 * wiggle  # (H, W)

  mask = dist < 1.0
  lo_frac, hi_frac = FOREGROUND_FRACTION_RANGE
  frac = mask.mean()
  if not lo_frac + 0.005 <= frac <= hi_frac - 0.005:
    goal = np.clip(frac, lo_frac + 0.01, hi_frac - 0.01)
    mask = dist < np.quantile(dist, goal)
  return mask


def _anatomy(rng: np.random.Generator, size: int) -> np.ndarray:
  """Structures that are not lesions: 1-3 thin folds or vessels and, with p 0.7, the border of a
  larger organ, in units of the noise std.

  Real scans put most of their strong edges away from the lesion (measured with
  experiments/proxy_check.py: 11-28% of Canny's edge pixels within 2 px of the lesion boundary
  on Kvasir-SEG and BraTS samples; 62% on this set without these structures, 48% with them).
  Folds are thin bands along an iso-line of a smooth field (width ~1-2 px at 64 px, contrast
  ±U(1, 2)); the organ border is a soft step along another (contrast ±U(0.5, 1.5)).

  Returns:
    (H, W) float64.
  """
  out = np.zeros((size, size))
  for _ in range(int(rng.integers(1, 4))):
    field = _smooth_fields(rng, (size, size), size / 6)
    level, width = rng.uniform(-1.0, 1.0), rng.uniform(0.04, 0.08)
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(*_FOLD_CONTRAST)
    out += contrast * np.exp(-0.5 * ((field - level) / width) ** 2)
  organ = _smooth_fields(rng, (size, size), size / 3)
  level, contrast = rng.uniform(-0.8, 0.8), rng.choice([-1.0, 1.0]) * rng.uniform(*_ORGAN_CONTRAST)
  if rng.uniform() < _ORGAN_PROB:
    out += contrast / (1.0 + np.exp(-(organ - level) / 0.08))
  return out


def make_example(
  rng: np.random.Generator, *, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
  """One synthetic image and its label, a pure function of `rng`'s state.

  Args:
    rng: random generator; consumed.
    size: image side H = W (>= 16).
    channels: number of image channels C (1: grey MRI/CT-like, 3: RGB-like).

  Returns:
    image: (H, W, C) float32, zero mean and unit std over the image.
    label: (H, W) uint8 in {0, 1}, foreground covering 5-40% of the image.
  """
  _check_shape_args(size, channels)
  scale = size / 64.0
  mask = _foreground(rng, size)

  # Per-channel look: base level, lesion-contrast weight (multi-channel only).
  if channels == 1:
    base = np.full((1, 1, 1), _BASE_LEVEL)
    weight = np.ones((1, 1, 1))
  else:
    tint = _RGB_TINT if channels == 3 else np.ones(channels)
    base = _BASE_LEVEL * (tint * rng.uniform(0.85, 1.15, size=channels))
    base = base[:, None, None]
    weight = rng.uniform(0.5, 1.3, size=(channels, 1, 1))
  sign = -1.0 if rng.uniform() < _DARK_LESION_PROB else 1.0
  delta = sign * rng.uniform(*_CONTRAST_RANGE)
  edge_sigma = scale * rng.uniform(*_EDGE_SIGMA_RANGE)
  soft = ndimage.gaussian_filter(mask.astype(np.float64), edge_sigma, mode="nearest")  # (H, W)

  def correlated(sigma, rho):
    # Shared anatomy plus a channel-specific part, correlation rho.
    shared = _smooth_fields(rng, (1, size, size), sigma)
    if channels == 1:
      return shared
    own = _smooth_fields(rng, (channels, size, size), sigma)
    return np.sqrt(rho) * shared + np.sqrt(1 - rho) * own

  texture = sum(std * correlated(frac * size, _CHANNEL_CORRELATION) for frac, std in _BG_TEXTURE)
  fg_frac, fg_std = _FG_TEXTURE
  fg_texture = fg_std * correlated(fg_frac * size, _CHANNEL_CORRELATION)

  yx = (np.arange(size) + 0.5) / size - 0.5
  ramp, angle = rng.uniform(0, _BIAS_RAMP), rng.uniform(0, 2 * np.pi)
  log_bias = (
    _BIAS_STD * _smooth_fields(rng, (size, size), size / 3)
    + ramp * np.cos(angle) * yx[:, None]
    + ramp * np.sin(angle) * yx[None, :]
  )
  bias = np.exp(log_bias)  # (H, W)

  tissue = base + texture + soft * (delta * weight + fg_texture)  # (C, H, W)
  noise = correlated(_NOISE_SIGMA * scale, _NOISE_CORRELATION)
  noise /= noise.std(axis=(1, 2), keepdims=True)
  # Drawn last, so everything above (the mask included) is what earlier versions drew.
  anatomy = _anatomy(rng, size) * weight  # (C, H, W)
  image = bias * (tissue + anatomy) + noise
  image -= image.mean()
  image /= image.std() + 1e-12
  return (np.moveaxis(image, 0, -1).astype(np.float32), mask.astype(np.uint8))


def split_id(split: str) -> int:
  """Stable integer id of a split name ('train' 0, 'val' 1, 'test' 2, else CRC32)."""
  if not isinstance(split, str) or not split:
    raise ValueError(f"split must be a non-empty string, got {split!r}")
  return _SPLIT_IDS.get(split, zlib.crc32(split.encode()) + len(_SPLIT_IDS))


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split` (independent of the others)."""
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index must be a non-negative integer, got {index!r}")
  return np.random.default_rng(np.random.SeedSequence([int(seed), split_id(split), int(index)]))


def split_example(
  seed: int, split: str, index: int, *, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
  """Regenerates entry `index` of `make_split(seed, split, ...)` alone.

  Args:
    seed: the dataset seed.
    split: the split's name.
    index: the entry.
    size: the image size.
    channels: the input channels.
  """
  return make_example(example_rng(seed, split, index), size=size, channels=channels)


def make_split(
  seed: int, split_name: str, n: int, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
  """A whole split: example i is `split_example(seed, split_name, i, ...)`.

  Args:
    seed: non-negative dataset seed.
    split_name: e.g. 'train', 'val', 'test'; splits draw disjoint streams.
    n: number of examples (>= 0).
    size: image side H = W.
    channels: image channels C.

  Returns:
    images: (n, H, W, C) float32; labels: (n, H, W) uint8 in {0, 1}.
  """
  _check_shape_args(size, channels)
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be a non-negative integer, got {n!r}")
  images = np.empty((n, size, size, channels), np.float32)
  labels = np.empty((n, size, size), np.uint8)
  for i in range(n):
    images[i], labels[i] = split_example(seed, split_name, i, size=size, channels=channels)
  return images, labels


def blob_masks(n: int, size: int, *, seed: int = 0) -> np.ndarray:
  """Random blob masks for tests and calibration tables (not for training).

  Each mask is the union of 1-3 rotated ellipses with centres in the middle
  60% of the image and semi-axes of 12-30% of the side.

  Returns:
    (n, size, size) uint8 in {0, 1}.
  """
  rng = np.random.default_rng(seed)
  out = np.zeros((n, size, size), np.uint8)
  for i in range(n):
    for _ in range(rng.integers(1, 4)):
      r, c = rng.uniform(0.3, 0.7, 2) * size
      a, b = rng.uniform(0.12, 0.3, 2) * size
      rr, cc = draw.ellipse(r, c, a, b, shape=(size, size), rotation=rng.uniform(0, np.pi))
      out[i, rr, cc] = 1
  return out


# --- The TFDS builder -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticConfig(builders.SegmentationConfig):
  """Config of `SyntheticSegmentation`: square images, split sizes, seed."""

  n_train: int = 400
  n_val: int = 50
  n_test: int = 50
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    if self.height != self.width:
      raise ValueError(f"synthetic images are square, got height={self.height}, width={self.width}")
    if self.height < MIN_SIZE:
      raise ValueError(f"size must be >= {MIN_SIZE}, got {self.height}")
    # TFDS refuses to finalise a split with no examples.
    for field, low in (("n_train", 1), ("n_val", 1), ("n_test", 1), ("seed", 0)):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")

  @property
  def split_sizes(self) -> dict[str, int]:
    return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


def synthetic_config_name(
  size: int, channels: int, n_train: int, n_val: int, n_test: int, seed: int
) -> str:
  """E.g. 's64_c1_n400-50-50_seed0'.

  Args:
    size, channels: the image size and input channels.
    n_train, n_val, n_test: the splits' sizes.
    seed: the dataset seed.
  """
  return f"s{size}_c{channels}_n{n_train}-{n_val}-{n_test}_seed{seed}"


def _new_synthetic_config(size, channels, n_train, n_val, n_test, seed):
  return SyntheticConfig(
    name=synthetic_config_name(size, channels, n_train, n_val, n_test, seed),
    description=(
      f"{size}x{size}x{channels} synthetic lesions, {n_train}/{n_val}/"
      f"{n_test} train/val/test examples, seed {seed}."
    ),
    height=size,
    width=size,
    channels=channels,
    num_classes=2,
    n_train=n_train,
    n_val=n_val,
    n_test=n_test,
    seed=seed,
  )


class SyntheticSegmentation(builders.SegmentationBuilder):
  """Seeded synthetic lesions (see `make_example`).

  Record i of split s is `split_example(seed, s, i, ...)`, with
  case_id 'synthetic-{s}-{i:05d}' and slice_index 0.
  """

  # Tied to the generator: a change of the arrays is a new dataset version.
  VERSION = tfds.core.Version(GENERATOR_VERSION)
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Anatomy that is not lesion: folds and an organ border (same masks).",
  }
  BUILDER_CONFIGS = [
    _new_synthetic_config(64, 1, 400, 50, 50, 0),
    _new_synthetic_config(64, 3, 400, 50, 50, 0),
  ]
  DESCRIPTION = (
    "Synthetic medical-looking binary segmentation: textured background, "
    "bias field, 1-3 low-contrast lesions with blurred edges, noise."
  )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    return {
      split: self._generate_examples(split, n)
      for split, n in self.builder_config.split_sizes.items()
    }

  def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, Any]]:
    config = self.builder_config
    for i in range(n):
      image, label = split_example(
        config.seed, split, i, size=config.height, channels=config.channels
      )
      yield (
        i,
        self.encode_example(
          image=image, label=label, case_id=f"synthetic-{split}-{i:05d}", slice_index=0
        ),
      )


def synthetic_builder_config(
  size: int, channels: int, n_train: int, n_val: int, n_test: int, seed: int
) -> SyntheticConfig:
  """The uniquely named config for these parameters (a predefined one if any).

  Args:
    size, channels, n_train, n_val, n_test, seed: as in `synthetic_config_name`.
  """
  name = synthetic_config_name(size, channels, n_train, n_val, n_test, seed)
  predefined = SyntheticSegmentation.builder_configs.get(name)
  if predefined is not None:
    return predefined
  return _new_synthetic_config(size, channels, n_train, n_val, n_test, seed)


def load_synthetic(
  *,
  data_dir: str | os.PathLike,
  size: int,
  channels: int,
  n_train: int,
  n_val: int,
  n_test: int,
  seed: int,
) -> dict[str, builders.DataSource]:
  """Builds the synthetic dataset under `data_dir` if needed; returns sources.

  Args:
    data_dir: TFDS data directory; the dataset lands in
      `data_dir/synthetic_segmentation/<config name>/<version>/`.
    size: image side H = W.
    channels: image channels C.
    n_train, n_val, n_test: examples per split.
    seed: dataset seed.

  Returns:
    {'train', 'val', 'test': data source}; record i of split s equals
    `split_example(seed, s, i, size=size, channels=channels)`.
  """
  if data_dir is None:
    raise ValueError("data_dir must be a directory path, got None")
  config = synthetic_builder_config(size, channels, n_train, n_val, n_test, seed)
  builder = SyntheticSegmentation(data_dir=os.fspath(data_dir), config=config)
  return builders.prepare_sources(builder, splits=SPLITS)
