"""Every setting checked before any work: one `ConfigError` listing all that is wrong.

`check_config(config)` runs in well under a second (no dataset, no compilation), so a typo in
a value fails at start-up with a sentence naming the setting, not after an epoch with a
`ZeroDivisionError`. Unknown keys are already refused by the locked config of the entry points.
"""

import math
import pathlib
from typing import Any, Callable

import ml_collections

from metadcseg_jax import dcd
from metadcseg_jax import edges
from metadcseg_jax import meta
from metadcseg_jax import methods
from metadcseg_jax import models
from metadcseg_jax import noise
from metadcseg_jax import objective
from metadcseg_jax import optim
from metadcseg_jax.data import real
from metadcseg_jax.errors import ConfigError

# Every dataset `config.data.name` accepts.
DATASETS = ("synthetic", *real.BUILDERS)
DTYPES = ("float32", "bfloat16", "float16")


def _int(low: int | None = None, high: int | None = None) -> Callable[[Any], str | None]:
  def check(v):
    if isinstance(v, bool) or not isinstance(v, int):
      return f"must be an integer, got {v!r}"
    if low is not None and v < low:
      return f"must be >= {low}, got {v}"
    if high is not None and v > high:
      return f"must be <= {high}, got {v}"
    return None

  return check


def _float(
  low: float | None = None,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> Callable[[Any], str | None]:
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return f"must be a finite number, got {v!r}"
    if low is not None and (v < low or (low_open and v == low)):
      return f"must be {'>' if low_open else '>='} {low}, got {v}"
    if high is not None and (v > high or (high_open and v == high)):
      return f"must be {'<' if high_open else '<='} {high}, got {v}"
    return None

  return check


def _one_of(choices) -> Callable[[Any], str | None]:
  choices = tuple(choices)
  return lambda v: None if v in choices else f"must be one of {choices}, got {v!r}"


def _bool(v):
  return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


# (dotted key, check). Keys absent from a config are skipped (older configs, library use).
RULES: tuple[tuple[str, Callable[[Any], str | None]], ...] = (
  ("seed", _int(0)),
  ("method", _one_of(methods.NAMES)),
  ("model.name", _one_of(models.MODEL_NAMES)),
  ("model.width", _int(1)),
  ("model.deep_supervision", _bool),
  ("model.dtype", _one_of(DTYPES)),
  ("data.name", _one_of(DATASETS)),
  ("data.size", _int(16)),
  ("data.channels", _int(1)),
  ("data.num_classes", _int(2, 256)),
  ("data.n_train", _int(1)),
  ("data.n_val", _int(1)),
  ("data.n_test", _int(1)),
  ("data.seed", _int(0)),
  ("data.meta_seed", lambda v: None if v is None else _int(0)(v)),
  ("data.meta_fraction", _float(0.0, 1.0, low_open=True, high_open=True)),
  ("data.augment", _bool),
  ("data.num_workers", _int(0)),
  ("audit.epochs", _int(0)),
  ("audit.meta_images", _int(0)),
  ("mesh.data", lambda v: None if v == -1 else _int(1)(v)),
  ("distributed.initialize", _one_of(("auto", "on", "off"))),
  ("distributed.num_processes", _int(0)),
  ("distributed.process_id", _int(-1)),
  ("distributed.timeout_s", _int(1)),
  ("data.noise.kind", _one_of(("none", *noise.KINDS))),
  ("data.noise.seed", _int(0)),
  ("data.noise.scale_kernels_with_size", _bool),
  ("data.noise.calibrate", _bool),
  ("data.noise.small_mask", _one_of(("empty", "keep"))),
  ("train.batch_size", _int(1)),
  ("train.meta_batch_size", _int(1)),
  ("train.num_epochs", _int(1)),
  ("train.warmup_epochs", _int(0)),
  ("train.optimizer", _one_of(optim.NAMES)),
  ("train.lr", _float(0.0, low_open=True)),
  ("train.momentum", _float(0.0, 1.0, high_open=True)),
  ("train.weight_decay", _float(0.0)),
  ("train.grad_clip", _float(0.0)),
  ("train.ema_decay", _float(0.0, 1.0, high_open=True)),
  ("train.ema_batch_stats", _one_of(("recompute", "ema"))),
  ("train.eval_every_epochs", _int(1)),
  ("train.eval_batch_size", _int(1)),
  ("train.log_every_steps", _int(0)),
  ("train.diagnostics_every_steps", _int(0)),
  ("train.checkpoint_every_epochs", _int(1)),
  ("train.checkpoint_every_steps", _int(0)),
  ("train.checkpoint_every_minutes", _float(0.0)),
  ("train.keep_checkpoints", _int(1)),
  ("train.num_panel_images", _int(0)),
  ("meta.route", _one_of(meta.ROUTES)),
  ("meta.a0", _float(0.0)),
  ("meta.b0", _float(0.0)),
  ("meta.eta", _float(0.0, low_open=True)),
  ("meta.normalizer", _one_of(meta.NORMALIZERS)),
  ("meta.extra_clean_step", _bool),
  ("meta.use", _bool),
  ("meta.precision", _one_of(("default", "high", "highest"))),
  ("dcd.use", _bool),
  ("dcd.use_dice", _bool),
  ("dcd.tau", _float(0.5, 1.0, low_open=True, high_open=True)),
  ("dcd.tau_dcd", _float(0.0, low_open=True)),
  ("dcd.lambda_bd", _float(0.0)),
  ("dcd.lambda_dice", _float(0.0)),
  ("dcd.edge_top_fraction", _float(0.0, 1.0)),
  ("dcd.edges", _one_of(edges.DETECTORS)),
  ("dcd.canny_sigma", _float(0.0, low_open=True)),
  ("dcd.dcd_scale", _one_of(dcd.DCD_SCALES)),
  ("dcd.weight_sum", _one_of(dcd.WEIGHT_SUMS)),
  ("dcd.pixel_loss", _one_of(objective.PIXEL_LOSSES)),
  ("dcd.detach_weights", _bool),
  ("dcd.center_momentum", _float(0.0, 1.0)),
  ("coteach.auto_forget_rate", _bool),
  ("coteach.forget_rate", _float(0.0, 1.0, high_open=True)),
  ("coteach.num_gradual", _int(1)),
  ("coteach.co_lambda", _float(0.0, 1.0)),
  ("gsdnet.co_lambda", _float(0.0)),
  ("gsdnet.reference_epochs", _int(1)),
  ("gsdnet.scale_schedule", _bool),
  ("gsdnet.num_gradual", _int(1)),
  ("gsdnet.sglr_start", _int(0)),
  ("gsdnet.cap_every", _float(0.0, low_open=True)),
  ("gsdnet.max_distance", _float(0.0, low_open=True)),
  ("gsdnet.jitter_strength", _float(0.0, 1.25, high_open=True)),
  ("gsdnet.slic_segments", _int(1)),
  ("gsdnet.slic_compactness", _float(0.0, low_open=True)),
  ("gsdnet.slic_sigma", _float(0.0)),
  ("gsdnet.slic_reference_size", _int(1)),
  ("gsdnet.scale_slic_with_size", _bool),
  ("gsdnet.pseudo_threshold", _float(0.0, 1.0)),
  ("gsdnet.kt_share_threshold", _float(0.0, 1.0)),
  ("gsdnet.official_bugs", _bool),
  ("loss.gce_q", _float(0.0, 1.0, low_open=True)),
  ("loss.sce_alpha", _float(0.0)),
  ("loss.sce_beta", _float(0.0)),
)


def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of `config`, one sentence each naming the setting (empty when fine)."""
  found = []
  for key, check in RULES:
    try:
      value = _get(config, key)
    except KeyError:
      continue
    message = check(value)
    if message:
      found.append(f"config.{key} {message}")
  if found:
    return found  # the combinations below assume valid single values

  data, train = config.data, config.train
  if data.size % 16:
    found.append(f"config.data.size={data.size} must be divisible by 16 (the U-Net pools 4 times)")
  if data.name != "synthetic" and not data.manual_dir:
    found.append(
      f"config.data.name={data.name!r} needs config.data.manual_dir, the folder "
      f"with the raw dataset"
    )
  elif data.name != "synthetic" and not pathlib.Path(data.manual_dir).expanduser().is_dir():
    found.append(f"config.data.manual_dir={data.manual_dir!r} is not a folder")
  fixed = {"kvasir_seg": 3, "promise12": 1, "msd_brain": 1, "msd_heart": 1}
  if data.name in fixed and data.channels != fixed[data.name]:
    found.append(
      f"config.data.channels={data.channels}: {data.name} images have {fixed[data.name]} channel(s)"
    )
  if data.name == "folder" and data.channels not in (1, 3):
    found.append(
      f"config.data.channels={data.channels}: a folder's images are read as 1 "
      f"(grey) or 3 (RGB) channels"
    )
  threshold = data.get("mask_threshold")
  if threshold is not None:
    if data.name != "folder":
      found.append("config.data.mask_threshold applies to config.data.name='folder' only")
    elif not (isinstance(threshold, int) and 0 <= threshold <= 255 and data.num_classes == 2):
      found.append(
        f"config.data.mask_threshold={threshold!r} must be an integer in [0, 255] "
        f"with config.data.num_classes=2"
      )
  if data.name != "synthetic" and data.num_classes != 2 and data.name != "folder":
    found.append(
      f"config.data.num_classes={data.num_classes}: {data.name} has 2 classes "
      f"(background, foreground)"
    )
  if train.warmup_epochs > train.num_epochs:
    found.append(
      f"config.train.warmup_epochs={train.warmup_epochs} exceeds "
      f"config.train.num_epochs={train.num_epochs}"
    )
  if "meta" in config and config.meta.route == "jvp" and train.optimizer != "sgd":
    found.append(
      f"config.meta.route='jvp' needs an update linear in the gradient "
      f"(config.train.optimizer='sgd'); use route='reverse' with "
      f"{train.optimizer!r}"
    )
  weights = config.get("dcd", {}).get("pidinet_weights", "")
  if "dcd" in config and config.dcd.edges == "pidinet" and not weights:
    found.append(
      "config.dcd.edges='pidinet' needs config.dcd.pidinet_weights, the path of "
      "PiDiNet's released weights (table5_pidinet.pth)"
    )
  elif weights and not pathlib.Path(weights).expanduser().is_file():
    found.append(f"config.dcd.pidinet_weights={weights!r}: no such file")
  if config.model.deep_supervision and config.model.name != "unet++":
    found.append("config.model.deep_supervision needs config.model.name='unet++'")
  if data.name == "synthetic" and data.n_train < train.batch_size + train.meta_batch_size:
    found.append(
      f"config.data.n_train={data.n_train} is smaller than one training batch "
      f"({train.batch_size}) plus one meta batch ({train.meta_batch_size})"
    )
  return found


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every problem of `config` (see `problems`)."""
  found = problems(config)
  if len(found) == 1:
    raise ConfigError(found[0])
  if found:
    raise ConfigError(f"{len(found)} settings are wrong: " + "; ".join(found))
