r"""Choosing the label audit's image score on validation runs (never on the reported ones).

    python -m experiments.audit_select RUN [RUN ...]

Each RUN is a finished meta-method run with injected noise and audit passes; for the
whole-meta-set variant, a copy of it recomputed with `metadcseg-audit --recompute
--meta_images=32`. Prints, per run and candidate, the image AUROC for "1 − Dice to the clean
mask > t" at t = 0.1 / 0.3 / 0.5, and the criterion fixed before the runs were looked at: the
mean AUROC at 0.3 and 0.5 (the thresholds where both classes hold at least a fifth of the
masks); then the criterion's mean over the runs. The runs used and the choice made:
BUILD_NOTES.md, "Label audit: the score chosen on validation".

Candidates, with d = [y ≠ ŷ] and the meta share πb of `metadcseg_jax/training/audit_passes.py`:
  * meta suspicion: Σ d·πb / (|y| + |ŷ|);
  * signed meta: Σ d·(2πb − 1) / (|y| + |ŷ|), where the meta set siding with the given label
    counts against suspicion;
  * meta share: Σ d·πb / Σ d, the meta set's verdict without the size of the disagreement;
  * disagreement 1 − Dice(y, ŷ) and soft disagreement (`audit_scores.soft_dice_distance`, the score
    audit.csv is sorted by: `audit_report.ranking_score`), which read no meta-weights;
  * the rank mean of the meta suspicion and the soft disagreement, added after the others had
    been read on the validation runs, so shown but not eligible.
"""

import pathlib
from typing import Sequence

from absl import app
import numpy as np
from scipy import stats

from metadcseg_jax.audit import report as audit_report
from metadcseg_jax.audit import scores as audit_scores

THRESHOLDS = (0.1, 0.3, 0.5)
CRITERION = (0.3, 0.5)
META_FREE = ("disagreement", "soft disagreement")  # read no meta-weights


def candidates(scores: dict, noisy: np.ndarray) -> dict[str, np.ndarray]:
  """{name: (N,) image score} from `audit_scores.load`'s scores and the given labels (N,H,W)."""
  d = noisy != scores["pseudo"]
  size = np.maximum(np.sum(noisy > 0, axis=(1, 2)) + np.sum(scores["pseudo"] > 0, axis=(1, 2)), 1)
  share_sum = np.sum(scores["suspicion"], axis=(1, 2))  # suspicion is d·πb
  out = {
    "meta suspicion": scores["score"],
    "signed meta": np.sum(d * (2.0 * scores["suspicion"] - 1.0), axis=(1, 2)) / size,
    "meta share": share_sum / np.maximum(np.sum(d, axis=(1, 2)), 1),
    "disagreement": audit_scores.dice_distance(noisy, scores["pseudo"]),
  }
  if "probs" in scores:
    out["soft disagreement"] = audit_scores.soft_dice_distance(noisy, scores["probs"])
    # Added after the others had been read on these runs: shown, never eligible.
    out["rank mean (post hoc)"] = stats.rankdata(out["meta suspicion"]) + stats.rankdata(
      out["soft disagreement"]
    )
  return out


def measure_run(run) -> tuple[dict[str, list[float]], int]:
  """({candidate: [AUROC at each of THRESHOLDS]}, the meta images of the run's passes)."""
  _, scores, train, positions = audit_report.audited(run)
  noisy = np.stack([train[k]["noisy_label"] for k in positions])
  clean = np.stack([train[k]["label"] for k in positions])
  corruption = audit_scores.dice_distance(noisy, clean)
  return {
    name: [audit_scores.auroc(s, corruption > t) for t in THRESHOLDS]
    for name, s in candidates(scores, noisy).items()
  }, scores["meta_images"]


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("give one or more run folders (validation runs)")
  criterion = {}
  for run in argv[1:]:
    by_name, meta_images = measure_run(pathlib.Path(run))
    meta_set = f"whole meta set ({meta_images})" if meta_images else "training's meta batches"
    print(f"{run} ({meta_set})")
    for name, aurocs in by_name.items():
      if meta_images and name in META_FREE:
        continue  # the same as in the run it was recomputed from
      crit = float(np.mean([a for t, a in zip(THRESHOLDS, aurocs) if t in CRITERION]))
      key = name if name in META_FREE else f"{name}, {meta_set.split(' (')[0]}"
      criterion.setdefault(key, []).append(crit)
      cells = " / ".join(f"{a:.3f}" for a in aurocs)
      print(f"  {name:20s} AUROC {cells}   criterion {crit:.3f}")
  print("mean criterion over the runs:")
  for name, values in sorted(criterion.items(), key=lambda kv: -np.mean(kv[1])):
    print(f"  {np.mean(values):.3f}  {name}  ({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
  app.run(main)
