"""Files in and out of a trained model: images and volumes read into network inputs through the
run's preprocessing, masks and probabilities written back in each input's own geometry.

Inputs: 2D images (PNG, JPEG, BMP, TIFF), NIfTI volumes (.nii, .nii.gz; through nibabel) and
MHA/MHD volumes (through SimpleITK, where installed), or arrays. Outputs:
  * a 2D image's mask is a PNG of the image's height and width: 0/255 for two classes, the
    class index for more; its probabilities an (H,W,L) float32 `.npy`;
  * a NIfTI volume's mask is a NIfTI with the input's shape, affine and header (uint8 class
    indices); its probabilities a 4D float32 NIfTI (X,Y,Z,L) with the same affine;
  * an MHA/MHD volume's mask an MHA with the input's origin, spacing and direction.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from metadcseg_jax.data import preprocess
from metadcseg_jax.data import readers
from metadcseg_jax.errors import DataError

NIFTI_SUFFIXES = readers.NIFTI_SUFFIXES
ITK_SUFFIXES = (".mha", ".mhd")
IMAGE_SUFFIXES = readers.IMAGE_SUFFIXES
SUFFIXES = (*IMAGE_SUFFIXES, *NIFTI_SUFFIXES, *ITK_SUFFIXES)
# nnU-Net's channel files: <case>_<XXXX>.nii.gz.
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# ITU-R 601 luminance, as PIL's "L" conversion (`readers.read_image`).
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass
class Item:
  """One input read and prepared.

  Attributes:
    name: the output's stem.
    source: the input's path(s), or "<array>".
    layout: "image" (H,W), "nifti" (X,Y,Z, slices along Z) or "itk" (Z,Y,X).
    x: network inputs (N,size,size,C) float32 (N = 1 for an image, the slices of a volume).
    shape: (H, W) of each image or slice in the network's (row, column) order.
    geometry: what a volume's output copies from its input (a nibabel image, a SimpleITK
      image), or None.
    suffix: the output's file suffix.
  """

  name: str
  source: str
  layout: str
  x: np.ndarray
  shape: tuple[int, int]
  geometry: Any = None
  suffix: str = ".png"

  def to_file_layout(self, probs: np.ndarray) -> np.ndarray:
    """(N,H,W,L) per-slice probabilities -> the file's layout: (H,W,L), (X,Y,Z,L), (Z,Y,X,L)."""
    if self.layout == "image":
      return probs[0]
    if self.layout == "nifti":
      return np.ascontiguousarray(probs.transpose(2, 1, 0, 3))
    return probs


def suffix_of(path: pathlib.Path) -> str | None:
  """The input suffix of `path` (lower case), or None for a file the model cannot read."""
  found = readers.strip_suffix(path.name, SUFFIXES)
  return None if found is None else found[1].lower()


def stem_of(path: pathlib.Path) -> str:
  found = readers.strip_suffix(path.name, SUFFIXES)
  return path.name if found is None else found[0]


def read_input(x, pre: preprocess.Preprocessing) -> Item:
  """Reads `x` (a path, a list of per-channel paths, or an array) into the network's inputs.

  Raises:
    DataError: the file cannot be read, is not the kind the model segments (a volume for a 2D
      model, a 2D image for a volume model), or has another number of channels.
  """
  if isinstance(x, np.ndarray):
    return _from_array(x, pre)
  if isinstance(x, (list, tuple)):
    paths = [pathlib.Path(p) for p in x]
    return _read_volume(paths, pre, name=case_of(paths[0]))
  path = pathlib.Path(x)
  suffix = suffix_of(path)
  if suffix is None:
    raise DataError(f"{path}: not an image ({', '.join(SUFFIXES)})")
  if suffix in IMAGE_SUFFIXES:
    if pre.kind != "image":
      raise DataError(f"{path}: a 2D image; this model segments volumes slice by slice")
    image, _ = readers.read_image(path, channels=pre.channels)
    return Item(stem_of(path), str(path), "image", pre.image_input(image)[None], image.shape[:2])
  if pre.kind != "volume":
    raise DataError(f"{path}: a volume; this model segments 2D images")
  name = stem_of(path)
  if pre.channel_files:
    name = case_of(path)
  return _read_volume([path], pre, name=name)


def case_of(path: pathlib.Path) -> str:
  """The case of a channel file `<case>_<XXXX>` (nnU-Net), else the file's stem."""
  stem = stem_of(path)
  match = _CHANNEL_FILE.match(stem)
  return match["case"] if match else stem


def _from_array(x: np.ndarray, pre: preprocess.Preprocessing) -> Item:
  if pre.kind == "image":
    if x.ndim not in (2, 3):
      raise DataError(f"a 2D model takes (H,W) or (H,W,C) arrays, got {x.shape}")
    image = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    image = image[..., None] if image.ndim == 2 else image[..., :3]
    if image.shape[-1] != pre.channels:
      image = (
        np.repeat(image[..., :1], pre.channels, -1)
        if image.shape[-1] == 1
        else (image @ _LUMA)[..., None]
      )
    return Item("array", "<array>", "image", pre.image_input(image)[None], image.shape[:2])
  if x.ndim not in (3, 4):
    raise DataError(f"a volume model takes (X,Y,Z) or (X,Y,Z,M) arrays, got {x.shape}")
  volume = x[..., None] if x.ndim == 3 else _modalities(x, pre, "<array>")
  volume = np.ascontiguousarray(volume.transpose(2, 1, 0, 3)).astype(np.float32)
  return Item("array", "<array>", "nifti", pre.volume_input(volume), volume.shape[1:3])


def _modalities(x: np.ndarray, pre: preprocess.Preprocessing, where: str) -> np.ndarray:
  """The channels the model reads from the last axis of a multi-channel volume x (…, M)."""
  chosen = list(pre.modalities) if pre.modalities is not None else list(range(x.shape[-1]))
  if max(chosen) >= x.shape[-1] or len(chosen) != pre.channels:
    raise DataError(
      f"{where} has {x.shape[-1]} channels; the model reads {pre.channels} (channels {chosen})"
    )
  return x[..., chosen]


def _read_volume(paths: Sequence[pathlib.Path], pre: preprocess.Preprocessing, *, name: str):
  """A volume from one file (3D, or 4D with modalities) or one file per channel (nnU-Net's
  `<case>_<XXXX>`, the model's modalities picked by their index), as (S,H,W,C) raw
  intensities, prepared by `pre`."""
  if pre.channel_files:
    paths = _channel_files(paths, pre, name)
  first = paths[0]
  nifti = suffix_of(first) in NIFTI_SUFFIXES
  loaded = []
  for path in paths:
    try:
      loaded.append(_load(path, nifti))
    except ImportError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any reader error: the file is bad)
      raise DataError(f"cannot read volume file {path}: {e}") from e
  arrays, geometry = [a for a, _ in loaded], loaded[0][1]
  if len(arrays) > 1:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 3:
      raise DataError(f"channel files of {name} differ in shape or are not 3D: {sorted(shapes)}")
    volume = np.stack(arrays, axis=-1)
  else:
    volume = arrays[0]
    if volume.ndim == 3:
      volume = volume[..., None]
    elif not pre.channel_files:
      volume = _modalities(volume, pre, str(first))
  if volume.ndim != 4:
    raise DataError(f"{first}: expected a 3D volume (or 4D with channels), got {volume.shape}")
  if volume.shape[-1] != pre.channels:
    raise DataError(f"{first} gives {volume.shape[-1]} channels, the model reads {pre.channels}")
  if nifti:  # (X,Y,Z,C) -> (Z,Y,X,C): slices first, as the builders read them
    volume = volume.transpose(2, 1, 0, 3)
  volume = np.ascontiguousarray(volume, np.float32)
  x = pre.volume_input(volume, name=first)
  suffix = ".nii.gz" if nifti else ".mha"
  if nifti and first.name.lower().endswith(".nii"):
    suffix = ".nii"
  layout = "nifti" if nifti else "itk"
  return Item(name, ";".join(map(str, paths)), layout, x, volume.shape[1:3], geometry, suffix)


def _channel_files(paths: Sequence[pathlib.Path], pre, name: str) -> list[pathlib.Path]:
  """The files of the model's channels among a case's `<case>_<XXXX>` files, in its order."""
  by_channel = {}
  for path in paths:
    match = _CHANNEL_FILE.match(stem_of(path))
    if match is None:
      raise DataError(f"{path}: this model reads nnU-Net channel files, <case>_<XXXX>")
    by_channel[int(match["channel"])] = path
  want = list(pre.modalities) if pre.modalities is not None else list(range(pre.channels))
  missing = [c for c in want if c not in by_channel]
  if missing:
    found = ", ".join(f"_{c:04d}" for c in sorted(by_channel))
    raise DataError(
      f"case {name}: the model reads channels {['_%04d' % c for c in want]}, found {found}"
    )
  return [by_channel[c] for c in want]


def _load(path: pathlib.Path, nifti: bool) -> tuple[np.ndarray, Any]:
  """(array in the file's axis order, the image object) of a NIfTI or SimpleITK file."""
  if nifti:
    nib = readers.import_optional("nibabel", "nibabel")
    image = nib.load(str(path))
    return np.asarray(image.dataobj, np.float32), image
  sitk = readers.import_optional("SimpleITK", "SimpleITK")
  image = sitk.ReadImage(str(path))
  array = sitk.GetArrayFromImage(image).astype(np.float32)  # (Z,Y,X[,M])
  return array, image


def output_paths(item_name: str, suffix: str, out_dir: pathlib.Path, probabilities: bool):
  """The files an input's outputs go to: the mask, and the probabilities (or None).

  Args:
    item_name: the input's name without its suffix.
    suffix: the mask file's suffix (the input's kind: ".png", ".nii.gz", ...).
    out_dir: the output folder.
    probabilities: whether the probabilities are written too.
  """
  mask = out_dir / f"{item_name}{suffix}"
  if not probabilities:
    return mask, None
  prob_suffix = ".npy" if suffix == ".png" else suffix
  return mask, out_dir / f"{item_name}_probabilities{prob_suffix}"


def write_mask(item: Item, mask: np.ndarray, path: pathlib.Path, num_classes: int) -> None:
  """Writes `mask` (the file layout's shape, class indices) for `item` at `path` (atomically).

  Args:
    item: the input it was predicted for (its layout and geometry).
    mask: class indices, (H, W) or (S, H, W).
    path: the file to write.
    num_classes: L (two classes are written 0/255 in an image).
  """
  mask = mask.astype(np.uint8)
  if item.layout == "image":
    values = mask * 255 if num_classes == 2 else mask
    _write(path, lambda tmp: Image.fromarray(values.astype(np.uint8)).save(tmp, format="PNG"))
  else:
    _write_volume(item, mask, path)


def write_probabilities(item: Item, probs: np.ndarray, path: pathlib.Path) -> None:
  """Writes class probabilities (file layout, …, L) float32 for `item` at `path`."""
  probs = probs.astype(np.float32)
  if item.layout == "image":
    _write(path, lambda tmp: np.save(tmp, probs))
  else:
    _write_volume(item, probs, path, vector=True)


def _write_volume(item: Item, array: np.ndarray, path: pathlib.Path, *, vector=False) -> None:
  """`array` in the geometry of `item`'s volume: NIfTI with its affine and header (the data type
  and shape of `array`, no scaling), or SimpleITK's image information copied. `vector`: the last
  axis holds a vector per voxel (the class probabilities)."""
  if item.layout == "nifti":
    nib = readers.import_optional("nibabel", "nibabel")
    header = item.geometry.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    # The input's display window would show a mask of class indices as black.
    header["cal_min"], header["cal_max"] = 0, 0
    out = type(item.geometry)(array, item.geometry.affine, header)
    out.header.set_slope_inter(1, 0)
    _write(path, lambda tmp: nib.save(out, tmp))
  else:
    sitk = readers.import_optional("SimpleITK", "SimpleITK")
    out = sitk.GetImageFromArray(array, isVector=vector)
    out.CopyInformation(item.geometry)
    _write(path, lambda tmp: sitk.WriteImage(out, tmp, True))


def _write(path: pathlib.Path, save) -> None:
  """`save(tmp)` to a temporary name beside `path`, then renamed: a crash leaves no half file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
  tmp = path.with_name(f".{path.name}.tmp{suffix}")
  try:
    save(str(tmp))
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
