"""Every setting checked before any work: one `ConfigError` listing all that is wrong.

`check_config(config)` runs in well under a second (no dataset, no compilation), so a typo in
a value fails at start-up with a sentence naming the setting, not after an epoch with a
`ZeroDivisionError`. Unknown keys are already refused by the locked config of the entry points.
The settings every run has are checked here; each method checks its own beside its defaults
(`Method.check_settings`), for every registered method.
"""

import pathlib

import ml_collections

from metadcseg_jax import methods
from metadcseg_jax import settings
from metadcseg_jax.core import models
from metadcseg_jax.core import optim
from metadcseg_jax.data import noise
from metadcseg_jax.data import pipeline
from metadcseg_jax.data import real
from metadcseg_jax.data import splits
from metadcseg_jax.errors import ConfigError

# Every dataset `config.data.name` accepts.
DATASETS = ("synthetic", *real.BUILDERS)
DTYPES = ("float32", "bfloat16", "float16")


def _method(name) -> str | None:
  # The registry as it is now, so that a method registered after import is known.
  return settings.one_of(methods.REGISTRY)(name)


# The settings of every run, whatever its method.
RULES: settings.Rules = (
  ("seed", settings.integer(0)),
  ("method", _method),
  ("model.name", settings.one_of(models.MODEL_NAMES)),
  ("model.width", settings.integer(1)),
  ("model.deep_supervision", settings.boolean),
  ("model.dtype", settings.one_of(DTYPES)),
  ("data.name", settings.one_of(DATASETS)),
  ("data.size", settings.integer(16)),
  ("data.channels", settings.integer(1)),
  ("data.num_classes", settings.integer(2, 256)),
  ("data.n_train", settings.integer(1)),
  ("data.n_val", settings.integer(1)),
  ("data.n_test", settings.integer(1)),
  ("data.seed", settings.integer(0)),
  ("data.meta_seed", settings.optional(settings.integer(0))),
  ("data.meta_fraction", settings.number(0.0, 1.0, low_open=True, high_open=True)),
  ("data.trusted_split.meta", settings.number(0.0, 1.0, low_open=True)),
  ("data.trusted_split.val", settings.number(0.0, 1.0, low_open=True)),
  ("data.trusted_split.test", settings.number(0.0, 1.0, low_open=True)),
  ("data.augment", settings.boolean),
  ("data.num_workers", settings.integer(0)),
  ("audit.epochs", settings.integer(0)),
  ("audit.meta_images", settings.integer(0)),
  ("mesh.data", lambda v: None if v == -1 else settings.integer(1)(v)),
  ("distributed.initialize", settings.one_of(("auto", "on", "off"))),
  ("distributed.num_processes", settings.integer(0)),
  ("distributed.process_id", settings.integer(-1)),
  ("distributed.timeout_s", settings.integer(1)),
  ("data.noise.kind", settings.one_of(("none", *noise.KINDS))),
  ("data.noise.seed", settings.integer(0)),
  ("data.noise.scale_kernels_with_size", settings.boolean),
  ("data.noise.calibrate", settings.boolean),
  ("data.noise.small_mask", settings.one_of(("empty", "keep"))),
  ("train.batch_size", settings.integer(1)),
  ("train.meta_batch_size", settings.integer(1)),
  ("train.num_epochs", settings.integer(1)),
  ("train.warmup_epochs", settings.integer(0)),
  ("train.optimizer", settings.one_of(optim.NAMES)),
  ("train.lr", settings.number(0.0, low_open=True)),
  ("train.momentum", settings.number(0.0, 1.0, high_open=True)),
  ("train.weight_decay", settings.number(0.0)),
  ("train.grad_clip", settings.number(0.0)),
  ("train.ema_decay", settings.number(0.0, 1.0, high_open=True)),
  ("train.ema_batch_stats", settings.one_of(("best_val", "recompute", "ema"))),
  ("train.eval_every_epochs", settings.integer(1)),
  ("train.eval_batch_size", settings.integer(1)),
  ("train.log_every_steps", settings.integer(0)),
  ("train.diagnostics_every_steps", settings.integer(0)),
  ("train.checkpoint_every_epochs", settings.integer(1)),
  ("train.checkpoint_every_steps", settings.integer(0)),
  ("train.checkpoint_every_minutes", settings.number(0.0)),
  ("train.keep_checkpoints", settings.integer(1)),
  ("train.num_panel_images", settings.integer(0)),
)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of `config`, one sentence each naming the setting (empty when fine)."""
  found = settings.problems(config, RULES) + methods.settings_problems(config)
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
  threshold = data.mask_threshold
  if threshold is not None:
    if data.name != "folder":
      found.append("config.data.mask_threshold applies to config.data.name='folder' only")
    elif not (isinstance(threshold, int) and 0 <= threshold <= 255 and data.num_classes == 2):
      found.append(
        f"config.data.mask_threshold={threshold!r} must be an integer in [0, 255] "
        f"with config.data.num_classes=2"
      )
  if data.name not in ("synthetic", "folder", "decathlon") and data.num_classes != 2:
    found.append(
      f"config.data.num_classes={data.num_classes}: {data.name} has 2 classes "
      f"(background, foreground)"
    )
  found += _own_data_problems(config)
  if train.warmup_epochs > train.num_epochs:
    found.append(
      f"config.train.warmup_epochs={train.warmup_epochs} exceeds "
      f"config.train.num_epochs={train.num_epochs}"
    )
  if config.model.deep_supervision and config.model.name != "unet++":
    found.append("config.model.deep_supervision needs config.model.name='unet++'")
  if data.name == "synthetic" and data.n_train < train.batch_size + train.meta_batch_size:
    found.append(
      f"config.data.n_train={data.n_train} is smaller than one training batch "
      f"({train.batch_size}) plus one meta batch ({train.meta_batch_size})"
    )
  return found


def _own_data_problems(config: ml_collections.ConfigDict) -> list[str]:
  """A user's folder: the trusted shares, the named files, and a clean meta source for a method
  that learns from one."""
  data, found = config.data, []
  shares = dict(data.trusted_split)
  if sum(shares.values()) > 1 + 1e-9:
    found.append(f"config.data.trusted_split={shares}: the shares sum to more than 1")
  own = data.name in real.BUILDERS and real.BUILDERS[data.name].TAKES_PLAN
  for key in ("trusted_list", "split_file"):
    value = str(data.get(key) or "")
    if value and not own:
      found.append(f"config.data.{key} applies to your own data (folder, decathlon) only")
    elif value and value != splits.ALL and key == "trusted_list":
      if not pathlib.Path(value).expanduser().is_file():
        found.append(f"config.data.trusted_list={value!r} is not a file (one stem per line)")
  cls = methods.REGISTRY.get(config.method)
  if own and cls is not None and cls.uses_meta_batch and not found:
    if pathlib.Path(data.manual_dir).expanduser().is_dir() and not pipeline.clean_meta_source(data):
      found.append(
        f"config.method={config.method!r} learns from a clean meta set and no mask of "
        f"{data.manual_dir} is verified: put verified masks of some images in "
        f"{pathlib.Path(data.manual_dir) / splits.TRUSTED_DIR}/ (same stems) or list their stems "
        "in a file and pass --config.data.trusted_list=FILE (or train --config.method=ce)"
      )
  return found


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every problem of `config` (see `problems`)."""
  found = problems(config)
  if len(found) == 1:
    raise ConfigError(found[0])
  if found:
    raise ConfigError(f"{len(found)} settings are wrong: " + "; ".join(found))
