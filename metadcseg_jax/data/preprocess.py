"""A run's preprocessing as one object: raw file in, network input out, and back to the file's
geometry. The dataset builders and `metadcseg-predict` go through the same functions, so a
prediction on a file sees exactly the input the network saw in training.

    pre = preprocess.for_data(config.data, class_names)   # what a run records in its model
    x = pre.image_input(image)              # (H,W,C) in [0, 1] -> (size,size,C) float32
    x = pre.volume_input(volume)            # (S,H,W,M) raw -> (S,size,size,C) float32
    probs = pre.restore(p, (H, W))          # (N,size,size,L) -> (N,H,W,L)

Intensities ("intensity"):
  * "unit": 2D photographs read to [0, 1] (8-bit / 255, 16-bit / 65535), nothing else
    (Kvasir-SEG, a folder of images);
  * "image_zscore": each image to zero mean and unit std over its pixels and channels (the
    synthetic set's own normalisation);
  * "zscore": each volume channel to zero mean and unit std over the whole volume (PROMISE12,
    MSD Heart, a Decathlon-layout folder);
  * "zscore_nonzero": statistics over the nonzero voxels only, zero kept outside
    (skull-stripped MSD Brain).
Sizes: images and slices are resized to size x size, bilinear with antialiasing when shrinking
(PIL); class probabilities are resized back the same way, then argmax'd.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from metadcseg_jax.data import readers
from metadcseg_jax.errors import DataError

KINDS = ("image", "volume")
INTENSITIES = ("unit", "image_zscore", "zscore", "zscore_nonzero")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a run turns a file into the network's input.

  Attributes:
    kind: "image" (2D files) or "volume" (3D, predicted slice by slice along the slice axis,
      the last array axis of a NIfTI file, the first of SimpleITK's arrays).
    size: the side of the square network input.
    channels: input channels C (1: grey, 3: RGB; volumes: the modalities used).
    intensity: one of `INTENSITIES` (module docstring).
    num_classes: L, classes including background.
    class_names: the L class names, background first.
    modalities: volumes: the index of each channel used in the file's modality axis (None:
      the file's only channel, or all in order).
    channel_files: volumes come as one file per channel, `<case>_<XXXX>` (nnU-Net's layout).
  """

  kind: str
  size: int
  channels: int
  intensity: str
  num_classes: int
  class_names: tuple[str, ...]
  modalities: tuple[int, ...] | None = None
  channel_files: bool = False

  def __post_init__(self):
    if self.kind not in KINDS or self.intensity not in INTENSITIES:
      raise ValueError(f"unknown preprocessing {self.kind!r}/{self.intensity!r}")
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["class_names"] = list(self.class_names)
    out["modalities"] = None if self.modalities is None else list(self.modalities)
    return out

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Preprocessing":
    d = dict(d)
    d["class_names"] = tuple(d["class_names"])
    d["modalities"] = None if d.get("modalities") is None else tuple(d["modalities"])
    return cls(**d)

  def image_input(self, image: np.ndarray) -> np.ndarray:
    """(H,W,C) float in [0, 1] (`readers.read_image`) -> (size,size,C) float32."""
    if image.ndim != 3 or image.shape[-1] != self.channels:
      raise DataError(f"expected an (H, W, {self.channels}) image, got {image.shape}")
    image = readers.resize_image(image.astype(np.float32), self.size)
    if self.intensity == "image_zscore":
      image = image_zscore(image)
    return image

  def volume_input(self, volume: np.ndarray, *, name: object = "volume") -> np.ndarray:
    """(S,H,W,C) raw intensities -> (S,size,size,C) float32 network inputs."""
    if volume.ndim != 4 or volume.shape[-1] != self.channels:
      raise DataError(f"expected an (S, H, W, {self.channels}) volume, got {volume.shape}")
    normalised = normalise_volume(volume, self.intensity, name=name)
    return np.stack([readers.resize_image(s, self.size) for s in normalised])

  def restore(self, probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Class probabilities (N,size,size,L) resized to (N,H,W,L), `shape` = (H, W), and
    renormalised (bilinear resizing keeps sums to float rounding)."""
    h, w = int(shape[0]), int(shape[1])
    if probs.shape[1:3] == (h, w):
      return probs.astype(np.float32)
    out = np.stack([readers.resize_image(p, (h, w)) for p in probs.astype(np.float32)])
    return out / np.maximum(out.sum(-1, keepdims=True), 1e-12)


def normalise_volume(volume: np.ndarray, intensity: str, *, name: object = "volume") -> np.ndarray:
  """(S,H,W,C) raw intensities -> the same shape, each channel normalised (float32) as
  `intensity` ("zscore" or "zscore_nonzero") says."""
  if intensity not in ("zscore", "zscore_nonzero"):
    raise ValueError(f"volumes are z-scored, got intensity {intensity!r}")
  region = intensity == "zscore_nonzero"
  return np.stack(
    [
      readers.zscore(v, region=v != 0 if region else None, name=name)
      for v in np.moveaxis(volume, -1, 0)
    ],
    axis=-1,
  )


def image_zscore(image: np.ndarray) -> np.ndarray:
  """(H,W,C) -> zero mean, unit std over all pixels and channels (a constant image: centred)."""
  x = image.astype(np.float64)
  std = x.std()
  return ((x - x.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def class_names(num_classes: int, given: str | Sequence[str] | None = None) -> tuple[str, ...]:
  """The L class names, background first: `given` (L names, or L − 1 foreground names, as a
  list or comma-separated), else "background", "foreground" (L = 2) or "class1", ...

  Raises:
    DataError: `given` names another number of classes.
  """
  if isinstance(given, str):
    given = [g.strip() for g in given.split(",") if g.strip()]
  if given:
    names = list(given)
    if len(names) == num_classes - 1:
      names = ["background", *names]
    if len(names) != num_classes:
      raise DataError(
        f"{len(given)} class names {list(given)} for {num_classes} classes: give "
        f"{num_classes} (background first) or {num_classes - 1}"
      )
    return tuple(names)
  if num_classes == 2:
    return ("background", "foreground")
  return ("background", *(f"class{c}" for c in range(1, num_classes)))


# How each dataset's images reach the network (the builders' own choices, module docstring).
_DATASETS = {
  "synthetic": ("image", "image_zscore"),
  "kvasir_seg": ("image", "unit"),
  "folder": ("image", "unit"),
  "promise12": ("volume", "zscore"),
  "msd_heart": ("volume", "zscore"),
  "msd_brain": ("volume", "zscore_nonzero"),
  "decathlon": ("volume", "zscore"),
}


def intensity_of(dataset: str) -> str:
  """The intensity normalisation of `dataset` (`config.data.name`)."""
  return _DATASETS[dataset][1]


def for_data(
  data,
  names: Sequence[str] | None = None,
  modalities: Sequence[int] | None = None,
  channel_files: bool = False,
) -> Preprocessing:
  """The preprocessing of a run on `config.data` (`data`), with the dataset's class names and,
  for volumes, the modalities (channel indices) it read and whether they come one file per
  channel.

  Args:
    data: `config.data`.
    names: the class names, background first (None: `config.data.class_names`, or class<k>).
    modalities: a volume dataset's channel indices, or None.
    channel_files: whether a volume's channels come one file per channel (nnU-Net's
      `<case>_<XXXX>`).
  """
  kind, intensity = _DATASETS[data.name]
  return Preprocessing(
    kind=kind,
    size=int(data.size),
    channels=int(data.channels),
    intensity=intensity,
    num_classes=int(data.num_classes),
    class_names=class_names(int(data.num_classes), names or data.class_names or None),
    modalities=None if modalities is None else tuple(int(m) for m in modalities),
    channel_files=bool(channel_files),
  )
