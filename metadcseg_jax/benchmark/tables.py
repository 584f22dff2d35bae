"""The benchmark's numbers from its finished runs: the table cells (mean ± std over seeds), the
paired comparisons with failed runs counted against their row, and which row to choose.

Each run keeps every test case's scores (cases.json), from which the paired comparisons are
computed (`metadcseg_jax.benchmark.stats`: mean paired difference, a 95% interval over seeds and
test cases, its seed and test-set parts, a verdict, the seeds for a ±2-point interval and for
80% power at a 2-point gap). A run that failed stays in its comparisons as a failure
(`count_failures`).
"""

import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import stats
from metadcseg_jax.metrics import METRIC_KEYS
from metadcseg_jax.training import train


def load_results(path: pathlib.Path) -> dict[str, Any]:
  try:
    results = json.loads(path.read_text())
    for split in ("val", "test"):
      for params in ("raw", "ema"):
        for k in ("dice", "iou", "hd95"):
          float(results[split][params][k])
    int(results["epoch"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not a trainer results.json ({type(e).__name__}: {e})") from None
  return results


def _with_ema_choice(results: dict[str, Any], ema_choice: str | None) -> dict[str, Any]:
  """`results` with "ema" the EMA weights under the BatchNorm statistics `ema_choice` (for
  "best_val", the run's own choice on its validation Dice: `train.chosen_ema_stats`) where the
  run recorded both: a table reads one rule, whatever each run was configured with."""
  if ema_choice is None:
    return results
  chosen = train.chosen_ema_stats(results["val"].get("ema_bn"), ema_choice)
  for split in ("val", "test"):
    if chosen in results[split].get("ema_bn", {}):
      results[split]["ema"] = results[split]["ema_bn"][chosen]
  return results


def _stat(values: Sequence[float]) -> dict[str, Any]:
  """Mean and sample std (ddof=1; None for a single seed) over seeds."""
  arr = np.asarray(values, float)
  std = float(np.std(arr, ddof=1)) if arr.size > 1 else None
  return {"mean": float(np.mean(arr)), "std": std, "values": [float(v) for v in arr]}


def _per_class_stats(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """{class name: {metric: `_stat`}} over runs' summaries, or {} unless all of them scored
  the same classes (two-class data has no per_class)."""
  per = [s.get("per_class") for s in summaries]
  if not per or not all(isinstance(p, Mapping) and p for p in per):
    return {}
  names = list(per[0])
  if any(list(p) != names for p in per[1:]):
    return {}
  return {
    name: {
      k: _stat([p[name][k] for p in per]) for k in METRIC_KEYS if all(k in p[name] for p in per)
    }
    for name in names
  }


def _corruption(run: pathlib.Path) -> float | None:
  try:
    return float(json.loads((run / "data_info.json").read_text())["noise"]["corruption_mean"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def collect(
  workdir,
  *,
  rows: Sequence[presets.Row],
  noises: Sequence[str],
  seeds: Sequence[int] | None = None,
  ema_choice: str | None = None,
) -> list[dict[str, Any]]:
  """The table cells from the finished runs under `workdir`.

  Args:
    workdir: the benchmark's root directory.
    rows: the table's rows.
    noises: the noise levels.
    seeds: the seeds to read (None: every seed folder found).
    ema_choice: the EMA weights' BatchNorm statistics "ema" reads (`_with_ema_choice`).

  Returns:
    One cell per (noise, row) with at least one finished seed, noise-major (levels by value,
    `sort_noises`):
    `{"noise", "label", "method", "overrides": [[key, value], ...], "seeds": [...], "epochs":
    [...], "corruption": mean 1 - Dice of the training labels or None, "test"/"val":
    {"ema"/"raw": {metric: {"mean", "std", "values"}}}}` over `METRIC_KEYS`; std is the sample
    std over seeds (ddof=1), None for one. Data of more than two classes add "per_class":
    {class name: {metric: {"mean", "std", "values"}}} beside the metrics (every seed scored the
    same classes).

  Raises:
    ValueError: `workdir` is not a directory, or a results.json is malformed.
  """
  root = pathlib.Path(workdir).expanduser()
  if not root.is_dir():
    raise ValueError(f"workdir={str(workdir)!r}: not a directory")
  cells = []
  for noise_kind in presets.sort_noises(noises):
    for row in rows:
      found = []
      for seed_dir in sorted((root / noise_kind / row.dirname).glob("seed*")):
        seed_text = seed_dir.name[len("seed") :]
        if not seed_text.isdigit() or (seeds is not None and int(seed_text) not in seeds):
          continue
        if (seed_dir / "results.json").is_file():
          results = _with_ema_choice(load_results(seed_dir / "results.json"), ema_choice)
          found.append((int(seed_text), seed_dir, results))
      if not found:
        continue
      found.sort(key=lambda f: f[0])
      cell = {
        "noise": noise_kind,
        "label": row.label,
        "method": row.method,
        "overrides": [[k, v] for k, v in row.overrides],
        "seeds": [f[0] for f in found],
        "epochs": [int(f[2]["epoch"]) for f in found],
        "corruption": _corruption(found[0][1]),
      }
      for split in ("test", "val"):
        cell[split] = {
          params: {
            k: _stat([f[2][split][params][k] for f in found])
            for k in METRIC_KEYS
            if all(k in f[2][split][params] for f in found)
          }
          for params in ("ema", "raw")
        }
        for params in ("ema", "raw"):
          per_class = _per_class_stats([f[2][split][params] for f in found])
          if per_class:
            cell[split][params]["per_class"] = per_class
        # The EMA weights with each choice of BatchNorm statistics (runs that recorded both).
        if all("ema_bn" in f[2][split] for f in found):
          for bn in train.EMA_BATCH_STATS:
            cell[split][f"ema_bn_{bn}"] = {
              "dice": _stat([f[2][split]["ema_bn"][bn]["dice"] for f in found])
            }
      cells.append(cell)
  return cells


def claim_pairs(cells: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """The (row, reference row) pairs the tables make claims about, by label: MetaDCSeg against
  L2B; every ablation variant against its method's default row; every other method against
  CE."""
  methods_of = {c["label"]: c["method"] for c in cells}
  pairs = []
  if "metadcseg" in methods_of and "l2b" in methods_of:
    pairs.append(("metadcseg", "l2b"))
  for label, method in methods_of.items():
    if label != method and method in methods_of:
      pairs.append((label, method))
    elif label == method and method != "ce" and "ce" in methods_of:
      pairs.append((label, "ce"))
  return list(dict.fromkeys(pairs))


def _case_scores(run: pathlib.Path, split: str, params: str, metric: str, ema_choice=None):
  """(case ids, scores) of one finished run from its cases.json; None when it has none.

  `params`: "raw", "ema", or "ema_bn_<choice>" (the EMA weights with that choice of BatchNorm
  statistics); "ema" reads the `ema_choice` statistics where the run recorded both."""
  try:
    entry = json.loads((run / train.CASES_FILE).read_text())[split]
    if params == "ema" and ema_choice is not None:
      if ema_choice == train.BEST_ON_VAL:
        val = json.loads((run / "results.json").read_text())["val"].get("ema_bn")
        ema_choice = train.chosen_ema_stats(val, ema_choice)
      if ema_choice in entry.get("ema_bn", {}):
        params = f"ema_bn_{ema_choice}"
    entry = (
      entry["ema_bn"][params[len("ema_bn_") :]] if params.startswith("ema_bn_") else entry[params]
    )
  except (OSError, ValueError, KeyError, TypeError):
    return None
  values = np.asarray([np.nan if v is None else v for v in entry[metric]], np.float64)
  return list(entry["case_ids"]), values


def paired_scores(
  root: pathlib.Path,
  cell_a,
  cell_b,
  *,
  split: str,
  params_a: str,
  params_b: str,
  metric: str,
  ema_choice: str | None = None,
):
  """(seeds, a (S, N), b (S, N)) over the seeds both cells finished with case scores.

  Args:
    root: the benchmark's root directory.
    cell_a, cell_b: two `collect` cells at the same noise level.
    split: "test" or "val".
    params_a, params_b: "raw", "ema" or "ema_bn_<choice>" of each cell (`_case_scores`).
    metric: the per-case score compared ("dice").
    ema_choice: the BatchNorm statistics "ema" reads.
  """
  dir_a, dir_b = (presets.Row(c["label"], c["method"]).dirname for c in (cell_a, cell_b))
  seeds, rows_a, rows_b = [], [], []
  for seed in [s for s in cell_a["seeds"] if s in cell_b["seeds"]]:
    a = _case_scores(
      root / cell_a["noise"] / dir_a / f"seed{seed}", split, params_a, metric, ema_choice
    )
    b = _case_scores(
      root / cell_b["noise"] / dir_b / f"seed{seed}", split, params_b, metric, ema_choice
    )
    if a is None or b is None:
      continue
    if a[0] != b[0]:
      raise ValueError(
        f"{cell_a['noise']}/{dir_a} and {dir_b} seed {seed}: scored on different {split} cases"
      )
    seeds.append(seed)
    rows_a.append(a[1])
    rows_b.append(b[1])
  if not seeds:
    return [], None, None
  return seeds, np.stack(rows_a), np.stack(rows_b)


def lost_seeds(
  failed: Sequence[Mapping[str, Any]], cells: Sequence[Mapping[str, Any]]
) -> dict[tuple[str, str], list[int]]:
  """The seeds each (noise, row) lost to failed runs.

  Args:
    failed: `run_benchmark`'s failed runs, {"noise", "row" (label), "seed", ...} each.
    cells: `collect`'s cells; a failed seed that has since finished is not lost.

  Returns:
    {(noise, row label): sorted lost seeds}, only for those that lost any.
  """
  finished = {(c["noise"], c["label"]): set(c["seeds"]) for c in cells}
  out: dict[tuple[str, str], set[int]] = {}
  for f in failed:
    key, seed = (f["noise"], f["row"]), int(f["seed"])
    if seed not in finished.get(key, ()):
      out.setdefault(key, set()).add(seed)
  return {k: sorted(v) for k, v in out.items()}


# A comparison with no seed that both rows finished: `stats.paired_difference`'s fields, empty.
_NO_PAIR = {
  "mean": None,
  "seeds": 0,
  "cases": 0,
  "se_seed": None,
  "se_test": None,
  "seeds_for_half_width": None,
  "seeds_for_power": None,
  "low": None,
  "high": None,
  "df": None,
  "verdict": "no paired seeds",
}


def count_failures(
  comparison: Mapping[str, Any], lost_row: Sequence[int], lost_reference: Sequence[int]
) -> dict[str, Any]:
  """A comparison with the seeds each side lost to failed runs counted against it.

  A failed run (diverged, out of memory, raised) stays in the comparison as a failure, in the
  claim: the interval is computed on the seeds both rows finished, and a verdict that favours a
  row that lost seeds is withheld ("ahead" when the row lost any, "behind" when the reference
  did: the verdict becomes "not resolved", `withheld` says which was withheld). The failures
  are reported as "k of S seeds" beside it.

  Why not score the failed run's cases as its output would be (empty masks after a
  divergence): a run that ran out of memory or raised has no output, a diverged run's NaN
  weights give whatever argmax makes of NaN, and scoring empty masks needs each test case's
  reference emptiness, which cases.json does not keep (Dice 0 with the image diagonal as HD95
  is what both a missed mask and a false one on an empty reference score). Any stand-in would
  put a guess inside the interval. The claim form needs no guess and cannot favour the
  unstable row: with its failed seeds dropped it is shown at its best, so only the verdicts in
  its favour are at stake, and those are withheld; a verdict against it stands.

  Args:
    comparison: `stats.paired_difference`'s fields and "seed_list", the seeds paired.
    lost_row, lost_reference: the seeds the row and the reference lost (`lost_seeds`).

  Returns:
    The comparison with "verdict" as above and "withheld" (the interval's own verdict where it
    was withheld, else None), "seeds_lost_row", "seeds_lost_reference" (lists) and
    "seeds_attempted" (S: the seeds paired or lost by either side).
  """
  out = dict(comparison)
  out["seeds_lost_row"], out["seeds_lost_reference"] = list(lost_row), list(lost_reference)
  out["seeds_attempted"] = len(set(out["seed_list"]) | set(lost_row) | set(lost_reference))
  out["withheld"] = None
  if (out["verdict"] == "ahead" and lost_row) or (out["verdict"] == "behind" and lost_reference):
    out["withheld"], out["verdict"] = out["verdict"], "not resolved"
  return out


def comparisons(
  workdir,
  cells: Sequence[Mapping[str, Any]],
  *,
  split: str = "test",
  metric: str = "dice",
  ema_choice: str | None = None,
  failed: Sequence[Mapping[str, Any]] = (),
  pairs: Sequence[tuple[str, str]] | None = None,
  params: Sequence[str] = ("ema", "raw"),
) -> list[dict[str, Any]]:
  """The paired differences of every pair at every noise level, failed runs counted.

  Args:
    workdir: the benchmark's root directory.
    cells: `collect`'s cells.
    split, metric: the scores compared ("test", "dice").
    ema_choice: the EMA weights' BatchNorm statistics (`_case_scores`).
    failed: `run_benchmark`'s failed runs; their seeds count against their row
      (`count_failures`), and a row that lost every seed at a level still gets its line.
    pairs: (row, reference) labels; default `claim_pairs` of the rows that finished or failed.
    params: the parameters compared, "ema" and "raw" by default.

  Returns:
    Dicts {"noise", "row", "reference", "params", "split", "metric", "seed_list"} plus
    `stats.paired_difference`'s fields (in units of the metric: Dice in [0, 1]; those of
    `_NO_PAIR` where no seed paired) and `count_failures`'s, noise levels by value.
  """
  root = pathlib.Path(workdir)
  by = {(c["noise"], c["label"]): c for c in cells}
  lost = lost_seeds(failed, cells)
  if pairs is None:
    known = [{"label": c["label"], "method": c["method"]} for c in cells]
    known += [{"label": f["row"], "method": f.get("method", f["row"])} for f in failed]
    pairs = claim_pairs(known)
  out = []
  for noise_kind in presets.sort_noises([c["noise"] for c in cells] + [n for n, _ in lost]):
    for a, b in pairs:
      lost_a, lost_b = lost.get((noise_kind, a), []), lost.get((noise_kind, b), [])
      if ((noise_kind, a) not in by and not lost_a) or ((noise_kind, b) not in by and not lost_b):
        continue  # a row neither finished nor failed at this level: nothing to say yet
      for p in params:
        seeds, sa, sb = [], None, None
        if (noise_kind, a) in by and (noise_kind, b) in by:
          seeds, sa, sb = paired_scores(
            root,
            by[noise_kind, a],
            by[noise_kind, b],
            split=split,
            params_a=p,
            params_b=p,
            metric=metric,
            ema_choice=ema_choice,
          )
        if not seeds and not (lost_a or lost_b):
          continue
        found = {
          "noise": noise_kind,
          "row": a,
          "reference": b,
          "params": p,
          "split": split,
          "metric": metric,
          "seed_list": seeds,
          **(stats.paired_difference(sa, sb) if seeds else _NO_PAIR),
        }
        out.append(count_failures(found, lost_a, lost_b))
  return out


def choose(
  workdir,
  cells: Sequence[Mapping[str, Any]],
  *,
  ema_choice: str | None = None,
  failed: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
  """Which row to choose at each noise level: the best mean validation Dice of the EMA weights
  (chosen where settings are chosen, so that the test verdicts are not those of the row the
  test split picked) and every other row's paired difference to it on test (`comparisons`,
  failed runs counted).

  Args:
    workdir: the benchmark's root directory.
    cells: `collect`'s cells.
    ema_choice: the EMA weights' BatchNorm statistics, as the tables read them.
    failed: `run_benchmark`'s failed runs (`count_failures`); a row that lost every seed at a
      level is listed there with no paired seeds.

  Returns:
    Per noise level (by value): {"noise", "best" (label), "best_mean" (Dice in [0, 1]),
    "best_seeds" (finished), "best_lost" (seeds lost), "others": `comparisons` dicts of (other
    row, best row), "ahead_of": the rows the best is resolved ahead of (their verdict
    "behind")}.
  """
  lost = lost_seeds(failed, cells)
  out = []
  for noise_kind in presets.sort_noises(c["noise"] for c in cells):
    level = [c for c in cells if c["noise"] == noise_kind and "dice" in c["test"]["ema"]]
    if not level:
      continue
    split = "val" if all("dice" in c.get("val", {}).get("ema", {}) for c in level) else "test"
    best = max(level, key=lambda c: c[split]["ema"]["dice"]["mean"])
    others = [c["label"] for c in level if c is not best]
    others += [row for n, row in lost if n == noise_kind and row not in others + [best["label"]]]
    found = comparisons(
      workdir,
      level,
      ema_choice=ema_choice,
      failed=[f for f in failed if f["noise"] == noise_kind],
      pairs=[(row, best["label"]) for row in others],
      params=("ema",),
    )
    out.append(
      {
        "noise": noise_kind,
        "best": best["label"],
        "best_mean": best["test"]["ema"]["dice"]["mean"],
        "chosen_on": split,
        "best_seeds": list(best["seeds"]),
        "best_lost": lost.get((noise_kind, best["label"]), []),
        "others": found,
        "ahead_of": [c["row"] for c in found if c["verdict"] == "behind"],
      }
    )
  return out


def ema_bn_comparisons(workdir, cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Validation Dice of the EMA weights with recomputed BatchNorm statistics against the EMA of
  the statistics, paired over seeds and validation cases, for every cell that recorded both:
  what the default of `config.train.ema_batch_stats` is chosen on."""
  root = pathlib.Path(workdir)
  out = []
  for cell in cells:
    seeds, rec, ema = paired_scores(
      root,
      cell,
      cell,
      split="val",
      params_a="ema_bn_recompute",
      params_b="ema_bn_ema",
      metric="dice",
    )
    if seeds:
      out.append(
        {
          "noise": cell["noise"],
          "row": cell["label"],
          "seed_list": seeds,
          "recompute": float(np.mean(rec)),
          "ema": float(np.mean(ema)),
          **stats.paired_difference(rec, ema, resolve=None),
        }
      )
  return out
