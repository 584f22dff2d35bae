"""Augmentation (MetaDCSeg §4.1): random flip, rotation ±10°, multi-scale zoom by 4-30 px.

One affine map per example, applied with the same matrix to the image (bilinear) and to every
label map (nearest), so image, clean label and noisy label stay aligned pixel for pixel.
"""

from typing import Mapping

import numpy as np
from scipy import ndimage

LABEL_KEYS = ("label", "noisy_label")


def random_affine(
  rng: np.random.Generator,
  size: tuple[int, int],
  *,
  max_rotation_deg: float = 10.0,
  zoom_px: tuple[int, int] = (4, 30),
  flip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one augmentation as an output->input affine map for `ndimage.affine_transform`.

  The zoom enlarges the image by `s ~ U{zoom_px}` pixels along its shorter side and crops a
  random window of the original size, i.e. the "multi-scale zoom [4-30 pixels]" of the paper.

  Args:
    rng: numpy generator (grain hands one per example, seeded by index and epoch).
    size: (H, W) of the example.
    max_rotation_deg: rotation angle ~ U(-max, max) degrees.
    zoom_px: inclusive range of the zoom in pixels.
    flip: random horizontal and vertical flips, each with probability 0.5.

  Returns:
    (matrix (2,2), offset (2,)) such that input_coord = matrix @ output_coord + offset.
  """
  h, w = size
  # Draws in a fixed order so the stream is reproducible for a given generator.
  flips = rng.random(2) < 0.5 if flip else np.zeros(2, bool)
  angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
  s = int(rng.integers(zoom_px[0], zoom_px[1] + 1))
  shift = rng.random(2)
  scale = min(h, w) / (min(h, w) + s)  # output pixel -> input pixel: < 1 means zoom in
  cos, sin = np.cos(angle), np.sin(angle)
  rot = np.array([[cos, -sin], [sin, cos]])
  flip_m = np.diag([-1.0 if flips[0] else 1.0, -1.0 if flips[1] else 1.0])
  matrix = scale * rot @ flip_m
  center = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
  # The crop window may sit anywhere inside the enlarged image: at most s/2 px off-centre.
  slack = (1.0 - scale) * np.array([h, w]) / 2.0
  translate = (shift * 2.0 - 1.0) * slack
  offset = center - matrix @ center + translate
  return matrix, offset


def apply_affine(
  example: Mapping[str, np.ndarray], matrix: np.ndarray, offset: np.ndarray
) -> dict[str, np.ndarray]:
  """Warps "image" (H,W,C) bilinearly and the label maps (H,W) with nearest neighbour."""
  out = dict(example)
  image = example["image"]
  out["image"] = np.stack(
    [
      ndimage.affine_transform(image[..., c], matrix, offset, order=1, mode="reflect")
      for c in range(image.shape[-1])
    ],
    axis=-1,
  ).astype(np.float32)
  for key in LABEL_KEYS:
    if key in example:
      out[key] = ndimage.affine_transform(
        example[key], matrix, offset, order=0, mode="reflect"
      ).astype(example[key].dtype)
  return out


def augment(
  example: Mapping[str, np.ndarray],
  rng: np.random.Generator,
  *,
  max_rotation_deg: float = 10.0,
  zoom_px: tuple[int, int] = (4, 30),
  flip: bool = True,
) -> dict[str, np.ndarray]:
  """Random flip + rotation + zoom of one example (grain `random_map` signature).

  Args:
    example: {"image" (H,W,C), "label"/"noisy_label" (H,W), ...}; maps of the image's size
      move with it.
    rng: the example's random generator.
    max_rotation_deg: the largest rotation either way.
    zoom_px: the (least, largest) pixels cropped from each side before resizing back.
    flip: also flip left-right with probability 1/2.
  """
  matrix, offset = random_affine(
    rng, example["image"].shape[:2], max_rotation_deg=max_rotation_deg, zoom_px=zoom_px, flip=flip
  )
  return apply_affine(example, matrix, offset)
