"""Readers shared by the real-dataset builders: file pairing, decoding, resizing, splits.

Everything here is plain numpy/PIL (plus SimpleITK or nibabel, imported only when a volume is
read) and raises `DataError` (a ValueError) naming the offending file, so a bad raw folder
fails before or
while the TFDS builder writes anything, never by silently dropping data.

Conventions:
  * 2D images are (H, W, C) float32 scaled to [0, 1]; masks are (H, W) integer class indices.
  * Volumes are (S, H, W) with S the axial slice axis (SimpleITK's array order; NIfTI arrays
    (X, Y, Z) are transposed to (Z, Y, X)), spacing (row, col, slice) in mm.
  * Splits are seeded permutations of the sorted case ids, written once to a JSON split file
    and read back on every later build, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Iterable, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image

from metadcseg_jax import files
from metadcseg_jax.data import SPLITS
from metadcseg_jax.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SPLIT_FILE_VERSION = 1
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_MAX_LISTED = 5


def _listed(paths: Sequence[object]) -> str:
  """A short, readable list of file names for an error message."""
  names = [str(p) for p in paths[:_MAX_LISTED]]
  more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
  return ", ".join(names) + more


def strip_suffix(name: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
  """(stem, suffix) when `name` ends with one of `suffixes` (case-insensitive), else None."""
  lower = name.lower()
  for suffix in sorted(suffixes, key=len, reverse=True):  # '.nii.gz' before '.gz'-likes
    if lower.endswith(suffix):
      return name[: -len(suffix)], suffix
  return None


@dataclasses.dataclass
class Listing:
  """Files of one folder keyed by stem, and what was skipped (relative paths) and why."""

  files: dict[str, pathlib.Path]
  skipped: list[str]


def require_dir(path: os.PathLike | str, what: str) -> pathlib.Path:
  """`path` as a Path, or a ValueError explaining the expected layout."""
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise DataError(f"wrong layout: {what} folder {path} does not exist or is not a folder")
  return path


def list_files(
  folder: pathlib.Path,
  suffixes: Sequence[str],
  *,
  root: pathlib.Path,
  companions: Sequence[str] = (),
) -> Listing:
  """Lists `folder`'s files with one of `suffixes`, keyed by stem.

  Hidden entries (name starting with '.', e.g. macOS '._x.nii.gz' forks), sub-folders and files
  with other suffixes are skipped and reported; `companions` (e.g. '.raw' beside '.mhd') are
  data files of a listed file and are neither listed nor reported.

  Args:
    folder: the folder to list.
    suffixes: the data files' suffixes (e.g. `IMAGE_SUFFIXES`).
    root: the dataset's folder, which the reported paths are relative to.
    companions: suffixes of files that belong to a listed one (neither listed nor reported).

  Raises:
    ValueError: two files share a stem (e.g. 'a.png' and 'a.jpg').
  """
  files, skipped = {}, []
  for path in sorted(folder.iterdir()):
    rel = str(path.relative_to(root))
    parsed = strip_suffix(path.name, suffixes)
    if path.name.startswith(".") or not path.is_file() or parsed is None:
      if path.is_file() and strip_suffix(path.name, companions) and not path.name.startswith("."):
        continue
      skipped.append(rel + ("/" if path.is_dir() else ""))
      continue
    stem = parsed[0]
    if stem in files:
      raise DataError(
        f"two files in {folder} share the name {stem!r}: {files[stem].name} and "
        f"{path.name}; keep one"
      )
    files[stem] = path
  return Listing(files, skipped)


def pair_files(
  images: Listing,
  masks: Listing,
  *,
  images_dir: pathlib.Path,
  masks_dir: pathlib.Path,
  mask_suffix: str = "",
  suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  """Matches images to masks by stem (mask stem = image stem + `mask_suffix`).

  Args:
    images, masks: `list_files`' listings of the two folders.
    images_dir, masks_dir: the two folders, for the messages.
    mask_suffix: what a mask's stem adds to its image's.
    suffixes: the data files' suffixes.

  Raises:
    ValueError: an image without a mask, a mask without an image, or no images at all.
  """
  if not images.files:
    raise DataError(f"no image files ({', '.join(suffixes)}) found in {images_dir}")
  by_image_stem = {}
  unmatched_masks = []
  for stem, path in masks.files.items():
    if mask_suffix and not stem.endswith(mask_suffix):
      unmatched_masks.append(path)
      continue
    by_image_stem[stem[: len(stem) - len(mask_suffix)] if mask_suffix else stem] = path
  missing = [p for s, p in images.files.items() if s not in by_image_stem]
  if missing:
    raise DataError(
      f"image without a mask in {masks_dir} (mask stem = image stem"
      f"{' + ' + repr(mask_suffix) if mask_suffix else ''}): {_listed(missing)}"
    )
  orphans = unmatched_masks + [p for s, p in by_image_stem.items() if s not in images.files]
  if orphans:
    raise DataError(f"mask without an image in {images_dir}: {_listed(orphans)}")
  return {s: (images.files[s], by_image_stem[s]) for s in images.files}


def _open(path: pathlib.Path) -> Image.Image:
  try:
    image = Image.open(path)
    image.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...: all mean unreadable
    raise DataError(f"cannot read image file {path}: {e}") from e
  return image


def image_channels(path: pathlib.Path) -> int:
  """1 for a grey image file, 3 for colour (reads the header only)."""
  try:
    with Image.open(path) as image:
      return 1 if image.mode in _GREY_MODES else 3
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read image file {path}: {e}") from e


def read_image(path: pathlib.Path, *, channels: int) -> tuple[np.ndarray, bool]:
  """Decodes an image file to (H, W, channels) float32 in [0, 1].

  8-bit images are divided by 255 and 16-bit ones by 65535; RGBA loses its alpha channel, a grey
  image is repeated to 3 channels and a colour one is converted to luminance (ITU-R 601) for
  `channels` 3 and 1 respectively.

  Returns:
    (image, converted): `converted` says the channel count was changed (callers count it).
  """
  image = _open(path)
  grey = image.mode in _GREY_MODES
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    array = np.asarray(image, np.float64)
    array = array if image.mode == "F" else array / 65535.0
  else:
    array = np.asarray(image.convert("L" if grey or channels == 1 else "RGB"), np.float64) / 255.0
  if array.ndim == 2:
    array = array[..., None]
  converted = (grey and channels == 3) or (not grey and channels == 1)
  if array.shape[-1] != channels:
    array = np.repeat(array, channels, axis=-1)
  return array.astype(np.float32), converted


def read_mask(path: pathlib.Path) -> np.ndarray:
  """Decodes a mask file to (H, W) integers: palette indices for 'P', luminance for colour."""
  image = _open(path)
  if image.mode in ("P", "1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
    return np.asarray(image).astype(np.int64)
  if image.mode == "F":
    return integral(np.asarray(image), path)
  return np.asarray(image.convert("L")).astype(np.int64)


def integral(array: np.ndarray, path: object) -> np.ndarray:
  rounded = np.rint(array)
  if not np.array_equal(rounded, array):
    bad = np.unique(array[rounded != array])[:_MAX_LISTED]
    raise DataError(f"label file {path} holds non-integer values, e.g. {bad.tolist()}")
  return rounded.astype(np.int64)


def mask_to_label(
  raw: np.ndarray, *, path: object, num_classes: int | None = None, threshold: int | None = None
) -> np.ndarray:
  """Validates and maps raw mask values to class indices (H, W) uint8.

  Args:
    raw: (H, W) integer mask values.
    path: the mask file, for error messages.
    num_classes: None for a binary mask (0/1 or 0/255); else values must lie in
      [0, num_classes) (and 0/255 is also accepted for num_classes 2).
    threshold: if given, the mask is binarised as `raw > threshold` (JPEG-compressed masks).

  Raises:
    ValueError: values that are neither binary nor class indices (they are named).
  """
  if threshold is not None:
    return (raw > threshold).astype(np.uint8)
  values = np.unique(raw)
  if num_classes in (None, 2) and np.isin(values, (0, 255)).all():
    return (raw == 255).astype(np.uint8)
  allowed = 2 if num_classes is None else num_classes
  bad = values[(values < 0) | (values >= allowed)]
  if bad.size:
    kind = (
      "binary (0/1 or 0/255)"
      if num_classes is None
      else f"binary or class indices in [0, {num_classes})"
    )
    raise DataError(
      f"mask {path} has values {bad[:10].tolist()} that are neither {kind}; "
      f"set num_classes, or mask_threshold for JPEG-compressed masks"
    )
  return raw.astype(np.uint8)


def check_same_spacing(
  image_spacing: Sequence[float],
  label_spacing: Sequence[float],
  image_path: object,
  label_path: object,
) -> None:
  """Raises DataError naming both files when a volume and its mask differ in voxel size.

  A mask of the right shape but another spacing was written for another resampling of the
  image (nnU-Net's dataset check refuses it too); distances and the resampling of both to the
  network's grid would silently disagree. Relative tolerance 1e-3 absorbs float32 headers.

  Args:
    image_spacing, label_spacing: (row, col, slice) voxel size in mm (`volume_info`).
    image_path, label_path: the two files, for the message.
  """
  a, b = np.asarray(image_spacing, float), np.asarray(label_spacing, float)
  if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-6):
    raise DataError(
      f"voxel size mismatch: image {image_path} has spacing {tuple(image_spacing)} mm but its "
      f"mask {label_path} has {tuple(label_spacing)} mm"
    )


def check_same_size(
  image_shape: Sequence[int], label_shape: Sequence[int], image_path: object, label_path: object
) -> None:
  """Raises DataError naming both files when an image and its mask differ in size.

  Args:
    image_shape, label_shape: the image's and the mask's (H, W) (or (S, H, W)).
    image_path, label_path: the two files, for the message.
  """
  if tuple(image_shape) != tuple(label_shape):
    raise DataError(
      f"size mismatch: image {image_path} is {tuple(image_shape)} but its mask "
      f"{label_path} is {tuple(label_shape)}"
    )


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """(H, W, C) float32 -> (size, size, C), or (h, w, C) for `size` = (h, w): bilinear,
  antialiased when shrinking (PIL)."""
  h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
  if image.shape[:2] == (h, w):
    return image.astype(np.float32)
  # PIL widens the bilinear kernel by the reduction factor, i.e. antialiases.
  return np.stack(
    [
      np.asarray(
        Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
          (w, h), Image.Resampling.BILINEAR
        )
      )
      for c in range(image.shape[-1])
    ],
    axis=-1,
  )


def resize_label(label: np.ndarray, size: int) -> np.ndarray:
  """(H, W) uint8 class indices -> (size, size) uint8, nearest neighbour."""
  if label.shape == (size, size):
    return label.astype(np.uint8)
  return np.asarray(
    Image.fromarray(label.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
  )


def zscore(
  volume: np.ndarray, *, region: np.ndarray | None = None, name: object = "volume"
) -> np.ndarray:
  """Per-volume z-score `(v - mean) / std`, statistics over `region` (zero outside it).

  Args:
    volume: (S, H, W) intensities.
    region: optional bool mask of `volume`'s shape (e.g. the nonzero brain voxels); None: all.
    name: for the log message of a constant volume.

  Returns:
    float32 array like `volume`.
  """
  values = volume[region] if region is not None else volume
  values = values.astype(np.float64)
  if values.size == 0:
    logging.warning("%s: empty normalisation region, left unnormalised", name)
    return volume.astype(np.float32)
  mean, std = values.mean(), values.std()
  if std == 0:
    logging.warning("%s: constant intensity %g, only centred", name, mean)
    std = 1.0
  out = (volume.astype(np.float64) - mean) / std
  if region is not None:
    out[~region] = 0.0
  return out.astype(np.float32)


def import_optional(module: str, package: str):
  try:
    return __import__(module)
  except ImportError as e:
    raise ImportError(
      f"reading this dataset needs {package}: pip install 'metadcseg-jax[data]' (or {package})"
    ) from e


def _mm(*values) -> tuple[float, ...]:
  # Headers store float32 spacings: 0.7 reads back as 0.699999988; keep what was meant.
  return tuple(round(float(v), 6) for v in values)


def volume_info(path: pathlib.Path) -> tuple[tuple[int, ...], tuple[float, float, float]]:
  """Reads a volume's header only: (shape (S, H, W[, M]), spacing (row, col, slice) mm)."""
  try:
    if strip_suffix(path.name, NIFTI_SUFFIXES):
      nib = import_optional("nibabel", "nibabel")
      image = nib.load(str(path))
      shape, zooms = image.shape, image.header.get_zooms()
      if len(shape) < 3:
        raise DataError(f"expected a 3D or 4D volume, got shape {shape}")
      return ((shape[2], shape[1], shape[0]) + tuple(shape[3:]), _mm(zooms[1], zooms[0], zooms[2]))
    sitk = import_optional("SimpleITK", "SimpleITK")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size, spacing = reader.GetSize(), reader.GetSpacing()
    if len(size) != 3:
      raise DataError(f"expected a 3D volume, got size {size}")
    return (size[2], size[1], size[0]), _mm(spacing[1], spacing[0], spacing[2])
  except ImportError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read volume file {path}: {e}") from e


def read_volume(path: pathlib.Path, *, channel: int | None = None) -> np.ndarray:
  """Reads a whole volume as (S, H, W) float32 (NIfTI (X,Y,Z[,M]) -> (Z,Y,X); `channel` of M)."""
  try:
    if strip_suffix(path.name, NIFTI_SUFFIXES):
      nib = import_optional("nibabel", "nibabel")
      proxy = nib.load(str(path)).dataobj
      data = np.asarray(proxy[..., channel] if channel is not None else proxy)
      if data.ndim != 3:
        raise DataError(f"expected a 3D volume after channel selection, got {data.shape}")
      return np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.float32)
    sitk = import_optional("SimpleITK", "SimpleITK")
    data = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return data.astype(np.float32)
  except ImportError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read volume file {path}: {e}") from e


def read_volume_channels(path: pathlib.Path, channels: Sequence[int]) -> np.ndarray:
  """Reads `channels` of a 3D or 4D volume as (S, H, W, len(channels)) float32 (a 3D volume has
  the one channel 0)."""
  shape, _ = volume_info(path)
  if len(shape) == 3:
    if list(channels) != [0]:
      raise DataError(f"{path} is a 3D volume with one channel, asked for channels {channels}")
    return read_volume(path)[..., None]
  bad = [c for c in channels if not 0 <= c < shape[3]]
  if bad:
    raise DataError(f"{path} has {shape[3]} channels, asked for {bad}")
  return np.stack([read_volume(path, channel=c) for c in channels], axis=-1)


def read_label_volume(path: pathlib.Path, *, allowed: Iterable[int]) -> np.ndarray:
  """Reads a label volume (S, H, W) as integers, checking every value is in `allowed`."""
  labels = integral(read_volume(path), path)
  values = np.unique(labels)
  bad = values[~np.isin(values, list(allowed))]
  if bad.size:
    raise DataError(
      f"label file {path} has values {bad[:10].tolist()} outside the labels "
      f"{sorted(allowed)} of dataset.json"
    )
  return labels


# ---------------------------------------------------------------------------------------------
# Splits.


def split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
  """Cases per split: test = ceil(f_test n), val = round(f_val n), train = the rest.

  Each split gets at least one case. E.g. 1000 at 0.8/0.1/0.1 -> 800/100/100; 484 at
  0.8/0.1/0.1 -> 387/48/49 (the paper's MSD Brain train/test sizes); 10 -> 8/1/1.

  Raises:
    ValueError: fewer than 3 cases, or fractions that leave a split empty.
  """
  if set(fractions) != set(SPLITS) or any(f <= 0 for f in fractions.values()):
    raise DataError(f"split fractions need positive 'train', 'val', 'test', got {fractions}")
  if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
    raise DataError(f"split fractions must sum to 1, got {fractions}")
  if n < len(SPLITS):
    raise DataError(f"need at least {len(SPLITS)} cases for train/val/test splits, found {n}")
  n_test = max(1, math.ceil(fractions["test"] * n - 1e-9))
  n_val = max(1, int(math.floor(fractions["val"] * n + 0.5)))
  if n - n_test - n_val < 1:  # tiny folders: fractions would empty train
    n_val = n_test = 1
  return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def make_splits(
  ids: Sequence[str], *, fractions: Mapping[str, float], seed: int
) -> dict[str, list[str]]:
  """Seeded split of case ids: a permutation of the sorted ids cut into test, val, train."""
  ids = sorted(ids)
  counts = split_counts(len(ids), fractions)
  order = np.random.default_rng(seed).permutation(len(ids))
  shuffled = [ids[i] for i in order]
  cut_test, cut_val = counts["test"], counts["test"] + counts["val"]
  return {
    "train": sorted(shuffled[cut_val:]),
    "val": sorted(shuffled[cut_test:cut_val]),
    "test": sorted(shuffled[:cut_test]),
  }


def load_or_make_splits(
  path: pathlib.Path,
  ids: Sequence[str],
  *,
  dataset: str,
  source: pathlib.Path,
  seed: int,
  fractions: Mapping[str, float],
  skipped: Sequence[str],
  cases: Mapping[str, Mapping] | None = None,
  unit: str = "image",
) -> dict:
  """Reads the split file at `path`, or makes the seeded split and writes it there.

  The file records the dataset, seed, source folder, fractions, the case ids of each split, the
  skipped files and per-case metadata (`cases`, e.g. shape and voxel spacing). A file that lists
  other case ids than the folder now holds is an error (never silently re-split).

  Args:
    path: the split file.
    ids: the folder's case ids.
    dataset: the dataset's name, recorded.
    source: the folder the cases come from, recorded and checked.
    seed: the split's seed.
    fractions: {split: share of the cases}.
    skipped: the files that were not read, recorded.
    cases: per-case metadata to record (shape, spacing), or None.
    unit: what a case is ("image" or "volume"), for the messages.

  Returns:
    The split file's content (a dict; 'splits' maps split name -> sorted case ids).
  """
  ids = sorted(ids)
  if path.exists():
    try:
      content = json.loads(path.read_text())
      listed = sorted(i for s in SPLITS for i in content["splits"][s])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"cannot read split file {path}: {e}; delete it to re-split") from e
    if listed != ids:
      gone, new = sorted(set(listed) - set(ids)), sorted(set(ids) - set(listed))
      raise DataError(
        f"split file {path} does not match {source}: missing from the folder "
        f"{_listed(gone) or 'none'}; not in the file {_listed(new) or 'none'}. "
        f"Delete the file (or use another data_dir) to re-split"
      )
    if content.get("source") != str(source):
      logging.info(
        "split file %s was made from %s; reused for %s (same %s ids)",
        path,
        content.get("source"),
        source,
        unit,
      )
    logging.info("read split file %s", path)
    return content
  content = {
    "format_version": SPLIT_FILE_VERSION,
    "dataset": dataset,
    "source": str(source),
    "seed": seed,
    "unit": unit,
    "fractions": dict(fractions),
    "counts": split_counts(len(ids), fractions),
    "splits": make_splits(ids, fractions=fractions, seed=seed),
    "num_skipped_files": len(skipped),
    "skipped_files": list(skipped),
  }
  if cases is not None:
    content["cases"] = {k: dict(v) for k, v in sorted(cases.items())}
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, json.dumps(content, indent=1))  # never half a split file
  logging.info("wrote split file %s: %s", path, content["counts"])
  return content


def report_skipped(skipped: Sequence[str], where: object) -> None:
  if skipped:
    logging.warning(
      "skipped %d entries in %s that are not data files: %s",
      len(skipped),
      where,
      _listed(list(skipped)),
    )
