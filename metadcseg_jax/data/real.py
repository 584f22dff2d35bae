"""Real datasets as TFDS array_record builders: Kvasir-SEG, PROMISE12, MSD Brain/Heart, a folder.

Each builder reads the user's raw folder (`manual_dir`, never downloaded) and writes 2D records
{"image" (size,size,C) float32, "label" (size,size) uint8, "case_id", "slice_index"} for the
splits 'train', 'val' and 'test', the record format of the synthetic set, so
`load_dataset(name, ...)` is a drop-in for it.

Decisions (see the module docstrings of `readers` for file conventions):
  * Sizes (builder configs): the paper's Table 8 input sizes by default (Kvasir-SEG 256,
    PROMISE12 144, MSD 160, folder 256); images bilinear with antialiasing, labels nearest.
  * Intensities: 2D photographs x / 255 in [0, 1] (per-channel statistics are left to the model's
    input pipeline); MRI volumes z-scored per volume before slicing, over the whole volume
    (PROMISE12, Heart) or over its nonzero voxels with zero kept outside (Brain; the Decathlon
    brain volumes are skull-stripped with zero background).
  * Splits, by case (a volume never straddles splits), seeded, written once to
    `<data_dir>/<name>/splits_seed<seed>.json` and reread on every later build at any size; a
    copy lands in each build as `splits.json` (`read_split_file`). A user's folder (`folder`,
    `decathlon`) is split four ways around its trusted masks instead, from its own split file
    (`metadcseg_jax.data.splits`), whose digest names the build. Proportions:
    Kvasir-SEG 80/10/10 % (800/100/100 of 1000, as in the paper); PROMISE12 72/8/20 % (of the
    50 training cases: 40 train / 10 test as in the paper, with 4 of the 40 carved out as
    validation, so 36/4/10); MSD Brain 80/10/10 % (387/48/49 of 484: the paper's 387 train / 49
    test); MSD Heart 70/10/20 % (14/2/4 of 20; the paper gives no split, 4 test volumes rather
    than 2 for a steadier per-volume mean); a folder without trusted masks 80/10/10 %. Test
    gets ceil(f n), val round(f n), train the rest, each >= 1.
  * Slices: axial. All slices of every split by default (`train_slices="all"`): per-volume
    metrics need whole volumes in val/test, and dropping empty training slices would change the
    foreground share the noise model and DCD see. `train_slices="foreground"` keeps training
    slices with label > 0 only, `"nonzero"` those with any nonzero image voxel (drops the empty
    slices above and below the head).
  * MSD Brain: one modality, FLAIR by default (whole tumour is defined on FLAIR; the paper says
    "T1-weighted", which we could not reconcile with whole-tumour labels), label = label > 0.
    MSD Heart (Task02, mono-modal MRI of the left atrium): label > 0.
  * Voxel spacing (row, col, slice) in mm of each case is stored in the split file, and the
    spacing after resizing in the builder's metadata (`info.metadata["pixel_spacing_mm"]`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, ClassVar, Mapping

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from metadcseg_jax import files
from metadcseg_jax.data import SPLITS
from metadcseg_jax.data import builders
from metadcseg_jax.data import preprocess
from metadcseg_jax.data import readers
from metadcseg_jax.data import splits as splits_lib
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError

SLICE_POLICIES = ("all", "foreground", "nonzero")
_SPLIT_FILE = "splits.json"  # copy kept inside each prepared build


@dataclasses.dataclass(eq=False, kw_only=True)
class RealConfig(builders.SegmentationConfig):
  """A build of a real dataset: square size (= height = width), split seed, options."""

  seed: int = 0
  options: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def size(self) -> int:
    return self.height


def _name_part(value: Any) -> str:
  text = "none" if value is None else str(value)
  return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text)


class _RealBuilder(builders.SegmentationBuilder, skip_registration=True):
  """Shared machinery: configs, layout checks, split file, slice policy, metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the raw dataset folder as manual_dir."
  BUILDER_CONFIGS: ClassVar[list[RealConfig]] = []  # filled per class: the Table 8 size
  DEFAULT_SIZE: ClassVar[int] = 256
  FRACTIONS: ClassVar[Mapping[str, float]] = {"train": 0.8, "val": 0.1, "test": 0.1}
  OPTIONS: ClassVar[Mapping[str, Any]] = {}  # option name -> default
  UNIT: ClassVar[str] = "image"
  CHANNELS: ClassVar[int | None] = None  # None: decided per build (folder)

  def __init__(
    self,
    *,
    manual_dir: str | pathlib.Path | None = None,
    plan: splits_lib.Plan | None = None,
    **kwargs,
  ):
    self._manual_dir = manual_dir
    # A user's folder: the four-way split and the trusted masks (`splits.Plan`), whose digest
    # is part of the config's name; None: the builder's own seeded split.
    self._plan = plan
    super().__init__(**kwargs)

  # Whether the builder takes a user's split and trusted masks (`metadcseg_jax.data.splits`).
  TAKES_PLAN: ClassVar[bool] = False

  @classmethod
  def make_config(
    cls,
    *,
    size: int | None = None,
    seed: int = 0,
    manual_dir: str | pathlib.Path | None = None,
    **options,
  ) -> RealConfig:
    """The config of one build; its name encodes everything that changes the records."""
    size = cls.DEFAULT_SIZE if size is None else size
    if not isinstance(size, (int, np.integer)) or size < 8:
      raise ConfigError(f"size must be an integer >= 8, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
      raise ConfigError(f"unknown options {unknown} for {cls.name}; known: {sorted(cls.OPTIONS)}")
    full = {**cls.OPTIONS, **options}
    cls._check_options(full)
    parts = [f"size{int(size)}"] + ([f"seed{int(seed)}"] if seed else [])
    parts += [f"{k}-{_name_part(v)}" for k, v in sorted(full.items()) if v != cls.OPTIONS[k]]
    parts += cls._extra_name_parts(manual_dir)
    name = "_".join(parts)
    predefined = cls.builder_configs.get(name)
    if predefined is not None:  # TFDS insists on the very object of BUILDER_CONFIGS
      return predefined
    return cls._new_config(name, int(size), int(seed), full)

  @classmethod
  def _new_config(cls, name: str, size: int, seed: int, options: Mapping[str, Any]):
    return RealConfig(
      name=name,
      height=size,
      width=size,
      channels=int(cls.CHANNELS or options["channels"]),
      num_classes=int(options.get("num_classes") or 2),
      seed=seed,
      options=dict(options),
      description=f"{cls.name} at {size}x{size}, split seed {seed}, options {options}",
    )

  @classmethod
  def _check_options(cls, options: Mapping[str, Any]) -> None:
    if "train_slices" in options and options["train_slices"] not in SLICE_POLICIES:
      raise ConfigError(
        f"train_slices must be one of {SLICE_POLICIES}, got {options['train_slices']!r}"
      )

  @classmethod
  def _extra_name_parts(cls, manual_dir) -> list[str]:
    del manual_dir
    return []

  @property
  def config(self) -> RealConfig:
    return self.builder_config

  def _info(self) -> tfds.core.DatasetInfo:
    # The base's info plus a MetadataDict (split, spacing, slice counts; saved with the build).
    info = super()._info()
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=info.features,
      homepage=info.homepage,
      citation=info.citation,
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  # -- layout and splits --------------------------------------------------------------------

  def _root(self, dl_manager) -> pathlib.Path:
    root = self._manual_dir
    if root is None:
      try:
        root = dl_manager.manual_dir
      except AssertionError as e:  # TFDS's way of saying the folder is missing or empty
        raise DataError(f"building {self.name} needs manual_dir, the raw data folder: {e}") from e
    return readers.require_dir(pathlib.Path(root).expanduser().resolve(), f"{self.name} raw data")

  def split_file_path(self, root: pathlib.Path | None = None) -> pathlib.Path:
    """Where the (size-independent) split of this dataset and seed lives."""
    stem = "_".join(["splits"] + self._extra_name_parts(root) + [f"seed{self.config.seed}"])
    return pathlib.Path(self.data_dir_root) / self.name / f"{stem}.json"

  def _scan(self, root: pathlib.Path):
    """Returns (cases {id: payload}, skipped [relative paths], per-case metadata or None)."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    root = self._root(dl_manager)
    cases, skipped, case_meta = self._scan(root)
    readers.report_skipped(skipped, root)
    if self._plan is not None:
      content = self._plan_content(root, list(cases), skipped, case_meta)
    else:
      content = readers.load_or_make_splits(
        self.split_file_path(root),
        list(cases),
        dataset=self.name,
        source=root,
        seed=self.config.seed,
        fractions=self.FRACTIONS,
        skipped=skipped,
        cases=case_meta,
        unit=self.UNIT,
      )
    files.write_atomic(pathlib.Path(self.data_dir, _SPLIT_FILE), json.dumps(content, indent=1))
    self._record_metadata(content)
    self.info.metadata["case_files"] = {
      c: {
        **self._case_files(root, payload),
        **({"spacing_mm": case_meta[c]["spacing_mm"]} if case_meta else {}),
      }
      for c, payload in sorted(cases.items())
    }
    return {
      s: self._generate_examples(s, [(c, cases[c]) for c in content["splits"][s]]) for s in SPLITS
    }

  def _plan_content(self, root, ids, skipped, case_meta) -> dict[str, Any]:
    """The split file content of a build made from a user's `splits.Plan`: the TFDS train
    split holds the train and meta cases (the pipeline carves the meta ones out by case id)."""
    plan = self._plan
    listed = {c for v in plan.splits.values() for c in v}
    missing = sorted(listed - set(ids))
    if missing:
      raise DataError(f"split {plan.file or '(made here)'} lists {missing[0]!r}, not in {root}")
    content = {
      "format_version": readers.SPLIT_FILE_VERSION,
      "dataset": self.name,
      "source": str(root),
      "seed": self.config.seed,
      "unit": self.UNIT,
      "splits": {
        "train": sorted(plan.splits["train"] + plan.splits["meta"]),
        "val": plan.splits["val"],
        "test": plan.splits["test"],
      },
      "plan": plan.to_json(),
      "num_skipped_files": len(skipped),
      "skipped_files": list(skipped),
    }
    if case_meta is not None:
      content["cases"] = {k: dict(v) for k, v in sorted(case_meta.items())}
    return content

  def _case_files(self, root: pathlib.Path, payload) -> dict[str, Any]:
    """A case's raw files relative to `root` ({"image", "label"}), to score predictions at
    the case's own size and to predict on it again."""
    raise NotImplementedError

  @classmethod
  def read_reference(cls, path: pathlib.Path, options: Mapping[str, Any]) -> np.ndarray:
    """A case's reference mask at its own size, as the build reads it: (H,W) for an image,
    (S,H,W) for a volume, class indices."""
    raise NotImplementedError

  @classmethod
  def list_cases(
    cls, root: pathlib.Path, options: Mapping[str, Any]
  ) -> tuple[list[str], list[str] | None]:
    """The case ids of a raw folder and those with a mask in its `trusted/` (None: no such
    folder), from the file names alone (no file is decoded)."""
    raise NotImplementedError(f"{cls.name} takes no user split")

  def _record_metadata(self, content: Mapping[str, Any]) -> None:
    meta = self.info.metadata
    meta["splits"] = content["splits"]
    if "plan" in content:
      meta["plan"] = content["plan"]
    meta["split_seed"] = content["seed"]
    meta["source"] = content["source"]
    meta["num_skipped_files"] = content["num_skipped_files"]
    meta["options"] = dict(self.config.options)
    if "cases" in content:
      meta["pixel_spacing_mm"] = {
        c: resized_spacing(m, self.config.size) for c, m in content["cases"].items()
      }

  def _generate_examples(self, split: str, items):
    raise NotImplementedError

  def _encode(self, case_id: str, index: int, image: np.ndarray, label: np.ndarray):
    """Resizes one (H, W, C) image and (H, W) label to the config's size and encodes them."""
    size = self.config.size
    return self.encode_example(
      image=readers.resize_image(image, size),
      label=readers.resize_label(label, size),
      case_id=case_id,
      slice_index=index,
    )


def resized_spacing(case_meta: Mapping[str, Any], size: int) -> list[float]:
  """Spacing (row, col, slice) in mm of a case's slices after resizing them to size x size."""
  _, h, w = case_meta["shape"][:3]
  row, col, sl = case_meta["spacing_mm"]
  return [row * h / size, col * w / size, sl]


# ---------------------------------------------------------------------------------------------
# 2D image folders.


@dataclasses.dataclass
class _Found:
  """A raw folder's cases {id: (image, reference mask, the user's mask where a trusted mask
  replaces it, else None)}, the entries skipped, and the cases with a trusted mask (None: no
  trusted/ folder)."""

  cases: dict[str, tuple]
  skipped: list[str]
  trusted: list[str] | None


def _scan_image_folder(root: pathlib.Path, mask_suffix: str, *, trusted: bool) -> _Found:
  """images/, masks/ and (`trusted`, when present) trusted/ of a 2D folder, paired by stem: an
  image needs a mask in masks/ or in trusted/, and trusted/ overrides masks/."""
  images_dir = readers.require_dir(root / "images", "images/")
  masks_dir = readers.require_dir(root / "masks", "masks/")
  images = readers.list_files(images_dir, readers.IMAGE_SUFFIXES, root=root)
  masks = readers.list_files(masks_dir, readers.IMAGE_SUFFIXES, root=root)
  skipped = images.skipped + masks.skipped
  trusted_dir = root / splits_lib.TRUSTED_DIR
  if not (trusted and trusted_dir.is_dir()):
    pairs = readers.pair_files(
      images, masks, images_dir=images_dir, masks_dir=masks_dir, mask_suffix=mask_suffix
    )
    return _Found({s: (i, m, None) for s, (i, m) in pairs.items()}, skipped, None)
  verified = readers.list_files(trusted_dir, readers.IMAGE_SUFFIXES, root=root)
  skipped += verified.skipped
  # Trusted masks pair with their images first; the remaining images need a mask in masks/.
  with_trusted = readers.Listing(
    {s: p for s, p in images.files.items() if s + mask_suffix in verified.files}, []
  )
  if not with_trusted.files:
    raise DataError(f"{trusted_dir} holds no mask of an image in {images_dir}")
  trusted_pairs = readers.pair_files(
    with_trusted, verified, images_dir=images_dir, masks_dir=trusted_dir, mask_suffix=mask_suffix
  )
  rest = readers.Listing({s: p for s, p in images.files.items() if s not in trusted_pairs}, [])

  def image_stem(mask_stem: str) -> str | None:
    if not mask_suffix:
      return mask_stem
    return mask_stem[: -len(mask_suffix)] if mask_stem.endswith(mask_suffix) else None

  stray = sorted(
    str(p.relative_to(root)) for m, p in masks.files.items() if image_stem(m) not in images.files
  )
  if stray:
    raise DataError(f"mask without an image in {images_dir}: {', '.join(stray[:5])}")
  # The user's own masks of the trusted images: kept aside to measure how far they were off.
  given = {s: masks.files.get(s + mask_suffix) for s in trusted_pairs}
  untrusted = readers.Listing(
    {m: p for m, p in masks.files.items() if image_stem(m) in rest.files}, []
  )
  pairs = (
    readers.pair_files(
      rest, untrusted, images_dir=images_dir, masks_dir=masks_dir, mask_suffix=mask_suffix
    )
    if rest.files
    else {}
  )
  cases = {s: (i, m, None) for s, (i, m) in pairs.items()}
  cases.update({s: (i, m, given[s]) for s, (i, m) in trusted_pairs.items()})
  return _Found(dict(sorted(cases.items())), skipped, sorted(trusted_pairs))


def foreground_dice(given: np.ndarray, reference: np.ndarray) -> float:
  """Dice of `given`'s foreground (label > 0) against `reference`'s, any shape (1 when both
  are empty): how far a user's mask is from its verified one."""
  g, r = np.asarray(given) > 0, np.asarray(reference) > 0
  total = int(g.sum()) + int(r.sum())
  return 1.0 if total == 0 else 2.0 * float(np.sum(g & r)) / total


class _ImageFolderBuilder(_RealBuilder, skip_registration=True):
  """images/ + masks/ of 2D files paired by stem (and, with a user's plan, trusted/)."""

  @classmethod
  def _layout_root(cls, root: pathlib.Path) -> pathlib.Path:
    return root

  def _mask_suffix(self) -> str:
    return ""

  def _scan(self, root):
    root = self._layout_root(root)
    found = _scan_image_folder(
      root, self._mask_suffix(), trusted=self._plan is not None and self._plan.uses_trusted_folder
    )
    return found.cases, found.skipped, None

  @classmethod
  def list_cases(cls, root, options):
    found = _scan_image_folder(
      cls._layout_root(pathlib.Path(root)), options.get("mask_suffix") or "", trusted=True
    )
    return sorted(found.cases), found.trusted

  def _case_files(self, root, payload):
    image_path, mask_path, _ = payload
    return {"image": str(image_path.relative_to(root)), "label": str(mask_path.relative_to(root))}

  @property
  def _num_channels(self) -> int:
    return self.CHANNELS or self.config.options["channels"]

  def _label(self, raw: np.ndarray, path: pathlib.Path) -> np.ndarray:
    raise NotImplementedError

  def _generate_examples(self, split, items):
    converted = 0
    agreement = {}
    for key, (case_id, (image_path, mask_path, given_path)) in enumerate(items):
      image, changed = readers.read_image(image_path, channels=self._num_channels)
      converted += changed
      raw = readers.read_mask(mask_path)
      readers.check_same_size(image.shape[:2], raw.shape, image_path, mask_path)
      label = self._label(raw, mask_path)
      if given_path is not None:  # a trusted mask beside the one the user had
        given = readers.read_mask(given_path)
        readers.check_same_size(image.shape[:2], given.shape, image_path, given_path)
        agreement[case_id] = foreground_dice(self._label(given, given_path), label)
      yield key, self._encode(case_id, 0, image, label)
    if converted:
      logging.warning(
        "%s/%s: %d images converted to %d channels", self.name, split, converted, self._num_channels
      )
    self.info.metadata.setdefault("converted_to_channels", {})[split] = converted
    if agreement:
      self.info.metadata.setdefault("given_vs_trusted_dice", {}).update(agreement)


class KvasirSeg(_ImageFolderBuilder, skip_registration=True):
  """Kvasir-SEG polyps (Jha et al., MMM 2020): 1000 RGB images with JPEG masks.

  manual_dir holds `images/` and `masks/` (or `Kvasir-SEG/images`, `Kvasir-SEG/masks`), jpg
  files with the same names. Masks are JPEG-compressed RGB: grey, then > 127 is polyp.
  """

  name = "kvasir_seg"
  DEFAULT_SIZE = 256
  CHANNELS = 3

  @classmethod
  def _layout_root(cls, root):
    nested = root / "Kvasir-SEG"
    return nested if not (root / "images").exists() and (nested / "images").is_dir() else root

  def _label(self, raw, path):
    return readers.mask_to_label(raw, path=path, threshold=127)

  @classmethod
  def read_reference(cls, path, options):
    del options
    return readers.mask_to_label(readers.read_mask(path), path=path, threshold=127)


class Folder(_ImageFolderBuilder, skip_registration=True):
  """Any 2D dataset laid out as `images/` and `masks/` (png/jpg/jpeg/bmp/tif/tiff) by stem,
  with the verified masks of some images in `trusted/` (optional; `metadcseg_jax.data.splits`).

  Options:
    num_classes: None for binary masks (0/1 or 0/255); else masks hold class indices.
    mask_threshold: binarise masks as value > threshold (JPEG-compressed masks).
    channels: 1 or 3; None: 1 when every image is grey, else 3.
    mask_suffix: mask stem = image stem + suffix (e.g. "_segmentation" for ISIC).
    plan: the digest of the user's split (`splits.Plan.digest`), set with the plan.
  """

  name = "folder"
  DEFAULT_SIZE = 256
  TAKES_PLAN = True
  OPTIONS = {
    "num_classes": None,
    "mask_threshold": None,
    "channels": None,
    "mask_suffix": "",
    "plan": None,
  }

  @classmethod
  def _check_options(cls, options):
    n, c, t = options["num_classes"], options["channels"], options["mask_threshold"]
    if n is not None and (not isinstance(n, int) or not 2 <= n <= 256):
      raise ConfigError(f"num_classes must be None or an integer in [2, 256], got {n!r}")
    if c not in (None, 1, 3):
      raise ConfigError(f"channels must be None, 1 or 3, got {c!r}")
    if t is not None and (not isinstance(t, int) or n not in (None, 2)):
      raise ConfigError(f"mask_threshold must be an integer and needs binary masks, got {t!r}")

  @classmethod
  def _extra_name_parts(cls, manual_dir):
    # Two different folders built into one data_dir must not share a cached build.
    if manual_dir is None:
      return []
    path = str(pathlib.Path(manual_dir).expanduser().resolve())
    return ["src" + hashlib.sha1(path.encode()).hexdigest()[:8]]

  def _mask_suffix(self):
    return self.config.options["mask_suffix"]

  @classmethod
  def make_config(cls, *, size=None, seed=0, manual_dir=None, **options):
    # The channel count is part of the features, so it is fixed before the build: inferred from
    # the image headers when not given.
    if options.get("channels") is None:
      if manual_dir is None:
        raise ConfigError("folder: pass channels=1 or 3, or manual_dir to infer it")
      root = readers.require_dir(manual_dir, "folder raw data")
      images = readers.list_files(
        readers.require_dir(root / "images", "images/"), readers.IMAGE_SUFFIXES, root=root
      )
      if not images.files:
        raise ConfigError(
          f"no image files ({', '.join(readers.IMAGE_SUFFIXES)}) found in {root / 'images'}"
        )
      options["channels"] = max(readers.image_channels(p) for p in images.files.values())
    return super().make_config(size=size, seed=seed, manual_dir=manual_dir, **options)

  def _label(self, raw, path):
    return self._to_label(raw, path, self.config.options)

  @staticmethod
  def _to_label(raw, path, options):
    return readers.mask_to_label(
      raw,
      path=path,
      num_classes=options.get("num_classes"),
      threshold=options.get("mask_threshold"),
    )

  @classmethod
  def read_reference(cls, path, options):
    return cls._to_label(readers.read_mask(path), path, options)


# ---------------------------------------------------------------------------------------------
# Volumes, sliced axially.


def slice_mask(policy: str, volume: np.ndarray, label: np.ndarray) -> np.ndarray:
  """Which axial slices to keep: (S,) bool for `policy` in SLICE_POLICIES."""
  if policy == "all":
    return np.ones(volume.shape[0], bool)
  if policy == "foreground":
    return label.reshape(label.shape[0], -1).any(axis=1)
  if policy == "nonzero":
    return (volume.reshape(volume.shape[0], -1) != 0).any(axis=1)
  raise DataError(f"slice policy must be one of {SLICE_POLICIES}, got {policy!r}")


class _VolumeBuilder(_RealBuilder, skip_registration=True):
  """3D image/label volumes, z-scored per volume and cut into axial 2D slices."""

  UNIT = "volume"
  CHANNELS = 1
  OPTIONS = {"train_slices": "all"}
  LABELS: ClassVar[tuple[int, ...]] = (0, 1)

  def _pairs(self, root: pathlib.Path):
    """Returns ({case: (image, label)}, skipped, {case: image channel or None})."""
    raise NotImplementedError

  def _allowed_labels(self) -> tuple[int, ...]:
    return self.LABELS

  def _scan(self, root):
    pairs, skipped, channels = self._pairs(root)
    cases, meta = {}, {}
    for case_id, (image_path, label_path) in pairs.items():
      image_shape, spacing = readers.volume_info(image_path)
      label_shape, _ = readers.volume_info(label_path)
      readers.check_same_size(image_shape[:3], label_shape, image_path, label_path)
      cases[case_id] = (image_path, label_path, channels.get(case_id))
      meta[case_id] = {
        "shape": list(label_shape),
        "spacing_mm": list(spacing),
        "image": str(image_path.relative_to(root)),
        "label": str(label_path.relative_to(root)),
      }
    return cases, skipped, meta

  def _case_files(self, root, payload):
    image_path, label_path, channel = payload
    return {
      "image": str(image_path.relative_to(root)),
      "label": str(label_path.relative_to(root)),
      "channel": channel,
    }

  @classmethod
  def read_reference(cls, path, options):
    del options
    return (readers.integral(readers.read_volume(path), path) > 0).astype(np.uint8)

  def _read_case(self, payload) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A case's raw volume (S,H,W,C) float32, its reference labels (S,H,W) uint8 class indices
    and the user's own labels where a trusted volume replaced them (else None)."""
    image_path, label_path, channel = payload
    volume = readers.read_volume(image_path, channel=channel)
    labels = readers.read_label_volume(label_path, allowed=self._allowed_labels())
    readers.check_same_size(volume.shape, labels.shape, image_path, label_path)
    return volume[..., None], (labels > 0).astype(np.uint8), None

  def _generate_examples(self, split, items):
    policy = self.config.options["train_slices"] if split == "train" else "all"
    kept = total = key = 0
    intensity = preprocess.intensity_of(self.name)
    agreement = {}
    for case_id, payload in items:
      volume, label, given = self._read_case(payload)
      if given is not None:
        agreement[case_id] = foreground_dice(given, label)
      keep = slice_mask(policy, volume, label)
      image = preprocess.normalise_volume(volume, intensity, name=case_id)
      kept, total = kept + int(keep.sum()), total + keep.size
      for k in np.flatnonzero(keep):
        yield key, self._encode(case_id, int(k), image[k], label[k])
        key += 1  # integer keys in generation order: record i is the i-th slice written
    if agreement:
      self.info.metadata.setdefault("given_vs_trusted_dice", {}).update(agreement)
    logging.info(
      "%s/%s: kept %d of %d axial slices (train_slices=%r applies to train only)",
      self.name,
      split,
      kept,
      total,
      policy,
    )
    if not kept:
      raise DataError(
        f"{self.name}: no {split} slices left with train_slices={policy!r} "
        f"(cases {[c for c, _ in items]})"
      )
    self.info.metadata.setdefault("slices", {})[split] = {
      "kept": kept,
      "total": total,
      "policy": policy,
    }


class Promise12(_VolumeBuilder, skip_registration=True):
  """PROMISE12 prostate MRI (Litjens et al., MedIA 2014): 50 T2-weighted training volumes.

  manual_dir holds `CaseXX.mhd` and `CaseXX_segmentation.mhd` (with their .raw files) of the
  challenge's training data, all in one folder. Labels are 0/1.
  """

  name = "promise12"
  DEFAULT_SIZE = 144
  FRACTIONS = {"train": 0.72, "val": 0.08, "test": 0.2}

  def _pairs(self, root):
    listing = readers.list_files(root, (".mhd",), root=root, companions=(".raw", ".zraw"))
    suffix = "_segmentation"
    images = readers.Listing(
      {s: p for s, p in listing.files.items() if not s.endswith(suffix)}, listing.skipped
    )
    masks = readers.Listing({s: p for s, p in listing.files.items() if s.endswith(suffix)}, [])
    pairs = readers.pair_files(
      images, masks, images_dir=root, masks_dir=root, mask_suffix=suffix, suffixes=(".mhd",)
    )
    return pairs, listing.skipped, {}


def _resolve_modality(
  modality: str | int, modalities: Mapping[str, str], path: pathlib.Path
) -> int:
  names = {int(k): str(v) for k, v in modalities.items()}
  if isinstance(modality, (int, np.integer)) and not isinstance(modality, bool):
    if int(modality) in names:
      return int(modality)
  else:
    found = [i for i, n in names.items() if n.lower() == str(modality).lower()]
    if found:
      return found[0]
  raise DataError(f"modality {modality!r} not in {path}'s modalities {names}")


def _dataset_json(root: pathlib.Path) -> tuple[pathlib.Path, Any]:
  """(path, content) of the dataset.json of a folder in the Decathlon / nnU-Net raw layout.

  Raises:
    DataError: it is not there, or not readable JSON.
  """
  info_path = root / "dataset.json"
  if not info_path.is_file():
    raise DataError(
      f"wrong layout: {info_path} not found (the Decathlon layout is imagesTr/, labelsTr/ and "
      "dataset.json)"
    )
  try:
    return info_path, json.loads(info_path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read {info_path}: {e}") from e


class _DecathlonBuilder(_VolumeBuilder, skip_registration=True):
  """Medical Segmentation Decathlon task: `imagesTr/`, `labelsTr/`, `dataset.json`."""

  DEFAULT_SIZE = 160
  TASK_FOLDER: ClassVar[str] = ""

  @classmethod
  def _task_root(cls, root: pathlib.Path) -> pathlib.Path:
    if cls.TASK_FOLDER and not (root / "dataset.json").exists():
      if (root / cls.TASK_FOLDER / "dataset.json").exists():
        return root / cls.TASK_FOLDER
    return root

  def _channel(self, modalities: Mapping[str, str], path: pathlib.Path) -> int:
    del path
    if len(modalities) != 1:
      raise DataError(f"{self.name} expects one modality, dataset.json lists {modalities}")
    return 0

  def _pairs(self, root):
    task = self._task_root(root)
    info_path, info = _dataset_json(task)
    try:
      modalities, labels = info["modality"], info["labels"]
      self._labels = tuple(sorted(int(k) for k in labels))
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"cannot read {info_path} (needs 'modality' and 'labels'): {e}") from e
    channel = self._channel(modalities, info_path)
    images_dir = readers.require_dir(task / "imagesTr", "imagesTr/")
    labels_dir = readers.require_dir(task / "labelsTr", "labelsTr/")
    images = readers.list_files(images_dir, readers.NIFTI_SUFFIXES, root=root)
    masks = readers.list_files(labels_dir, readers.NIFTI_SUFFIXES, root=root)
    pairs = readers.pair_files(
      images, masks, images_dir=images_dir, masks_dir=labels_dir, suffixes=readers.NIFTI_SUFFIXES
    )
    self._check_training_list(info.get("training", []), task, info_path, pairs)
    channels = {}
    for case_id, (image_path, _) in pairs.items():
      shape, _ = readers.volume_info(image_path)
      if len(shape) == 4 and shape[3] != len(modalities):
        raise DataError(
          f"{image_path} has {shape[3]} channels but {info_path} lists {len(modalities)} modalities"
        )
      if len(shape) == 3 and channel != 0:
        raise DataError(f"{image_path} is 3D, modality index {channel} needs a 4D volume")
      channels[case_id] = channel if len(shape) == 4 else None
    if any(c is not None for c in channels.values()):
      self.info.metadata["modalities"] = [channel]  # what a prediction reads from a 4D file
    return pairs, images.skipped + masks.skipped, channels

  def _check_training_list(self, training, task, info_path, pairs) -> None:
    listed = set()
    for entry in training:
      for key in ("image", "label"):
        path = task / str(entry.get(key, "")) if isinstance(entry, dict) else None
        if path is None or not path.is_file():
          raise DataError(f"{info_path} lists a training {key} that is missing: {entry}")
      listed.add(readers.strip_suffix(path.name, readers.NIFTI_SUFFIXES)[0])
    extra = sorted(set(pairs) - listed)
    if training and extra:
      logging.warning(
        "%d cases in imagesTr/ are not in %s's training list (used anyway): %s",
        len(extra),
        info_path,
        extra[:5],
      )

  def _allowed_labels(self):
    return self._labels


def _dataset_labels(info: Mapping[str, Any], path: pathlib.Path) -> tuple[str, ...]:
  """The class names of a dataset.json's "labels", by value 0..L-1: the Decathlon form
  {"0": "background", "1": "edema"} or nnU-Net v2's {"background": 0, "edema": 1}."""
  labels = info.get("labels")
  if not isinstance(labels, dict) or not labels:
    raise DataError(f"{path}: 'labels' must map class values to names")
  try:
    if all(str(k).strip().isdigit() for k in labels):
      by_value = {int(k): str(v) for k, v in labels.items()}
    else:
      by_value = {int(v): str(k) for k, v in labels.items()}
  except (TypeError, ValueError) as e:
    raise DataError(
      f"{path}: 'labels' must map class values to names (region labels, lists of values, are "
      f"not supported): {e}"
    ) from e
  if sorted(by_value) != list(range(len(by_value))):
    raise DataError(f"{path}: label values must be 0..{len(by_value) - 1}, got {sorted(by_value)}")
  return tuple(by_value[v] for v in range(len(by_value)))


class Decathlon(_DecathlonBuilder, skip_registration=True):
  """Any task in the Medical Segmentation Decathlon / nnU-Net raw layout: `dataset.json`,
  `imagesTr/`, `labelsTr/` (NIfTI), and the verified label volumes of some cases in
  `trusted/` (optional; `metadcseg_jax.data.splits`).

  Both forms of dataset.json are read: the Decathlon's ("modality": {"0": "FLAIR", ...},
  "labels": {"0": "background", ...}, imagesTr/<case>.nii.gz 3D or 4D) and nnU-Net v2's
  ("channel_names", "labels": {"background": 0, ...}, "file_ending", one file per channel
  imagesTr/<case>_0000.nii.gz). Labels are class indices 0..L-1 (L = config.data.num_classes,
  names from "labels"); each volume is one case, cut into axial slices, each channel z-scored
  over the volume.

  Options:
    modality: "all" (every channel, in order; config.data.channels of them) or one channel's
      name or index.
    train_slices: "all" (default), "foreground" or "nonzero".
    channels, num_classes: from config.data (checked against dataset.json).
    plan: the digest of the user's split (`splits.Plan.digest`).
  """

  name = "decathlon"
  TAKES_PLAN = True
  CHANNELS = None
  OPTIONS = {
    "train_slices": "all",
    "modality": "all",
    "channels": 1,
    "num_classes": 2,
    "plan": None,
  }

  @staticmethod
  def _layout(root: pathlib.Path) -> dict[str, Any]:
    """dataset.json's channels, labels, file ending and form, read once."""
    info_path, info = _dataset_json(root)
    v2 = "channel_names" in info
    channels = info.get("channel_names" if v2 else "modality")
    if not isinstance(channels, dict) or not channels:
      raise DataError(f"{info_path}: needs 'modality' (Decathlon) or 'channel_names' (nnU-Net)")
    ending = str(info.get("file_ending", ".nii.gz")) if v2 else None
    return {
      "path": info_path,
      "v2": v2,
      "channels": {int(k): str(v) for k, v in channels.items()},
      "class_names": _dataset_labels(info, info_path),
      "ending": ending,
    }

  def _channel_indices(self, layout) -> list[int]:
    names, modality = layout["channels"], self.config.options["modality"]
    if modality == "all":
      chosen = sorted(names)
    else:
      chosen = [_resolve_modality(modality, names, layout["path"])]
    if len(chosen) != self.config.channels:
      listed = ", ".join(f"{i}: {n}" for i, n in sorted(names.items()))
      raise DataError(
        f"{layout['path']} lists {len(names)} channel(s) ({listed}) and modality="
        f"{modality!r} takes {len(chosen)}: set --config.data.channels={len(chosen)}, or pick "
        f"one with --config.data.options.modality=<name>"
      )
    return chosen

  @classmethod
  def _case_files_of(cls, root, layout) -> tuple[dict[str, tuple], list[str]]:
    """{case: (image file or per-channel files, label file)} of imagesTr/ and labelsTr/."""
    images_dir = readers.require_dir(root / "imagesTr", "imagesTr/")
    labels_dir = readers.require_dir(root / "labelsTr", "labelsTr/")
    suffixes = (layout["ending"],) if layout["v2"] else readers.NIFTI_SUFFIXES
    images = readers.list_files(images_dir, suffixes, root=root)
    labels = readers.list_files(labels_dir, suffixes, root=root)
    if layout["v2"]:
      grouped: dict[str, dict[int, pathlib.Path]] = {}
      for stem, path in images.files.items():
        case, _, index = stem.rpartition("_")
        if not case or len(index) != 4 or not index.isdigit():
          raise DataError(f"{path}: nnU-Net image files are named <case>_<XXXX>{layout['ending']}")
        grouped.setdefault(case, {})[int(index)] = path
      want = sorted(layout["channels"])
      for case, by_channel in grouped.items():
        if sorted(by_channel) != want:
          raise DataError(
            f"case {case!r} in {images_dir} has channel files {sorted(by_channel)}, "
            f"dataset.json lists channels {want}"
          )
      images = readers.Listing(
        {c: tuple(v[i] for i in want) for c, v in sorted(grouped.items())}, images.skipped
      )
    missing = sorted(set(images.files) - set(labels.files))
    extra = sorted(set(labels.files) - set(images.files))
    if missing or extra:
      raise DataError(
        f"imagesTr/ and labelsTr/ of {root} do not pair: "
        + (f"no label for {missing[:5]}" if missing else f"no image for {extra[:5]}")
      )
    if not images.files:
      raise DataError(f"no image files found in {images_dir}")
    pairs = {c: (images.files[c], labels.files[c]) for c in sorted(images.files)}
    return pairs, images.skipped + labels.skipped

  @classmethod
  def _trusted_files(cls, root, layout) -> dict[str, pathlib.Path] | None:
    trusted_dir = root / splits_lib.TRUSTED_DIR
    if not trusted_dir.is_dir():
      return None
    suffixes = (layout["ending"],) if layout["v2"] else readers.NIFTI_SUFFIXES
    return readers.list_files(trusted_dir, suffixes, root=root).files

  @classmethod
  def list_cases(cls, root, options):
    root = cls._task_root(pathlib.Path(root))
    layout = cls._layout(root)
    pairs, _ = cls._case_files_of(root, layout)
    trusted = cls._trusted_files(root, layout)
    if trusted is not None:
      stray = sorted(set(trusted) - set(pairs))
      if stray:
        raise DataError(f"{root / splits_lib.TRUSTED_DIR} holds labels of no case: {stray[:5]}")
    return sorted(pairs), None if trusted is None else sorted(trusted)

  def _scan(self, root):
    manual, root = root, self._task_root(root)
    layout = self._layout(root)
    self._labels = tuple(range(len(layout["class_names"])))
    if len(self._labels) != self.config.num_classes:
      raise DataError(
        f"{layout['path']} lists {len(self._labels)} labels {list(layout['class_names'])}: set "
        f"--config.data.num_classes={len(self._labels)}"
      )
    self.info.metadata["class_names"] = list(layout["class_names"])
    chosen = self._channel_indices(layout)
    self.info.metadata["modalities"] = chosen
    self.info.metadata["channel_files"] = layout["v2"]
    pairs, skipped = self._case_files_of(root, layout)
    use_trusted = self._plan is not None and self._plan.uses_trusted_folder
    trusted = self._trusted_files(root, layout) if use_trusted else None
    cases, meta = {}, {}
    for case_id, (image_ref, label_path) in pairs.items():
      first = image_ref[0] if isinstance(image_ref, tuple) else image_ref
      image_shape, spacing = readers.volume_info(first)
      reference = trusted.get(case_id, label_path) if trusted else label_path
      for mask in dict.fromkeys((label_path, reference)):  # the reference last: its shape kept
        label_shape, label_spacing = readers.volume_info(mask)
        readers.check_same_size(image_shape[:3], label_shape, first, mask)
        readers.check_same_spacing(spacing, label_spacing, first, mask)
      if isinstance(image_ref, tuple):  # one file per channel: the chosen ones
        files_, channels = [image_ref[i] for i in chosen], None
      else:
        files_, channels = [image_ref], chosen
      given = label_path if reference != label_path else None
      cases[case_id] = (files_, reference, channels, given)
      meta[case_id] = {
        "shape": list(label_shape),
        "spacing_mm": list(spacing),
        **self._case_files(manual, cases[case_id]),
      }
    return cases, skipped, meta

  def _case_files(self, root, payload):
    files_, reference, channels, _ = payload
    return {
      "image": [str(f.relative_to(root)) for f in files_],
      "label": str(reference.relative_to(root)),
      "channel": channels,
    }

  @classmethod
  def read_reference(cls, path, options):
    labels = readers.integral(readers.read_volume(path), path)
    if labels.min() < 0 or labels.max() >= int(options.get("num_classes", 2)):
      raise DataError(f"label file {path} has values outside [0, {options.get('num_classes')})")
    return labels.astype(np.uint8)

  def _read_case(self, payload):
    files_, reference, channels, given_path = payload
    if channels is None:  # one file per channel (nnU-Net v2)
      volume = np.stack([readers.read_volume(f) for f in files_], axis=-1)
    else:
      volume = readers.read_volume_channels(files_[0], channels)
    labels = readers.read_label_volume(reference, allowed=self._labels)
    readers.check_same_size(volume.shape[:3], labels.shape, files_[0], reference)
    given = None
    if given_path is not None:
      given = readers.read_label_volume(given_path, allowed=self._labels)
      readers.check_same_size(volume.shape[:3], given.shape, files_[0], given_path)
    return volume, labels.astype(np.uint8), given


class MsdBrain(_DecathlonBuilder, skip_registration=True):
  """MSD Task01 BrainTumour (BraTS 2016/17): 484 4-modality MRI volumes; whole tumour = label > 0.

  Options:
    modality: name (case-insensitive) or index in dataset.json's "modality"; default FLAIR.
    train_slices: "all" (default), "foreground" or "nonzero" (see module docstring).
  """

  name = "msd_brain"
  TASK_FOLDER = "Task01_BrainTumour"
  OPTIONS = {"train_slices": "all", "modality": "FLAIR"}

  def _channel(self, modalities, path):
    return _resolve_modality(self.config.options["modality"], modalities, path)


class MsdHeart(_DecathlonBuilder, skip_registration=True):
  """MSD Task02 Heart: 20 mono-modal MRI volumes of the left atrium (labels 0/1).

  Options:
    train_slices: "all" (default), "foreground" or "nonzero".
  """

  name = "msd_heart"
  TASK_FOLDER = "Task02_Heart"
  FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


# ---------------------------------------------------------------------------------------------
# Registry.

BUILDERS: dict[str, type[_RealBuilder]] = {
  b.name: b for b in (KvasirSeg, Promise12, MsdBrain, MsdHeart, Folder, Decathlon)
}
# The paper's Table 8 size with default options, split seed 0 (set before any config lookup;
# a folder's channel count is only known from its files).
for _cls in (KvasirSeg, Promise12, MsdBrain, MsdHeart):
  _cls.BUILDER_CONFIGS = [
    _cls._new_config(f"size{_cls.DEFAULT_SIZE}", _cls.DEFAULT_SIZE, 0, _cls.OPTIONS)
  ]
del _cls


def get_dataset_builder(
  name: str,
  *,
  data_dir: str | pathlib.Path,
  manual_dir: str | pathlib.Path | None,
  size: int | None = None,
  plan: splits_lib.Plan | None = None,
  **options,
) -> _RealBuilder:
  """The TFDS builder of a real dataset (not yet prepared).

  Args:
    name: one of `BUILDERS`.
    data_dir: TFDS data dir (builds and split files go there).
    manual_dir: the raw data folder (see each builder's docstring for its layout).
    size: side of the square 2D records; None: the paper's Table 8 size.
    plan: a user's folder's split and trusted masks (builders with `TAKES_PLAN`).
    **options: `seed` (split seed, default 0) and the builder's OPTIONS.

  Returns:
    The builder; `builder.download_and_prepare()` builds it, `load_dataset` does both.
  """
  if name not in BUILDERS:
    raise ConfigError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
  cls = BUILDERS[name]
  if plan is not None:
    if not cls.TAKES_PLAN:
      raise ConfigError(f"{name} takes no user split or trusted masks")
    options["plan"] = plan.digest()
  config = cls.make_config(size=size, manual_dir=manual_dir, **options)
  return cls(
    data_dir=str(pathlib.Path(data_dir).expanduser().resolve()),
    config=config,
    manual_dir=manual_dir,
    plan=plan,
  )


def load_dataset(
  name: str,
  *,
  data_dir: str | pathlib.Path,
  manual_dir: str | pathlib.Path | None,
  size: int | None = None,
  **options,
) -> dict[str, Any]:
  """Builds (once) and opens a real dataset: {'train', 'val', 'test'} -> random-access source.

  Each source has `len()` and `source[i]` -> {"image" (H,W,C) float32, "label" (H,W) uint8,
  "case_id" bytes, "slice_index" int32}.

  Args:
    name: the dataset (`BUILDERS`).
    data_dir: where TFDS builds are kept.
    manual_dir: the raw data folder (None: the builder's default).
    size: the image size the builder resizes to (None: its default).
    **options: the builder's options (`builder_options`).
  """
  builder = get_dataset_builder(
    name, data_dir=data_dir, manual_dir=manual_dir, size=size, **options
  )
  return builders.prepare_sources(builder, splits=SPLITS, manual_dir=manual_dir)


def read_split_file(builder: _RealBuilder) -> dict:
  """The split file of a prepared build (case ids per split, seed, source, spacing per case)."""
  path = pathlib.Path(builder.data_dir, _SPLIT_FILE)
  if not path.is_file():
    raise DataError(f"{path} not found: prepare the builder first")
  return json.loads(path.read_text())
