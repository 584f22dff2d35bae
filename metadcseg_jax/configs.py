"""The default configuration and the paper's Table 8 rows, as `ml_collections.ConfigDict`s.

    config = configs.default_config()            # MetaDCSeg on the synthetic set, U-Net++
    config = configs.table8_config("kvasir_seg")  # the paper's Kvasir-SEG settings

The config files in `experiments/configs/` start from these and override only what differs;
every field can also be overridden on the command line, e.g. `--config.method=ce
--config.train.num_epochs=5`. `from_file` reads such a file by its path (one config file
building on another, without a package to import it from).

This module (with each method's section, `methods.default_settings`) is the only place a default
lives: the code reads every field directly. A run folder's settings (its config.json, written by
an older version) are brought up to date once, where they are read (`upgrade`).
"""

import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from metadcseg_jax import methods
from metadcseg_jax import parallel


def default_config() -> ml_collections.ConfigDict:
  """MetaDCSeg (L2B meta step + DCD) on the synthetic set, U-Net++ width 32, no injected noise."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # metadcseg_jax.methods.NAMES: plain losses (ce, gce, sce), two networks (coteaching,
  # jocor, gsdnet), meta-weighted (l2b, dale), MetaDCSeg.
  config.method = "metadcseg"
  config.model = _model_config()
  config.data = _data_config()
  config.train = _train_config()

  # Each method's own settings live in its module, beside the code that reads and checks them:
  # meta (l2b, metadcseg), dcd (metadcseg), coteach (coteaching, jocor, gsdnet), gsdnet, dale,
  # loss (gce, sce).
  for name, section in methods.default_settings().items():
    config[name] = section

  # Label audit (metadcseg-audit): meta methods score every training mask in their last epochs.
  config.audit = _audit_config()

  # Data parallel over `mesh.data` devices (-1: all); several hosts join by `distributed`.
  config.mesh = parallel.mesh_config()
  config.distributed = parallel.distributed_config()
  return config


def _audit_config() -> ml_collections.ConfigDict:
  """`config.audit`: the trainer's label-audit passes (`metadcseg_jax.training.audit_passes`)."""
  c = ml_collections.ConfigDict()
  c.epochs = 2  # final epochs with an audit pass over the training split (0: none)
  # Clean meta images per audit batch: 0 cycles the training step's meta batches
  # (config.train.meta_batch_size each); n > 0 uses the first n of the meta split (all if
  # fewer) for every batch, so each verdict is the whole clean set's, not a sample's.
  c.meta_images = 0
  return c


def _model_config() -> ml_collections.ConfigDict:
  """`config.model`: the network."""
  c = ml_collections.ConfigDict()
  c.name = "unet++"  # "unet++" | "unet"
  c.width = 32
  c.deep_supervision = False
  c.dtype = "float32"
  return c


def _data_config() -> ml_collections.ConfigDict:
  """`config.data`: the dataset, its splits, augmentation and the label noise."""
  c = ml_collections.ConfigDict()
  # synthetic | kvasir_seg | promise12 | msd_brain | msd_heart, or your own data: folder (2D
  # images/ and masks/) | decathlon (volumes in the Decathlon / nnU-Net raw layout)
  c.name = "synthetic"
  c.data_dir = "~/metadcseg_data"  # TFDS builds and noisy-label caches live here
  c.manual_dir = ""  # raw data folder for real datasets
  # Reading a folder of your own (name "folder"): channels and num_classes below, and
  # masks binarised as value > mask_threshold (JPEG-compressed masks), mask stem = image stem +
  # mask_suffix (e.g. "_segmentation").
  c.mask_threshold = config_dict.placeholder(int)
  c.options = ml_collections.ConfigDict()
  c.options.mask_suffix = ""
  # Volumes (promise12, msd_*, decathlon): which training slices to keep ("all", "foreground",
  # "nonzero"); the modality (name or index in dataset.json; MSD Brain: default FLAIR;
  # decathlon: default "all", config.data.channels of them).
  c.options.train_slices = config_dict.placeholder(str)
  c.options.modality = config_dict.placeholder(str)
  # Your own data (folder, decathlon): the masks an expert verified, either as a folder
  # `trusted/` beside masks/ (or labelsTr/; same stems, replacing those masks) or as a file
  # listing the stems (case ids) whose masks are verified ("all": every mask). The clean meta
  # split, validation and test are drawn from them (these shares of the trusted cases; the
  # rest train with their verified masks), everything else trains on the masks as given
  # (metadcseg_jax.data.splits).
  c.trusted_list = ""
  c.trusted_split = ml_collections.ConfigDict({"meta": 0.3, "val": 0.2, "test": 0.5})
  # The train/meta/val/test lists of stems, as nnU-Net's splits_final.json: used as written
  # when the file exists, else the split made is written there. "": <manual_dir>/
  # splits_final.json when it exists, else <workdir>/splits_final.json.
  c.split_file = ""
  # Class names, background first, comma-separated ("": from dataset.json, else class<k>).
  c.class_names = ""
  c.size = 64
  c.channels = 1
  c.num_classes = 2
  c.n_train = 400  # synthetic only
  c.n_val = 50
  c.n_test = 100
  c.seed = 0  # synthetic generation and the meta split
  # The meta split's own seed (None: data.seed), so that the clean meta set can vary while a
  # synthetic dataset stays the same (the benchmark's `--labels=per_seed`).
  c.meta_seed = config_dict.placeholder(int)
  c.meta_fraction = 0.02  # MetaDCSeg §4.1: 2% clean meta set
  c.augment = True
  c.num_workers = 0  # grain worker processes for reading and augmenting (0: threads)
  c.noise = ml_collections.ConfigDict()
  # Synthetic label noise injected into the training masks (never into the meta split or
  # trusted masks), for benchmarks where the given masks are clean: none | l2b20 | l2b40 |
  # l2b60 | markov_sr | markov_se | dist (MetaDCSeg App. A.2).
  c.noise.kind = "none"
  c.noise.seed = 0
  # L2B kinds only. calibrate: scale the level's kernels so that its measured corruption
  # 1 - Dice of the training masks is its nominal share (20/40/60%, within 3 points; the
  # paper's App. A.2.3). Off: the published kernels, scaled to the image size when
  # scale_kernels_with_size (they suit ~144-320 px images; at 64 px unscaled 40% noise empties
  # a third of the masks).
  c.noise.calibrate = True
  c.noise.scale_kernels_with_size = True
  c.noise.small_mask = "empty"  # masks of 1..300 px: "empty" (L2B) | "keep"
  return c


def _train_config() -> ml_collections.ConfigDict:
  """`config.train`: optimisation, EMA, evaluation, logging and checkpoints."""
  c = ml_collections.ConfigDict()
  c.batch_size = 4
  c.meta_batch_size = 2
  c.num_epochs = 30
  c.warmup_epochs = 3  # plain CE on the noisy labels, no meta step, no DCD
  c.optimizer = "sgd"  # sgd | adam (adam only with meta.route="reverse")
  c.lr = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.grad_clip = 0.2  # global norm; 0 disables
  c.ema_decay = 0.99
  # BatchNorm statistics used with the EMA weights at evaluation: "ema" (the EMA of the running
  # statistics) | "recompute" (one train-mode pass over the training images for the EMA
  # weights, SWA's bn_update) | "best_val" (per run, the one of the two with the higher
  # validation Dice after training; validations during training use "ema"). results.json
  # holds both; the default is the rule ahead on held-out validation Dice over the synthetic
  # and Kvasir-SEG tables (BUILD_NOTES.md, "The EMA weights' BatchNorm statistics").
  c.ema_batch_stats = "best_val"
  c.eval_every_epochs = 5
  c.eval_batch_size = 16
  c.log_every_steps = 50
  # Gradient norm per loss term, meta-weight and DCD statistics into metrics.jsonl (0: off).
  # Each point costs one to two steps (a meta step's weights and a backward pass per loss
  # term): against none, every 50 steps cost 6-13% of the trainer's images/s in epochs of 40
  # steps on the 2-core CPU, every 200 2-8% (BUILD_NOTES.md, "Throughput, and the trainer
  # against its step").
  c.diagnostics_every_steps = 100
  c.checkpoint_every_epochs = 1
  # Step checkpoints inside an epoch (0: off), so a large epoch is never lost whole; a stop
  # signal writes one too. Resuming from one gives the results of an uninterrupted run.
  c.checkpoint_every_steps = 0
  c.checkpoint_every_minutes = 30.0
  c.keep_checkpoints = 2
  c.num_panel_images = 6
  return c


# The paper's Table 8 (MetaDCSeg, per-dataset hyper-parameters). "Boundary Ratio" is undefined
# in the paper: recorded here, not used (BUILD_NOTES.md, "DCD and the objective").
# name: (input size, channels, train batch, meta batch, epochs, warm-up, lr, weight decay,
#        lambda_bd, lambda_dice, grad threshold, boundary ratio)
TABLE8 = {
  "kvasir_seg": (256, 3, 2, 2, 140, 10, 0.0060, 5e-4, 0.35, 0.08, 0.08, 0.14),
  "promise12": (144, 1, 1, 2, 120, 10, 0.0050, 5e-4, 0.30, 0.10, 0.10, 0.10),
  "msd_heart": (160, 1, 1, 2, 160, 15, 0.0040, 5e-4, 0.33, 0.12, 0.10, 0.11),
  "msd_brain": (160, 1, 1, 2, 180, 15, 0.0035, 4e-4, 0.28, 0.14, 0.12, 0.12),
}


def table8_config(name: str) -> ml_collections.ConfigDict:
  """The default config with dataset `name`'s Table 8 row (meta step 1, meta lr scale 0.01,
  tau_dcd 1.0 for every dataset)."""
  (size, channels, batch, meta_batch, epochs, warmup, lr, wd, lambda_bd, lambda_dice, clip, _) = (
    TABLE8[name]
  )
  config = default_config()
  config.data.name = name
  config.data.size = size
  config.data.channels = channels
  config.data.noise.scale_kernels_with_size = False  # L2B kernels as published
  config.model.width = 32
  config.train.batch_size = batch
  config.train.meta_batch_size = meta_batch
  config.train.num_epochs = epochs
  config.train.warmup_epochs = warmup
  config.train.lr = lr
  config.train.weight_decay = wd
  config.train.grad_clip = clip
  config.train.eval_every_epochs = 10
  config.meta.eta = 0.01
  config.dcd.lambda_bd = lambda_bd
  config.dcd.lambda_dice = lambda_dice
  config.dcd.tau_dcd = 1.0
  return config


# Settings added after runs were made, with the value that reproduces what a run made before
# them did, where that differs from today's default: a run's config.json without them reads as if
# it had these (`upgrade`).
OLDER_RUNS = {
  # Before the choice of the EMA weights' BatchNorm statistics: the EMA of the running statistics.
  "train.ema_batch_stats": "ema",
  # Before timed step checkpoints: none.
  "train.checkpoint_every_minutes": 0.0,
  # Before the label audit: no audit passes.
  "audit.epochs": 0,
  # Before the meta step's precision setting: the backend's default precision.
  "meta.precision": "default",
  # Before calibrated noise levels: the published kernels as they are.
  "data.noise.calibrate": False,
  # Before several hosts: one process, never joined.
  "distributed.initialize": "off",
}


def upgrade(settings: Mapping[str, Any]) -> dict[str, Any]:
  """A run folder's settings (its config.json) with every field of today's default config that
  they lack: the value of `OLDER_RUNS` where there is one (what such a run did), else today's
  default (settings that behave today as they did before they existed). Fields the settings have
  are kept as they are, those the default config no longer has included.

  >>> old = {"method": "l2b", "train": {"batch_size": 8}}
  >>> new = upgrade(old)
  >>> new["train"]["batch_size"], new["train"]["ema_batch_stats"], new["train"]["lr"]
  (8, 'ema', 0.05)
  """
  filled = default_config().to_dict()
  for dotted, value in OLDER_RUNS.items():
    *path, field = dotted.split(".")
    node = settings
    for key in path:
      node = node.get(key, {}) if isinstance(node, Mapping) else {}
    if field not in node:
      section = filled
      for key in path:
        section = section[key]
      section[field] = value
  return _merged(filled, settings)


def _merged(base: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
  """`base` with `given`'s values, section by section (`given` wins)."""
  out = dict(base)
  for key, value in given.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), dict):
      out[key] = _merged(out[key], value)
    else:
      out[key] = value
  return out


def from_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(arg)`) of the config file at `path`, loaded by its path as
  `--config=PATH` loads it, so that one config file can build on another."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"_metadcseg_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
