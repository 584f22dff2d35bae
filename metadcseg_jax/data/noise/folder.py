"""A degraded copy of a folder of images and clean masks, with a trusted share kept clean.

    degrade_folder("Kvasir-SEG/", "kvasir_own/", kind="l2b40", seed=0, trusted_share=0.1)

writes `kvasir_own/images/` (links to the original images, nothing copied), `masks/` (every
mask corrupted with `kind`, as PNG 0/255), `trusted/` (the original masks of a seeded
`trusted_share` of the images, as PNG 0/255) and `degradation.json` (the kind, seed, the
trusted stems and the measured corruption 1 − Dice of the masks, Eq. 20): the layout of a
user's own folder (`metadcseg_jax.data.splits`), to try what the tool does with masks that are
wrong, on data whose right masks are known. The source is never written to.

L2B levels are calibrated on the whole set of masks (`noise.calibrate`), so that the measured
corruption is the level's nominal share at the masks' own size.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from PIL import Image

from metadcseg_jax import files
from metadcseg_jax.data import noise
from metadcseg_jax.data import readers
from metadcseg_jax.data.noise import calibrate as calibrate_lib
from metadcseg_jax.data.noise import l2b
from metadcseg_jax.errors import ConfigError


def _source_root(source: pathlib.Path) -> pathlib.Path:
  """The folder holding images/ and masks/ (Kvasir-SEG's release nests them one level down)."""
  if not (source / "images").is_dir():
    nested = [p for p in source.iterdir() if (p / "images").is_dir()] if source.is_dir() else []
    if len(nested) == 1:
      return nested[0]
  return source


def degrade_folder(
  source,
  out,
  *,
  kind: str,
  seed: int = 0,
  trusted_share: float = 0.1,
  threshold: int = 127,
) -> dict:
  """Writes the degraded copy of `source` at `out` (module docstring).

  Args:
    source: a folder with images/ and masks/ paired by stem (masks binarised as > threshold).
    out: the new folder (must not hold images/ yet).
    kind: a noise kind of `noise.KINDS`.
    seed: the noise and the trusted draw.
    trusted_share: the share of images whose original mask goes to trusted/.
    threshold: mask values above it are foreground (JPEG-compressed masks).

  Returns:
    degradation.json's content.
  """
  if not 0 < trusted_share < 1:
    raise ConfigError(f"trusted_share must be in (0, 1), got {trusted_share}")
  root = _source_root(pathlib.Path(source).expanduser().resolve())
  out = pathlib.Path(out).expanduser()
  if (out / "images").exists():
    raise ConfigError(f"{out / 'images'} exists: choose a new folder")
  images = readers.list_files(
    readers.require_dir(root / "images", "images/"), readers.IMAGE_SUFFIXES, root=root
  )
  masks = readers.list_files(
    readers.require_dir(root / "masks", "masks/"), readers.IMAGE_SUFFIXES, root=root
  )
  pairs = readers.pair_files(images, masks, images_dir=root / "images", masks_dir=root / "masks")
  stems = sorted(pairs)
  clean = [
    readers.mask_to_label(readers.read_mask(m), path=m, threshold=threshold)
    for _, m in (pairs[s] for s in stems)
  ]
  noisy, setting = _corrupt(clean, kind, seed)
  n_trusted = max(1, int(round(trusted_share * len(stems))))
  trusted = sorted(
    stems[i] for i in np.random.default_rng([seed, 0x7472]).permutation(len(stems))[:n_trusted]
  )
  for sub in ("images", "masks", "trusted"):
    (out / sub).mkdir(parents=True, exist_ok=True)
  for stem, label, bad in zip(stems, clean, noisy):
    image = pairs[stem][0]
    os.symlink(image, out / "images" / image.name)
    Image.fromarray((bad > 0).astype(np.uint8) * 255).save(out / "masks" / f"{stem}.png")
    if stem in trusted:
      Image.fromarray(label.astype(np.uint8) * 255).save(out / "trusted" / f"{stem}.png")
  corruption = np.array([noise.measured_corruption(c, n) for c, n in zip(clean, noisy)])
  report = {
    "source": str(root),
    "kind": kind,
    "seed": seed,
    "setting": setting,
    "n_images": len(stems),
    "trusted_share": trusted_share,
    "trusted": trusted,
    "corruption_mean": float(corruption.mean()),
    "corruption_std": float(corruption.std()),
  }
  files.write_atomic(out / "degradation.json", json.dumps(report, indent=1))
  return report


def _corrupt(clean: list[np.ndarray], kind: str, seed: int) -> tuple[list[np.ndarray], dict]:
  """Each mask corrupted with its own stream (`noise.mask_rng`); L2B levels calibrated on the
  masks when they share one size (the calibration stacks them), else as published."""
  options: dict = {}
  if kind in l2b.L2B_LEVELS and len({c.shape for c in clean}) == 1:
    found = calibrate_lib.calibrate(np.stack(clean), kind=kind, seed=seed)
    options = {"kernel_scale": found["kernel_scale"], "strength": found["strength"]}
  noisy = [
    noise.corrupt_mask(c, kind=kind, rng=noise.mask_rng(seed, i), **options)
    for i, c in enumerate(clean)
  ]
  return noisy, options
