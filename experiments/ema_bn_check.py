r"""Validation Dice of finished runs' EMA parameters under three choices of BatchNorm statistics.

    python -m experiments.ema_bn_check /path/bench/l2b40/ce/seed0 /path/bench/l2b40/l2b/seed0

For each run folder (a `metadcseg-train` workdir with config.json and checkpoints/), the newest
checkpoint's validation Dice with:
  * raw: the raw parameters and their running statistics (the trainer's "raw" row);
  * ema_emabn: the EMA parameters with the EMA of the running statistics (the trainer's "ema");
  * ema_rawbn: the EMA parameters with the raw model's statistics (the trainer before the EMA
    of the statistics);
  * ema_recal: the EMA parameters with statistics recomputed for them by one train-mode pass
    over the training images (SWA's bn_update);
  * raw_recal: the same recomputation for the raw parameters.
Validation split only: this informs a choice, so the test split stays unread.
"""

import pathlib
from typing import Sequence

from absl import app
import jax
import jax.numpy as jnp
import numpy as np

from metadcseg_jax import metrics as metrics_lib
from metadcseg_jax.core.models import unet
from metadcseg_jax.training import runs


def check_run(run: pathlib.Path) -> dict[str, float]:
  """{variant: validation Dice} of one run folder (variants as in the module docstring)."""
  opened = runs.open_run(run)
  state = opened.restored()
  config, splits, model = opened.config, opened.splits, opened.method.model

  def stack(records, key):
    return np.stack([records[i][key] for i in range(len(records))])

  @jax.jit
  def recompute(params, batch_stats, x):
    # flax's running update is m·old + (1 − m)·batch: from zeros it is (1 − m)·batch.
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    _, upd = model.apply(
      {"params": params, "batch_stats": zeros}, x, train=True, mutable=["batch_stats"]
    )
    return jax.tree.map(lambda v: v / (1.0 - unet.BN_MOMENTUM), upd["batch_stats"])

  @jax.jit
  def predict(params, batch_stats, x):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  train_x = stack(splits.train, "image").astype(np.float32)
  val_x, val_y = stack(splits.val, "image").astype(np.float32), stack(splits.val, "label")

  def dice(params, batch_stats):
    pred = np.asarray(predict(params, batch_stats, val_x))
    cases = metrics_lib.batch_case_metrics(pred, val_y, num_classes=config.data.num_classes)
    return metrics_lib.summarize(cases)["dice"]

  return {
    "raw": dice(state.params, state.batch_stats),
    "raw_recal": dice(state.params, recompute(state.params, state.batch_stats, train_x)),
    "ema_emabn": dice(state.ema_params, state.ema_batch_stats),
    "ema_rawbn": dice(state.ema_params, state.batch_stats),
    "ema_recal": dice(state.ema_params, recompute(state.ema_params, state.batch_stats, train_x)),
  }


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("give one or more run folders")
  for run in argv[1:]:
    row = check_run(pathlib.Path(run))
    print(run, " ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
  app.run(main)
