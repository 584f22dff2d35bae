"""From a dataset config to seeded, resumable grain iterators (MetaDCSeg §4.1, App. A.2).

Every dataset, synthetic or real, is a TFDS array_record builder giving random-access 'train',
'val' and 'test' sources of records {"image" (H,W,C) float32, "label" (H,W) uint8, "case_id",
"slice_index"}. This module
  1. carves the clean meta split out of train (MetaDCSeg §4.1: 2%, at least one meta batch;
     on a user's folder, the meta cases of its split, `metadcseg_jax.data.splits`),
  2. attaches noisy labels to every training example (injected only where
     `config.data.noise.kind` asks; the meta split and trusted masks are never corrupted),
  3. validates what it reads (label range, shapes, empty splits) with errors naming the example,
  4. builds grain pipelines: shuffle -> augment -> batch, reshuffled and re-augmented each
     epoch, with an iterator state that a checkpoint holds.
"""

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from metadcseg_jax import files
from metadcseg_jax.data import augment as augment_lib
from metadcseg_jax.data import builders
from metadcseg_jax.data import check_labels
from metadcseg_jax.data import noise
from metadcseg_jax.data import preprocess
from metadcseg_jax.data import real
from metadcseg_jax.data import SPLITS
from metadcseg_jax.data import splits as splits_lib
from metadcseg_jax.data import synthetic
from metadcseg_jax.data.noise import cache as noise_cache
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError


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


@dataclasses.dataclass
class Opened:
  """A built dataset.

  Attributes:
    sources: {split: random-access source}.
    key: names the exact build (it keys the noisy-label cache).
    spacing: case id -> voxel spacing in mm (slice, row, col) of the network's slices for
      volumetric datasets ({} otherwise).
    plan: a user's folder's split and trusted masks (`splits.Plan`), or None.
    metadata: what the builder recorded (class names, original files, spacing, agreement of
      the user's masks with their trusted versions); {} for the synthetic set.
  """

  sources: dict[str, Any]
  key: str
  spacing: dict
  plan: splits_lib.Plan | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def open_dataset(data: ml_collections.ConfigDict) -> tuple[dict[str, Any], str, dict]:
  """Builds (if needed) and opens the dataset named by `data.name`.

  Returns:
    ({split: random-access source}, dataset_key, spacing) as `Opened` describes them.
  """
  opened = open_built(data)
  return opened.sources, opened.key, opened.spacing


def open_built(
  data: ml_collections.ConfigDict, *, meta_batch_size: int = 1, workdir=None
) -> Opened:
  """Builds (if needed) and opens the dataset named by `data.name`; a user's folder is split
  around its trusted masks first (`splits.plan_for`: the fewest meta cases is one meta batch
  of images, one volume; a new split file is written in `workdir` by default)."""
  data_dir = str(pathlib.Path(data.data_dir).expanduser().resolve())
  # Several runs may start on one fresh data folder at once: one builds, the others wait and
  # then open its build (two builds would swap files under each other's readers, and a failed
  # one's cleanup would remove the other's). The builders read what is built when made, so
  # they are made under the lock too.
  with files.exclusive(pathlib.Path(data_dir) / f".{data.name}.build.lock"):
    return _open_dataset(data, data_dir, meta_batch_size, workdir)


def _open_dataset(data: ml_collections.ConfigDict, data_dir: str, meta_batch_size: int, workdir):
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
    return Opened(sources, key, {})
  if not data.manual_dir:
    raise ConfigError(
      f"dataset {data.name!r} needs --config.data.manual_dir=<folder with the raw data>"
    )
  cls = real.BUILDERS[data.name]
  plan = None
  if cls.TAKES_PLAN:
    ids, trusted_ids = cls.list_cases(
      pathlib.Path(data.manual_dir).expanduser(), dict(data.options)
    )
    # A volume is one case: its slices fill any meta batch.
    min_meta = 1 if cls.UNIT == "volume" else meta_batch_size
    plan = splits_lib.plan_for(data, ids, trusted_ids, min_meta=min_meta, workdir=workdir)
  builder = real.get_dataset_builder(
    data.name,
    data_dir=data_dir,
    manual_dir=data.manual_dir,
    size=data.size,
    plan=plan,
    **builder_options(data),
  )
  sources = builders.prepare_sources(builder, splits=SPLITS, manual_dir=data.manual_dir)
  # resized_spacing gives (row, col, slice); a stacked volume is (slice, row, col).
  spacing = {
    c: (float(v[2]), float(v[0]), float(v[1]))
    for c, v in builder.info.metadata.get("pixel_spacing_mm", {}).items()
  }
  key = f"{data.name}/{builder.builder_config.name}"
  return Opened(sources, key, spacing, plan, dict(builder.info.metadata))


def builder_options(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """The real builder's options from `config.data` (unset ones keep the builder's default)."""
  cls = real.BUILDERS[data.name]
  given = {
    "mask_suffix": data.options.mask_suffix or None,
    "train_slices": data.options.train_slices,
    "modality": data.options.modality,
    "mask_threshold": data.mask_threshold,
  }
  if data.name in ("folder", "decathlon"):
    # The channel and class counts come from the config itself.
    classes = data.num_classes
    given.update(
      channels=data.channels,
      num_classes=None if classes == 2 and data.name == "folder" else classes,
    )
  return {k: v for k, v in given.items() if k in cls.OPTIONS and v is not None}


def load_labels(source, name: str, num_classes: int) -> np.ndarray:
  """All labels of a split as (N,H,W) uint8, validated."""
  return _labels_and_cases(source, name, num_classes)[0]


def _labels_and_cases(source, name: str, num_classes: int) -> tuple[np.ndarray, list[str]]:
  """All labels of a split as (N,H,W) uint8, validated, and each record's case id."""
  labels, cases = [], []
  for i in range(len(source)):
    record = source[i]
    label = np.asarray(record["label"])
    check_labels(label, num_classes, f"{name} example {i}")
    labels.append(label.astype(np.uint8))
    cases.append(_as_str(record["case_id"]))
  return np.stack(labels), cases


def _meta_split(config, opened: Opened, cases: Sequence[str], meta_batch_size: int):
  """(train, meta) record indices of the train source: a user's folder's meta cases, else a
  seeded share of the records (MetaDCSeg §4.1: 2%, at least one meta batch)."""
  if opened.plan is None:
    meta_seed = config.meta_seed
    return splits_lib.meta_indices(
      len(cases),
      fraction=config.meta_fraction,
      min_size=meta_batch_size,
      seed=config.seed if meta_seed is None else meta_seed,
    )
  meta_cases = set(opened.plan.splits["meta"])
  is_meta = np.array([c in meta_cases for c in cases])
  if is_meta.sum() < meta_batch_size or is_meta.all():
    raise DataError(
      f"the meta split of {opened.plan.file or 'the split'} has {int(is_meta.sum())} images or "
      f"slices and leaves {int((~is_meta).sum())} to train: it needs at least one meta batch "
      f"({meta_batch_size}) and something to train on"
    )
  return np.flatnonzero(~is_meta), np.flatnonzero(is_meta)


def reference_kind(config: ml_collections.ConfigDict, plan: splits_lib.Plan | None) -> str:
  """What validation and test are scored against: "trusted" (verified masks of a user's
  folder), "clean" (masks the noise was injected into, or the synthetic set's truth), or
  "untrusted" (a user's masks as given: the scores measure agreement with them)."""
  if plan is not None and plan.has_trusted:
    return "trusted"
  injected = config.noise.kind not in ("none", "", None)
  if plan is not None and not injected:
    return "untrusted"
  return "clean"


def clean_meta_source(config: ml_collections.ConfigDict) -> str | None:
  """Where a run on `config.data` takes clean masks from (for the meta split), or None: a
  user's folder with no trusted masks named and no injected noise. Reads folder names only.

  The named datasets' published masks (and the synthetic set's truth) are their reference."""
  if config.name == "synthetic" or not real.BUILDERS[config.name].TAKES_PLAN:
    return "the dataset's reference masks"
  if config.noise.kind not in ("none", "", None):
    return f"the masks, with {config.noise.kind} noise injected into the training ones"
  if config.trusted_list:
    return f"config.data.trusted_list={config.trusted_list}"
  folder = pathlib.Path(config.manual_dir).expanduser() / splits_lib.TRUSTED_DIR
  if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
    return str(folder)
  return None


def prepare_data(
  config: ml_collections.ConfigDict, *, meta_batch_size: int, workdir=None
) -> DataSplits:
  """Opens the dataset, splits off the meta set and attaches noisy labels.

  Args:
    config: the `data` sub-config (name, data_dir, size, channels, num_classes, meta_fraction,
      seed, meta_seed (None: seed), noise.{kind, seed, options}, and for a user's folder
      trusted_list, trusted_split, split_file).
    meta_batch_size: the meta split holds at least one meta batch.
    workdir: the run's folder, where a user's folder's new split file is written (None: kept in
      memory unless config.data.split_file names a path).

  Returns:
    DataSplits; `info` records sizes, the meta indices, the measured corruption, a user's
    folder's split and trusted cases, and what validation and test are scored against.
  """
  opened = open_built(config, meta_batch_size=meta_batch_size, workdir=workdir)
  sources, key, spacing = opened.sources, opened.key, opened.spacing
  for split in SPLITS:
    if split not in sources or len(sources[split]) == 0:
      raise DataError(f"dataset {config.name!r} ({key}): split {split!r} is empty")
  shape = (config.size, config.size, config.channels)
  clean, cases = _labels_and_cases(sources["train"], f"{key}/train", config.num_classes)
  train_idx, meta_idx = _meta_split(config, opened, cases, meta_batch_size)
  noisy, noise_info = _noisy_labels(clean, config, key)
  noisy[meta_idx] = clean[meta_idx]  # the meta split is never corrupted (MetaDCSeg §4.1)
  trusted = set(opened.plan.trusted) if opened.plan is not None else set()
  trusted_idx = np.array([i for i, c in enumerate(cases) if c in trusted], np.int64)
  if trusted_idx.size:  # a verified mask is never replaced by injected noise either
    noisy[trusted_idx] = clean[trusted_idx]
    if noise_info["kind"] != "none":
      # What the untrusted training masks carry (the named datasets' figure, measured before
      # the meta split is reset, stays as it was: their tables and oracles read it).
      rest = np.setdiff1d(train_idx, trusted_idx)
      noise_info["untrusted_corruption_mean"] = float(
        np.mean(noise.measured_corruption(clean[rest], noisy[rest]))
      )
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
    "reference": reference_kind(config, opened.plan),
    "class_names": list(preprocess.class_names(config.num_classes, _class_names(config, opened))),
  }
  if opened.metadata.get("modalities") is not None:
    splits.info["modalities"] = list(opened.metadata["modalities"])
  splits.info["channel_files"] = bool(opened.metadata.get("channel_files", False))
  if opened.plan is not None:
    splits.info["split"] = opened.plan.summary()
    # Images or slices (a volume's slices each count) that train on their verified mask.
    splits.info["n_trusted_train"] = int(np.isin(trusted_idx, train_idx).sum())
    agreement = opened.metadata.get("given_vs_trusted_dice") or {}
    if agreement:
      dice = np.array(list(agreement.values()))
      # How far the user's masks were from the verified ones: their own noise level.
      splits.info["given_vs_trusted"] = {
        "n": int(dice.size),
        "one_minus_dice_mean": float(np.mean(1 - dice)),
        "one_minus_dice_std": float(np.std(1 - dice)),
      }
  if opened.metadata.get("case_files"):
    splits.info["case_files"] = dict(opened.metadata["case_files"])
    splits.info["source"] = str(pathlib.Path(config.manual_dir).expanduser().resolve())
  return splits


def _class_names(config: ml_collections.ConfigDict, opened: Opened):
  """config.data.class_names when set, else the dataset's (dataset.json), else None."""
  return config.class_names or opened.metadata.get("class_names") or None


def noise_cache_dir(config: ml_collections.ConfigDict, key: str) -> str:
  """Where the noisy labels of dataset build `key` are cached (one folder per build)."""
  return str(pathlib.Path(config.data_dir).expanduser().resolve() / "noisy_labels" / key)


def noise_options(noise_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `metadcseg_jax.data.noise` options that apply to `noise_cfg.kind` (others: defaults)."""
  if noise_cfg.kind in noise.l2b.L2B_LEVELS:
    return {
      "scale_kernels_with_size": bool(noise_cfg.scale_kernels_with_size),
      "small_mask": str(noise_cfg.small_mask),
      "calibrate": bool(noise_cfg.calibrate),
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
  files.write_atomic(path, json.dumps(splits.info, indent=1))
