r"""Choosing `config.train.ema_batch_stats` on validation data, from finished runs.

    python -m experiments.ema_bn_select TABLE_DIR [TABLE_DIR ...]

Each TABLE_DIR is a `metadcseg-benchmark` workdir; every run in it that recorded both choices of
the EMA weights' BatchNorm statistics (cases.json "ema_bn") takes part. The candidates:
  * ema: the EMA of the running statistics, always;
  * recompute: statistics recomputed for the EMA weights (SWA's bn_update), always;
  * best_val: per run, whichever of the two has the higher mean validation Dice.
A per-run choice cannot be scored on the cases it was made on, so every candidate is scored by
two-fold cross-fitting on the validation split alone: the cases are halved at random, the choice
is made on one half and scored on the other, both ways, over `--splits` random halvings. The
criterion, fixed before the runs were read: the mean over tables of each table's mean held-out
validation Dice (every table counts the same, whatever its number of runs). The test split is
never read. The runs used and the choice made: BUILD_NOTES.md, "The EMA weights' BatchNorm
statistics".
"""

import json
import pathlib
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from metadcseg_jax.training import train

_SPLITS = flags.DEFINE_integer("splits", 200, "Random halvings of each run's validation cases.")
CANDIDATES = ("ema", "recompute", "best_val")


def val_dice(run: pathlib.Path) -> dict[str, np.ndarray] | None:
  """{"ema", "recompute": (N,) validation Dice per case} of a finished run, None without both."""
  try:
    entry = json.loads((run / train.CASES_FILE).read_text())["val"]["ema_bn"]
    out = {bn: np.asarray(entry[bn]["dice"], np.float64) for bn in ("ema", "recompute")}
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return out


def cross_fitted(dice: dict[str, np.ndarray], splits: int, seed: int = 0) -> dict[str, float]:
  """Held-out mean validation Dice of each candidate in `CANDIDATES` (two-fold, `splits` random
  halvings; a case without a Dice, both masks empty, is left out of the means)."""
  ema, rec = dice["ema"], dice["recompute"]
  keep = np.isfinite(ema) & np.isfinite(rec)
  ema, rec = ema[keep], rec[keep]
  rng = np.random.default_rng(seed)
  n = len(ema)
  totals = dict.fromkeys(CANDIDATES, 0.0)
  for _ in range(splits):
    order = rng.permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    for chose_on, scored_on in (halves, halves[::-1]):
      totals["ema"] += ema[scored_on].mean()
      totals["recompute"] += rec[scored_on].mean()
      pick = rec if rec[chose_on].mean() > ema[chose_on].mean() else ema
      totals["best_val"] += pick[scored_on].mean()
  return {k: v / (2 * splits) for k, v in totals.items()}


def main(argv: Sequence[str]) -> None:
  tables = [pathlib.Path(a).expanduser() for a in argv[1:]]
  if not tables:
    raise app.UsageError("give one or more benchmark workdirs")
  per_table = {}
  for table in tables:
    runs = sorted(p.parent for p in table.glob(f"*/*/seed*/{train.CASES_FILE}"))
    scores = []
    for run in runs:
      dice = val_dice(run)
      if dice is None:
        continue
      s = cross_fitted(dice, _SPLITS.value)
      scores.append(s)
      print(
        f"{run.relative_to(table)}: " + ", ".join(f"{k} {s[k] * 100:.2f}" for k in CANDIDATES),
        flush=True,
      )
    if scores:
      per_table[table] = {k: float(np.mean([s[k] for s in scores])) for k in CANDIDATES}
      means = ", ".join(f"{k} {per_table[table][k] * 100:.2f}" for k in CANDIDATES)
      print(f"{table} ({len(scores)} runs): {means}\n", flush=True)
  if not per_table:
    raise app.UsageError("no run with both choices of statistics in cases.json")
  criterion = {k: float(np.mean([t[k] for t in per_table.values()])) for k in CANDIDATES}
  print(
    "criterion (mean over tables): " + ", ".join(f"{k} {v * 100:.2f}" for k, v in criterion.items())
  )
  print(f"chosen: {max(criterion, key=criterion.get)}")


if __name__ == "__main__":
  app.run(main)
