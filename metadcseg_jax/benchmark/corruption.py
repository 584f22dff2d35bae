"""The measured corruption of each label-noise kind on a dataset's training masks, as a table
(`metadcseg-corrupt`)."""

from typing import Sequence

import ml_collections
import numpy as np

from metadcseg_jax.data import noise
from metadcseg_jax.data import pipeline
from metadcseg_jax.data.noise import cache as noise_cache
from metadcseg_jax.errors import ConfigError


def corruption_table(config: ml_collections.ConfigDict, kinds: Sequence[str]) -> str:
  """Builds (or reuses) the cached noisy training labels of each kind; the markdown table of
  their measured corruption 1 - Dice (Eq. 20): mean, std, min, max, share emptied.

  The cache is the one training reads (`<data_dir>/noisy_labels/<dataset build>/`), with the
  config's noise options (calibrated levels by default). The meta split is not corrupted at
  training time; this table covers every training mask, as the paper's corruption rates do.
  """
  bad = [k for k in kinds if k not in noise.KINDS]
  if bad or not kinds:
    raise ConfigError(f"--kinds: unknown {bad or 'empty list'}, choose from {noise.KINDS}")
  sources, key, _ = pipeline.open_dataset(config.data)
  clean = pipeline.load_labels(sources["train"], f"{key}/train", config.data.num_classes)
  rows = [
    f"dataset {key}: {len(clean)} training masks, noise seed {config.data.noise.seed}",
    "",
    "| kind | options | 1 - Dice mean | std | min | max | emptied |",
    "|---|---|---|---|---|---|---|",
  ]
  for kind in kinds:
    noise_cfg = config.data.noise.copy_and_resolve_references()
    with noise_cfg.unlocked():
      noise_cfg.kind = kind
    options = pipeline.noise_options(noise_cfg)
    noisy = noise_cache.cached_noisy_labels(
      clean,
      cache_dir=pipeline.noise_cache_dir(config.data, key),
      dataset_key=key,
      kind=kind,
      seed=config.data.noise.seed,
      options=options,
    )
    rate = noise.measured_corruption(clean, noisy)
    emptied = np.mean(
      (noisy.reshape(len(noisy), -1).max(1) == 0) & (clean.reshape(len(clean), -1).max(1) > 0)
    )
    opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
    rows.append(
      f"| {kind} | {opts} | {rate.mean():.3f} | {rate.std():.3f} | {rate.min():.3f} "
      f"| {rate.max():.3f} | {emptied:.0%} |"
    )
  return "\n".join(rows)
