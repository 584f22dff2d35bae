"""TFDS builders for the project's datasets: array_record files, no TensorFlow.

Every dataset of the project (synthetic, Kvasir-SEG, PROMISE12, MSD, image
folders) is a `SegmentationBuilder`: a `tfds.core.GeneratorBasedBuilder` that
writes fixed-size 2D examples

  {"image": (H, W, C) float32, "label": (H, W) uint8,
   "case_id": text, "slice_index": int32 scalar}

to `array_record` files and reads them back through `builder.as_data_source()`
(random access, numpy dicts; grain reads such a source directly). TensorFlow is
never imported: the default tfrecord format, `as_dataset` and
`tfds.features.Image` fed numpy arrays all need it, so images are
`tfds.features.Tensor`.

What a data source returns per record (checked with tfds 4.9.10): a dict with
"image" a float32 (H, W, C) array, "label" a uint8 (H, W) array, "slice_index"
a plain Python `int` (stored as int32), and "case_id" as `bytes` (not `str`:
decode with `.decode()`).

Records are stored in key order (`disable_shuffling=True`): generators must
yield integer keys, and record i of a split is the example with the i-th
smallest key, so a loader can map an index back to its case. Shuffle in the
input pipeline (grain), not on disk.

Offline: `prepare_sources` builds with `try_download_gcs=False` and never calls
the download manager; tfds 4.9.10 also ships with GCS look-ups disabled
(`gcs_utils._is_gcs_disabled`). Building is deterministic when the generator
is: the same config gives byte-identical files.

A real-data builder subclasses `SegmentationBuilder`, sets `VERSION`,
`BUILDER_CONFIGS` (`SegmentationConfig` subclasses with the fixed `height`,
`width`, `channels`), `DESCRIPTION`/`HOMEPAGE`/`CITATION`, and implements
`_split_generators` (the raw files come from `dl_manager.manual_dir`, which
`prepare_sources(..., manual_dir=...)` sets) yielding
`(int_key, self.encode_example(...))`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from metadcseg_jax import files
from metadcseg_jax.data import check_labels
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError

FILE_FORMAT = "array_record"

# Builds are logged by this project; TFDS's progress bars would flood a log file.
tfds.disable_progress_bar()

DataSource = Sequence[Mapping[str, Any]]


def segmentation_features(height: int, width: int, channels: int) -> tfds.features.FeaturesDict:
  """The features of every project dataset, for fixed (H, W, C)."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Tensor(shape=(height, width, channels), dtype=np.float32),
      "label": tfds.features.Tensor(shape=(height, width), dtype=np.uint8),
      "case_id": tfds.features.Text(),
      "slice_index": tfds.features.Tensor(shape=(), dtype=np.int32),
    }
  )


@dataclasses.dataclass(eq=False, kw_only=True)
class SegmentationConfig(tfds.core.BuilderConfig):
  """A builder config with the fixed example shape.

  Attributes:
    height: image height H.
    width: image width W.
    channels: image channels C.
    num_classes: label values are in {0, ..., num_classes - 1}.
  """

  height: int = 64
  width: int = 64
  channels: int = 1
  num_classes: int = 2

  def __post_init__(self):
    for field in ("height", "width", "channels", "num_classes"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(
          f"{type(self).__name__}.{field} must be a positive integer, got {value!r}"
        )
    if self.num_classes > 256:
      raise ConfigError(f"num_classes={self.num_classes} does not fit the uint8 labels")


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the project's builders: fixed-size 2D slices in array_record.

  Abstract (`_split_generators` is left to subclasses), so TFDS registers it
  as an abstract builder and it cannot be instantiated.
  """

  BUILDER_CONFIGS: list[SegmentationConfig] = []
  DESCRIPTION = "A 2D segmentation dataset of metadcseg-jax."
  HOMEPAGE = ""
  CITATION = ""

  def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
    if file_format != FILE_FORMAT:
      raise ValueError(
        f"file_format must be {FILE_FORMAT!r} (the only random-access "
        f"format that works without TensorFlow), got {file_format!r}"
      )
    config = kwargs.get("config")
    if isinstance(config, tfds.core.BuilderConfig):
      predefined = type(self).builder_configs.get(config.name)
      if predefined is not None:
        # Pass predefined configs by name: TFDS rejects an equal copy of one,
        # and unpickling a builder (grain workers) creates such a copy.
        if dataclasses.asdict(predefined) != dataclasses.asdict(config):
          raise ValueError(
            f"config {config.name!r} differs from the predefined config of "
            f"that name: {config} vs {predefined}"
          )
        kwargs["config"] = config.name
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if not isinstance(config, SegmentationConfig):
      raise ValueError(
        f"{type(self).__name__} needs a SegmentationConfig, got {type(config).__name__}"
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=segmentation_features(config.height, config.width, config.channels),
      homepage=self.HOMEPAGE,
      citation=self.CITATION,
      disable_shuffling=True,
    )

  def encode_example(
    self,
    *,
    image: np.ndarray,
    label: np.ndarray,
    case_id: str,
    slice_index: int = 0,
  ) -> dict[str, Any]:
    """Checks one example against the config and returns its feature dict.

    Args:
      image: (H, W, C) float array.
      label: (H, W) integer array in {0, ..., num_classes - 1}.
      case_id: identifier of the case (patient, volume, image file).
      slice_index: index of the 2D slice in its volume (0 for 2D data).

    Returns:
      the dict the features encode.

    Raises:
      ValueError: naming the case, on a wrong shape, non-finite image or
        out-of-range label.
    """
    config = self.builder_config
    image = np.asarray(image)
    label = np.asarray(label)
    want = (config.height, config.width, config.channels)
    if image.shape != want:
      raise DataError(
        f"case {case_id!r} slice {slice_index}: image shape {image.shape}, "
        f"config {config.name!r} wants {want}"
      )
    if label.shape != want[:2]:
      raise DataError(
        f"case {case_id!r} slice {slice_index}: label shape {label.shape}, "
        f"config {config.name!r} wants {want[:2]}"
      )
    if not np.all(np.isfinite(image)):
      raise DataError(f"case {case_id!r} slice {slice_index}: image has non-finite values")
    check_labels(label, config.num_classes, f"case {case_id!r} slice {slice_index}")
    return {
      "image": image.astype(np.float32),
      "label": label.astype(np.uint8),
      "case_id": str(case_id),
      "slice_index": np.int32(slice_index),
    }


def offline_download_config(
  *, manual_dir: str | os.PathLike | None = None
) -> tfds.download.DownloadConfig:
  """A DownloadConfig that reuses prepared data and never asks GCS."""
  return tfds.download.DownloadConfig(
    manual_dir=None if manual_dir is None else os.fspath(manual_dir),
    download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    try_download_gcs=False,
  )


def prepare_sources(
  builder: SegmentationBuilder,
  *,
  splits: Sequence[str] | None = None,
  manual_dir: str | os.PathLike | None = None,
) -> dict[str, DataSource]:
  """Builds the dataset if it is not on disk yet; returns its data sources.

  Args:
    builder: a constructed builder (its data_dir and config fixed).
    splits: the splits to return; default all splits of the dataset.
    manual_dir: where the raw files of a real dataset lie.

  Returns:
    {split: data source}; each source has `len` and `__getitem__` returning a
    numpy dict (see the module docstring for the types).
  """
  if not isinstance(builder, SegmentationBuilder):
    raise ValueError(f"builder must be a SegmentationBuilder, got {type(builder).__name__}")
  # A failed build (a bad file halfway through) must not leave half-made folders or a split
  # file behind: the next attempt would trip over them.
  root = pathlib.Path(builder.data_dir_root) / builder.name
  before = files.snapshot(root)
  try:
    builder.download_and_prepare(download_config=offline_download_config(manual_dir=manual_dir))
  except BaseException:
    files.remove_new(root, before)
    raise
  available = tuple(builder.info.splits.keys())
  splits = available if splits is None else tuple(splits)
  missing = [s for s in splits if s not in available]
  if missing:
    raise ValueError(
      f"splits {missing} not in {builder.name}/{builder.builder_config_name} "
      f"(has {sorted(available)})"
    )
  return {s: builder.as_data_source(split=s) for s in splits}
