"""From a dataset config to seeded, resumable grain iterators (MetaDCSeg §4.1, App. A.2).

Every dataset, synthetic or real, is a TFDS array_record builder giving random-access 'train',
'val' and 'test' sources of records {"image" (H,W,C) float32, "label" (H,W) uint8, "case_id",
"slice_index"}. This module
  1. carves the clean meta split out of train (MetaDCSeg §4.1: 2%, at least one meta batch),
  2. attaches noisy labels to every training example (the meta split is never corrupted),
  3. validates what it reads (label range, shapes, empty splits) with errors naming the example,
  4. builds grain pipelines: shuffle -> augment -> batch, reshuffled and re-augmented each
     epoch, with an iterator state that a checkpoint holds.
"""

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from metadcseg_jax import files
from metadcseg_jax import noise
from metadcseg_jax.data import SPLITS
from metadcseg_jax.data import augment as augment_lib
from metadcseg_jax.data import builders
from metadcseg_jax.data import check_labels
from metadcseg_jax.data import real
from metadcseg_jax.data import synthetic
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError
from metadcseg_jax.noise import cache as noise_cache


def _as_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
    return _as_str(value.item())
  return str(value)


class Records:
  """Random-access view of one split: `source` restricted to `indices`, with noisy labels.

  `records[i]` is {"image" (H,W,C) float32, "label" (H,W) int32, "noisy_label" (H,W) int32,
  "index" int64 (the example's index in the source split)}; grain reads it directly.
  """

  def __init__(
    self,
    source,
    indices: Sequence[int],
    *,
    name: str,
    num_classes: int,
    image_shape: tuple[int, int, int],
    noisy_labels: np.ndarray | None = None,
  ):
    self.source = source
    self.indices = np.asarray(indices, dtype=np.int64)
    self.name = name
    self.num_classes = num_classes
    self.image_shape = tuple(image_shape)
    # Aligned with the *source* split (not with `indices`): noisy_labels[source_index].
    self.noisy_labels = noisy_labels

  def __len__(self) -> int:
    return len(self.indices)

  def subset(self, k: int) -> "Records":
    """The first `k` examples of this split."""
    return Records(
      self.source,
      self.indices[:k],
      name=self.name,
      num_classes=self.num_classes,
      image_shape=self.image_shape,
      noisy_labels=self.noisy_labels,
    )

  def case_id(self, i: int) -> str:
    return _as_str(self.source[int(self.indices[i])]["case_id"])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    index = int(self.indices[i])
    record = self.source[index]
    image = np.asarray(record["image"], dtype=np.float32)
    label = np.asarray(record["label"])
    where = f"{self.name} example {index} (case {_as_str(record.get('case_id', index))})"
    if image.shape != self.image_shape:
      raise DataError(f"{where}: image shape {image.shape} != expected {self.image_shape}")
    if label.shape != image.shape[:2]:
      raise DataError(
        f"{where}: label shape {label.shape} does not match image shape {image.shape[:2]}"
      )
    check_labels(label, self.num_classes, where)
    if not np.all(np.isfinite(image)):
      raise DataError(f"{where}: image contains NaN or Inf")
    noisy = label if self.noisy_labels is None else self.noisy_labels[index]
    return {
      "image": image,
      "label": label.astype(np.int32),
      "noisy_label": np.asarray(noisy).astype(np.int32),
      "index": np.int64(index),
    }


@dataclasses.dataclass
class DataSplits:
  """What the trainer needs from a dataset."""

  train: Records  # noisy-labelled training examples, meta split removed
  meta: Records  # clean meta split (noisy_label == label)
  val: Records
  test: Records
  info: dict[str, Any]  # sizes, meta indices, noise summary, per-case spacing (mm)


def open_dataset(data: ml_collections.ConfigDict) -> tuple[dict[str, Any], str, dict]:
  """Builds (if needed) and opens the dataset named by `data.name`.

  Returns:
    ({split: random-access source}, dataset_key, spacing) where dataset_key names the exact
    build (it keys the noisy-label cache) and spacing maps case id -> voxel spacing in mm
    (slice, row, col) for volumetric datasets ({} otherwise).
  """
  data_dir = str(pathlib.Path(data.data_dir).expanduser().resolve())
  # Several runs may start on one fresh data folder at once: one builds, the others wait and
  # then open its build (two builds would swap files under each other's readers, and a failed
  # one's cleanup would remove the other's). The builders read what is built when made, so
  # they are made under the lock too.
  with files.exclusive(pathlib.Path(data_dir) / f".{data.name}.build.lock"):
    return _open_dataset(data, data_dir)


def _open_dataset(data: ml_collections.ConfigDict, data_dir: str):
  if data.name == "synthetic":
    sources = synthetic.load_synthetic(
      data_dir=data_dir,
      size=data.size,
      channels=data.channels,
      n_train=data.n_train,
      n_val=data.n_val,
      n_test=data.n_test,
      seed=data.seed,
    )
    key = synthetic.synthetic_builder_config(
      data.size, data.channels, data.n_train, data.n_val, data.n_test, data.seed
    ).name
    return sources, key, {}
  if not data.manual_dir:
    raise ConfigError(
      f"dataset {data.name!r} needs --config.data.manual_dir=<folder with the raw data>"
    )
  builder = real.get_dataset_builder(
    data.name,
    data_dir=data_dir,
    manual_dir=data.manual_dir,
    size=data.size,
    **builder_options(data),
  )
  sources = builders.prepare_sources(builder, splits=SPLITS, manual_dir=data.manual_dir)
  # resized_spacing gives (row, col, slice); a stacked volume is (slice, row, col).
  spacing = {
    c: (float(v[2]), float(v[0]), float(v[1]))
    for c, v in builder.info.metadata.get("pixel_spacing_mm", {}).items()
  }
  return sources, f"{data.name}/{builder.builder_config.name}", spacing


def builder_options(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """The real builder's options from `config.data` (unset ones keep the builder's default)."""
  cls = real.BUILDERS[data.name]
  given = {
    "mask_suffix": data.options.get("mask_suffix") or None,
    "train_slices": data.options.get("train_slices"),
    "modality": data.options.get("modality"),
    "mask_threshold": data.get("mask_threshold"),
  }
  if data.name == "folder":
    # The folder's channel and class counts come from the config itself.
    given.update(
      channels=data.channels, num_classes=None if data.num_classes == 2 else data.num_classes
    )
  return {k: v for k, v in given.items() if k in cls.OPTIONS and v is not None}


def _split_meta(
  n_train: int, *, fraction: float, min_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Seeded split of the training indices into (train, meta), MetaDCSeg §4.1 (2%, >= one batch)."""
  n_meta = max(int(math.ceil(fraction * n_train)), min_size)
  if n_meta >= n_train:
    raise ConfigError(
      f"meta split of {n_meta} examples leaves no training examples out of "
      f"{n_train}; lower config.data.meta_fraction or the meta batch size"
    )
  perm = np.random.default_rng([seed, 0x6D657461]).permutation(n_train)
  return np.sort(perm[n_meta:]), np.sort(perm[:n_meta])


def load_labels(source, name: str, num_classes: int) -> np.ndarray:
  """All labels of a split as (N,H,W) uint8, validated."""
  labels = []
  for i in range(len(source)):
    label = np.asarray(source[i]["label"])
    check_labels(label, num_classes, f"{name} example {i}")
    labels.append(label.astype(np.uint8))
  return np.stack(labels)


def prepare_data(config: ml_collections.ConfigDict, *, meta_batch_size: int) -> DataSplits:
  """Opens the dataset, splits off the meta set and attaches noisy labels.

  Args:
    config: the `data` sub-config (name, data_dir, size, channels, num_classes, meta_fraction,
      seed, meta_seed (None: seed), noise.{kind, seed, options}).
    meta_batch_size: the meta split holds at least one meta batch.

  Returns:
    DataSplits; `info` records sizes, the meta indices and the measured corruption.
  """
  sources, key, spacing = open_dataset(config)
  for split in SPLITS:
    if split not in sources or len(sources[split]) == 0:
      raise DataError(f"dataset {config.name!r} ({key}): split {split!r} is empty")
  shape = (config.size, config.size, config.channels)
  n_train = len(sources["train"])
  meta_seed = config.get("meta_seed")
  train_idx, meta_idx = _split_meta(
    n_train,
    fraction=config.meta_fraction,
    min_size=meta_batch_size,
    seed=config.seed if meta_seed is None else meta_seed,
  )
  clean = load_labels(sources["train"], f"{key}/train", config.num_classes)
  noisy, noise_info = _noisy_labels(clean, config, key)
  noisy[meta_idx] = clean[meta_idx]  # the meta split is never corrupted (MetaDCSeg §4.1)
  common = dict(num_classes=config.num_classes, image_shape=shape)
  splits = DataSplits(
    train=Records(sources["train"], train_idx, name=f"{key}/train", noisy_labels=noisy, **common),
    meta=Records(sources["train"], meta_idx, name=f"{key}/meta", **common),
    val=Records(sources["val"], np.arange(len(sources["val"])), name=f"{key}/val", **common),
    test=Records(sources["test"], np.arange(len(sources["test"])), name=f"{key}/test", **common),
    info={},
  )
  splits.info = {
    "dataset_key": key,
    "n_train": len(train_idx),
    "n_meta": len(meta_idx),
    "n_val": len(splits.val),
    "n_test": len(splits.test),
    "meta_indices": meta_idx.tolist(),
    "noise": noise_info,
    "spacing": spacing,
  }
  return splits


def noise_cache_dir(config: ml_collections.ConfigDict, key: str) -> str:
  """Where the noisy labels of dataset build `key` are cached (one folder per build)."""
  return str(pathlib.Path(config.data_dir).expanduser().resolve() / "noisy_labels" / key)


def noise_options(noise_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `metadcseg_jax.noise` options that apply to `noise_cfg.kind` (others: defaults)."""
  if noise_cfg.kind in noise.l2b.L2B_LEVELS:
    return {
      "scale_kernels_with_size": bool(noise_cfg.scale_kernels_with_size),
      "small_mask": str(noise_cfg.small_mask),
      "calibrate": bool(noise_cfg.get("calibrate", False)),
    }
  return {}


def _noisy_labels(
  clean: np.ndarray, config: ml_collections.ConfigDict, key: str
) -> tuple[np.ndarray, dict[str, Any]]:
  kind = config.noise.kind
  if kind in ("none", "", None):
    return clean.copy(), {"kind": "none"}
  cache_dir = noise_cache_dir(config, key)
  options = noise_options(config.noise)
  noisy = noise_cache.cached_noisy_labels(
    clean, cache_dir=cache_dir, dataset_key=key, kind=kind, seed=config.noise.seed, options=options
  )
  corruption = noise.measured_corruption(clean, noisy)
  info = {
    "kind": kind,
    "seed": config.noise.seed,
    "options": options,
    "corruption_mean": float(np.mean(corruption)),
    "corruption_std": float(np.std(corruption)),
    # The share of wrong pixels: what small-loss selection's forget rate should match.
    "pixel_error_rate": float(np.mean(clean != noisy)),
  }
  logging.info(
    "noisy labels %s: measured corruption 1-Dice = %.3f ± %.3f",
    kind,
    info["corruption_mean"],
    info["corruption_std"],
  )
  return noisy, info


def _collate(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def train_dataset(
  records: Records,
  *,
  batch_size: int,
  seed: int,
  augment: bool = True,
  augment_options: Mapping[str, Any] | None = None,
  transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
  num_threads: int = 2,
  prefetch: int = 4,
  num_workers: int = 0,
  shard_index: int = 0,
  num_shards: int = 1,
) -> grain.IterDataset:
  """Infinite stream of batches: each epoch reshuffled and re-augmented, epochs never mixed.

  Batch dict: "image" (B,H,W,C) float32, "label"/"noisy_label" (B,H,W) int32, "index" (B,),
  plus what `transform` (run per example after augmentation, e.g. a method's edge detector)
  adds. `iter(ds)` gives an iterator whose `get_state()` / `set_state()` a checkpoint stores.

  Several processes (`num_shards`, `shard_index` = jax.process_count(), process_index()):
  `batch_size` is the global batch; shard k yields rows [k·b, (k+1)·b), b = batch_size /
  num_shards, of every global batch, reading and augmenting only those examples. The global
  batches are the same for any number of shards (rows in the same order), and an iterator's
  state counts global batches, so a checkpoint resumes on a different number of processes.

  Args:
    num_workers: grain worker processes for reading, augmenting and `transform` (0: threads
      of this process).
  """
  if len(records) < batch_size:
    raise ConfigError(
      f"{records.name}: {len(records)} examples, fewer than one batch of {batch_size}"
    )
  if num_shards < 1 or not 0 <= shard_index < num_shards or batch_size % num_shards:
    raise ConfigError(
      f"{records.name}: a batch of {batch_size} does not split into {num_shards} equal "
      f"shards (shard {shard_index})"
    )
  local = batch_size // num_shards
  global_batches = len(records) // batch_size
  ds = grain.MapDataset.source(records).shuffle(seed=seed)
  if augment:
    options = dict(augment_options or {})
    ds = ds.random_map(lambda ex, rng: augment_lib.augment(ex, rng, **options), seed=seed + 1)
  if transform is not None:
    ds = ds.map(transform)
  # Batch before repeat so an epoch is exactly len // batch_size batches of its own examples;
  # chunk j of an epoch is rows [(j mod n)·b, ...) of global batch j // n (n = num_shards).
  ds = ds.batch(local, drop_remainder=True, batch_fn=_collate)
  ds = ds[: global_batches * num_shards][shard_index::num_shards].repeat(None)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def eval_batches(records: Records, batch_size: int, *, transform=None):
  """Batches over a split in order, the last one possibly smaller (no augmentation; `transform`
  as in `train_dataset`)."""
  ds = grain.MapDataset.source(records)
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(batch_size, batch_fn=_collate)
  for i in range(len(ds)):
    yield ds[i]


def save_info(splits: DataSplits, path: pathlib.Path) -> None:
  path.write_text(json.dumps(splits.info, indent=1))
