"""Corrupts a dataset's training labels once, caches them, prints the measured corruption.

    metadcseg-corrupt --config=experiments/configs/default.py --kinds=l2b20,l2b40,l2b60
    metadcseg-corrupt --config=experiments/configs/kvasir_seg.py \
        --config.data.manual_dir=/data/Kvasir-SEG --kinds=l2b20,l2b40,l2b60

The cache (noisy_{kind}_seed{seed}.npy + manifest.json with parameters, seed, noise version and
the measured corruption) lives in `<data_dir>/noisy_labels/<dataset key>/`, exactly where
training reads it; a rerun reuses it. Prints a markdown table of 1 - Dice (SPEC §5, Eq. 20) per
kind: mean, std, min, max over the training masks. The meta split is not corrupted at training
time; this table covers every training mask, as the paper's corruption rates do.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).",
                                          lock_config=True)
_KINDS = flags.DEFINE_list("kinds", ["l2b20", "l2b40", "l2b60"], "Noise kinds to build.")
flags.mark_flags_as_required(["config"])


def corruption_table(config, kinds) -> str:
  """Builds (or reuses) the cached noisy labels for each kind; returns the markdown table."""
  from metadcseg_jax import noise  # pylint: disable=g-import-not-at-top
  from metadcseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  sources, key, _ = pipeline.load_sources(config.data)
  clean = pipeline.load_labels(sources["train"], f"{key}/train", config.data.num_classes)
  rows = [f"dataset {key}: {len(clean)} training masks, noise seed {config.data.noise.seed}",
          "", "| kind | options | 1 - Dice mean | std | min | max | emptied |",
          "|---|---|---|---|---|---|---|"]
  for kind in kinds:
    noise_cfg = config.data.noise.copy_and_resolve_references()
    with noise_cfg.unlocked():
      noise_cfg.kind = kind
    options = pipeline.noise_options(noise_cfg)
    noisy = noise.cached_noisy_labels(
        clean, cache_dir=pipeline.noise_cache_dir(config.data, key), dataset_key=key, kind=kind,
        seed=config.data.noise.seed, options=options)
    rate = noise.measured_corruption(clean, noisy)
    emptied = np.mean((noisy.reshape(len(noisy), -1).max(1) == 0)
                      & (clean.reshape(len(clean), -1).max(1) > 0))
    opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
    rows.append(f"| {kind} | {opts} | {rate.mean():.3f} | {rate.std():.3f} | {rate.min():.3f} "
                f"| {rate.max():.3f} | {emptied:.0%} |")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  print(corruption_table(_CONFIG.value, _KINDS.value))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
