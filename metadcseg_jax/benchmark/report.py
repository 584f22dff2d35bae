"""The benchmark's outputs: benchmark.md (which row to choose, the tables in the layout of the
paper's Table 2 and Table 5, the paired comparisons, the EMA statistics, the label noise, the
failed runs), benchmark.json and dice_vs_noise.png, rewritten after every run.
"""

import json
import math
import os
import pathlib
import shlex
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from metadcseg_jax import files
from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import stats
from metadcseg_jax.benchmark import tables
from metadcseg_jax.training import figures


# The paper's table columns for each noise level: (metric key, header, decimals, scale).
TABLE_METRICS = (("miou", "mIoU", 2, 100.0), ("dice", "DSC", 2, 100.0), ("hd95", "HD95", 2, 1.0))


def _points(value: float | None, signed: bool = True) -> str:
  if value is None:
    return "-"
  return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def _interval(c: Mapping[str, Any]) -> str:
  if c["low"] is None:
    return "-"
  return f"[{c['low'] * 100:+.2f}, {c['high'] * 100:+.2f}]"


def _lost(c: Mapping[str, Any], row: str = "row", reference: str = "reference") -> str:
  """The seeds each side of a comparison lost, "row 1 of 3" or "row 1, reference 2 of 3" (the
  sides named `row` and `reference`); "-" when neither lost any."""
  parts = [
    f"{name} {len(c[key])}"
    for name, key in ((row, "seeds_lost_row"), (reference, "seeds_lost_reference"))
    if c.get(key)
  ]
  return f"{', '.join(parts)} of {c['seeds_attempted']}" if parts else "-"


def _verdict(c: Mapping[str, Any]) -> str:
  if c.get("withheld"):
    return f"{c['verdict']} ({c['withheld']} on the finished seeds)"
  return c["verdict"]


def _seeds_needed(c: Mapping[str, Any], key: str) -> str:
  if c[key] is not None:
    return str(c[key])
  return f"> {stats.MAX_SEEDS}" if c["low"] is not None else "-"


# What the planning columns of the comparison table mean, wherever the table is shown.
PLANNING_NOTE = (
  "Seeds for a ±2-point interval: the seeds at which the interval's half-width would be 2 "
  "points at the measured variance (a precision estimate, itself noisy from 3 seeds). Seeds "
  "for 80% power: the seeds at which a true 2-point difference would be called ahead 80% of "
  "the time, from the measured seed, test-set and interaction components "
  "(`metadcseg_jax.benchmark.stats`)."
)


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: one line per paired comparison (differences in points of the metric), with the
  seeds each side lost to failed runs and the two planning figures."""
  out = [
    "| noise | row − reference | params | seeds | seeds lost | difference | 95% interval "
    "| seed part (se) | test part (se) | verdict | seeds for a ±2-point interval "
    "| seeds for 80% power at 2 points |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for c in rows:
    out.append(
      f"| {presets.noise_label(c['noise'])} | {c['row']} − {c['reference']} | {c['params']} "
      f"| {len(c['seed_list'])} | {_lost(c)} | {_points(c['mean'])} | {_interval(c)} "
      f"| {_points(c['se_seed'], False)} | {_points(c['se_test'], False)} | {_verdict(c)} "
      f"| {_seeds_needed(c, 'seeds_for_half_width')} | {_seeds_needed(c, 'seeds_for_power')} |"
    )
  return "\n".join(out)


def choice_lines(choice: Sequence[Mapping[str, Any]]) -> list[str]:
  """Markdown: `choose`'s verdicts, a line per noise level (differences in points)."""
  out = [
    "## Which method to choose",
    "",
    "At each noise level the row with the best mean validation Dice of the EMA weights (chosen "
    "on validation, as every setting is), its mean test Dice, and each other row's paired "
    "difference to it in test Dice points with its 95% interval and verdict (behind: the "
    "chosen row is resolved ahead of it; ahead: the choice on validation was wrong for test).",
    "",
  ]
  for ch in choice:
    head = (
      f"- {presets.noise_label(ch['noise'])}: **{ch['best']}** (test mean "
      f"{ch['best_mean'] * 100:.2f}"
    )
    head += f", {len(ch['best_seeds'])} seeds"
    if ch["best_lost"]:
      head += f"; {len(ch['best_lost'])} more failed"
    head += ")."
    items = []
    for c in ch["others"]:
      lost = _lost(c, row=f"{c['row']} lost", reference=f"{c['reference']} lost")
      items.append(
        f"{c['row']} {_points(c['mean'])} {_interval(c)} {_verdict(c)}"
        + (f", {lost} seeds" if lost != "-" else "")
      )
    if not items:
      out.append(f"{head} No other row to compare.")
      continue
    if ch["ahead_of"]:
      end = f"{ch['best']} resolved ahead of {', '.join(ch['ahead_of'])}."
    else:
      end = "No method resolved ahead."
    ahead = [c["row"] for c in ch["others"] if c["verdict"] == "ahead"]
    if ahead:  # validation and test disagree, or the paired seeds are not all the means' seeds
      end += f" Resolved ahead of {ch['best']}: {', '.join(ahead)}."
    out.append(f"{head} {'; '.join(items)}. {end}")
  return out


def ema_bn_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: validation Dice of the EMA weights with each choice of statistics, per cell,
  and a last line counting the verdicts."""
  out = [
    "| noise | row | seeds | EMA of the statistics | recomputed | recomputed − EMA | 95% interval "
    "| verdict |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for c in rows:
    out.append(
      f"| {presets.noise_label(c['noise'])} | {c['row']} | {len(c['seed_list'])} "
      f"| {_points(c['ema'], False)} | {_points(c['recompute'], False)} | {_points(c['mean'])} "
      f"| {_interval(c)} | {c['verdict']} |"
    )
  if rows:
    verdicts = [c["verdict"] for c in rows]
    out += [
      "",
      f"Recomputed statistics over all {len(rows)} cells: mean difference "
      f"{_points(float(np.mean([c['mean'] for c in rows])))} points; ahead in "
      f"{verdicts.count('ahead')}, behind in {verdicts.count('behind')}, not resolved in "
      f"{len(rows) - verdicts.count('ahead') - verdicts.count('behind')}.",
    ]
  return "\n".join(out)


def _fmt(stat: Mapping[str, Any] | None, digits: int, scale: float) -> str:
  if stat is None:
    return "-"
  mean = stat["mean"] * scale
  if stat["std"] is None:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def main_table(
  cells: Sequence[Mapping[str, Any]],
  *,
  split: str = "test",
  params: str = "ema",
  lost: Mapping[tuple[str, str], Sequence[int]] | None = None,
) -> str:
  """The paper's Table 2 layout: rows; per noise level mIoU, DSC (in %), HD95 (mean ± std).

  Args:
    cells: `collect`'s cells.
    split, params: which numbers ("test", "ema").
    lost: `lost_seeds`; a noise level where some row lost seeds gets a "seeds lost" column
      ("1 of 3": lost of finished and lost), and a row that lost every seed a line of "-".
  """
  lost = lost or {}
  noises = presets.sort_noises([c["noise"] for c in cells] + [n for n, _ in lost])
  labels = list(dict.fromkeys([c["label"] for c in cells] + [r for _, r in lost]))
  by = {(c["noise"], c["label"]): c for c in cells}
  lossy = {n for n, _ in lost}
  head = []
  for n in noises:
    head += [f"{presets.noise_label(n)} {name}" for _, name, _, _ in TABLE_METRICS]
    head += [f"{presets.noise_label(n)} seeds lost"] if n in lossy else []
  out = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
  for label in labels:
    vals = []
    for n in noises:
      cell = by.get((n, label))
      summary = cell[split][params] if cell else {}
      vals += [_fmt(summary.get(k), d, sc) for k, _, d, sc in TABLE_METRICS]
      if n in lossy:
        k = len(lost.get((n, label), ()))
        total = k + (len(cell["seeds"]) if cell else 0)
        vals.append(f"{k} of {total}" if k else ("0" if cell else "-"))
    out.append(f"| {label} | " + " | ".join(vals) + " |")
  return "\n".join(out)


def per_class_table(
  cells: Sequence[Mapping[str, Any]], *, split: str = "test", params: str = "ema"
) -> str:
  """DSC (%) and HD95 per foreground class (mean ± std over seeds), rows by noise level and
  method; empty when no cell scored classes separately (two-class data)."""
  cells = [c for c in cells if c[split][params].get("per_class")]
  if not cells:
    return ""
  names = list(dict.fromkeys(n for c in cells for n in c[split][params]["per_class"]))
  head = [f"{n} {name}" for n in names for name in ("DSC", "HD95")]
  out = ["| noise | method | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
  for c in cells:
    per = c[split][params]["per_class"]
    vals = []
    for n in names:
      vals += [_fmt(per.get(n, {}).get("dice"), 2, 100.0), _fmt(per.get(n, {}).get("hd95"), 2, 1.0)]
    out.append(f"| {presets.noise_label(c['noise'])} | {c['label']} | " + " | ".join(vals) + " |")
  return "\n".join(out)


# The switches of the paper's Table 5 and the config key of each (on unless overridden).
TABLE5_SWITCHES = (("Meta", "meta.use"), ("DCD", "dcd.use"), ("Dice", "dcd.use_dice"))


def ablation_table(cells: Sequence[Mapping[str, Any]]) -> str:
  """The paper's Table 5 layout for MetaDCSeg's variants: a check per component (meta, DCD,
  Dice), the other changed setting, and per noise level the DSC (in %, mean ± std) on test and
  validation, EMA and raw parameters. Empty when no variant (a row with overrides) ran."""
  cells = [c for c in cells if c["method"] == "metadcseg"]
  if not any(c.get("overrides") for c in cells):
    return ""
  noises = presets.sort_noises(c["noise"] for c in cells)
  labels = list(dict.fromkeys(c["label"] for c in cells))
  by = {(c["noise"], c["label"]): c for c in cells}
  columns = [("test", "ema"), ("test", "raw"), ("val", "ema"), ("val", "raw")]
  switch_keys = {key for _, key in TABLE5_SWITCHES}
  head = "| variant | " + " | ".join(name for name, _ in TABLE5_SWITCHES) + " | other setting | "
  head += " | ".join(
    f"{presets.noise_label(n)} {sp} DSC {pa}" for n in noises for sp, pa in columns
  )
  out = [head + " |", "|---|" + "---|" * (len(TABLE5_SWITCHES) + 1 + len(noises) * len(columns))]
  for label in labels:
    overrides = dict(next(c for c in cells if c["label"] == label).get("overrides") or [])
    checks = ["✓" if overrides.get(key, True) else "" for _, key in TABLE5_SWITCHES]
    other = ", ".join(f"{k}={v}" for k, v in overrides.items() if k not in switch_keys)
    vals = []
    for n in noises:
      cell = by.get((n, label))
      for sp, pa in columns:
        vals.append(_fmt(cell[sp][pa].get("dice"), 2, 100.0) if cell else "-")
    out.append(f"| {label} | " + " | ".join(checks + [other or "-"] + vals) + " |")
  return "\n".join(out)


def corruption_lines(cells: Sequence[Mapping[str, Any]]) -> list[str]:
  seen = {}
  for c in cells:
    if c["noise"] != "none" and c["corruption"] is not None:
      seen.setdefault(c["noise"], c["corruption"])
  return [
    f"- {presets.noise_label(n)} ({n}): measured corruption 1 - Dice of the training labels "
    f"{seen[n]:.3f}"
    for n in presets.sort_noises(seen)
  ]


def to_markdown(
  cells: Sequence[Mapping[str, Any]],
  *,
  command: str = "",
  failed: Sequence[Mapping[str, Any]] = (),
  paired: Sequence[Mapping[str, Any]] = (),
  ema_bn: Sequence[Mapping[str, Any]] = (),
  choice: Sequence[Mapping[str, Any]] = (),
) -> str:
  """benchmark.md: the command, which row to choose (`choose`), the tables on test (EMA, raw)
  and validation with the seeds each cell lost to failed runs, the paired comparisons with
  their intervals and verdicts, the EMA statistics' choice, corruption, the failed runs.

  Args:
    cells: `tables.collect`'s cells.
    command: the command line, shown first.
    failed: `runner.run_benchmark`'s failed runs.
    paired: `tables.comparisons`' paired differences.
    ema_bn: `tables.ema_bn_comparisons`' rows.
    choice: `tables.choose`'s choice per noise level.
  """
  out = ["# Benchmark", ""]
  if command:
    out += ["```bash", command, "```", ""]
  if choice:
    out += choice_lines(choice) + [""]
  if not cells:
    out += ["No finished runs yet.", ""]
  else:
    lost = tables.lost_seeds(failed, cells)
    seeds = sorted({s for c in cells for s in c["seeds"]})
    out += [
      f"Mean ± sample std over seeds {seeds} (a cell with fewer seeds shows fewer; a level "
      "where runs failed has a column of the seeds each cell lost). mIoU and DSC in %, HD95 "
      "in pixels unless the dataset has a spacing. The test split is read once per run, after "
      "training; choose settings on the validation tables.",
      "",
    ]
    for title, split, params in (
      ("Test, EMA parameters", "test", "ema"),
      ("Test, raw parameters", "test", "raw"),
      ("Validation, EMA parameters", "val", "ema"),
      ("Validation, raw parameters", "val", "raw"),
    ):
      out += [f"## {title}", "", main_table(cells, split=split, params=params, lost=lost), ""]
    per_class = per_class_table(cells)
    if per_class:
      out += [
        "## Per class: test, EMA parameters",
        "",
        "The headline DSC and HD95 above are the means over these foreground classes "
        "(nnU-Net's foreground mean).",
        "",
        per_class,
        "",
      ]
    if paired:
      out += [
        "## Paired differences: test Dice, points",
        "",
        "Mean over seeds and test cases of the per-case difference; the 95% interval covers "
        "both the seeds and the finite test set (`metadcseg_jax.benchmark.stats`), the two parts "
        "given as standard errors. Verdict: ahead / behind when the interval excludes zero. A "
        "failed run counts against its row: the interval is over the seeds both rows finished, the "
        "seeds lost are listed, and a verdict in favour of a row that lost seeds is withheld. "
        + PLANNING_NOTE,
        "",
        comparison_table(paired),
        "",
      ]
    if ema_bn:
      out += [
        "## EMA weights: BatchNorm statistics, validation Dice (%)",
        "",
        ema_bn_table(ema_bn),
        "",
      ]
    ablation = ablation_table(cells)
    if ablation:
      out += ["## Ablation (the paper's Table 5 layout): DSC", "", ablation, ""]
    corruption = corruption_lines(cells)
    if corruption:
      out += ["## Label noise", ""] + corruption + [""]
  if failed:
    out += ["## Failed runs", ""]
    out += [f"- {f['noise']}/{f['row']}/seed{f['seed']}: {f['error']}" for f in failed]
    out.append("")
  return "\n".join(out)


def _json_safe(obj):
  """NaN/inf (an empty prediction's distance, say) as None: benchmark.json stays strict JSON."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  return obj


def write_outputs(
  workdir,
  *,
  rows,
  noises,
  seeds=None,
  command: str = "",
  failed: Sequence[Mapping[str, Any]] = (),
  ema_choice: str | None = None,
) -> list[dict[str, Any]]:
  """Writes benchmark.md, benchmark.json and (when there are cells) dice_vs_noise.png; "ema"
  reads the EMA weights with the BatchNorm statistics `ema_choice` where runs recorded both;
  the `failed` runs count against their rows (`count_failures`).

  Args:
    workdir: the benchmark's root directory.
    rows, noises, seeds: the grid whose finished runs are collected (`tables.collect`).
    command: the command line, recorded in benchmark.md and benchmark.json.
    failed: the failed runs, {"noise", "row", "seed", "error", ...} each.
    ema_choice: the EMA weights' BatchNorm statistics the tables read (None: each run's own).
  """
  root = pathlib.Path(workdir)
  cells = tables.collect(root, rows=rows, noises=noises, seeds=seeds, ema_choice=ema_choice)
  paired = tables.comparisons(root, cells, ema_choice=ema_choice, failed=failed)
  choice = tables.choose(root, cells, ema_choice=ema_choice, failed=failed)
  ema_bn = tables.ema_bn_comparisons(root, cells)
  files.write_atomic(
    root / "benchmark.md",
    to_markdown(cells, command=command, failed=failed, paired=paired, ema_bn=ema_bn, choice=choice),
  )
  record = {
    "command": command,
    "cells": cells,
    "choice": choice,
    "comparisons": paired,
    "ema_batch_stats": ema_bn,
    "failed": list(failed),
  }
  files.write_atomic(root / "benchmark.json", json.dumps(_json_safe(record), indent=1))
  if cells:
    try:
      figures.plot_dice_vs_noise(cells, root / "dice_vs_noise.png", label=presets.noise_label)
    except Exception as e:  # pylint: disable=broad-except  (a figure must never cost the table)
      logging.warning("could not write dice_vs_noise.png: %s", e)
  return cells


def command_line(argv: Sequence[str], *, module: str = "experiments.benchmark") -> str:
  """The command as a user would retype it: the console script's name (not its full path), or
  `python -m <module>` for a script run from a checkout (argv[0] a .py file).

  >>> command_line(["/usr/bin/metadcseg-benchmark", "--workdir=a b"])
  "metadcseg-benchmark '--workdir=a b'"
  >>> command_line(["/x/experiments/gpu_report.py", "--tiny"], module="experiments.gpu_report")
  'python -m experiments.gpu_report --tiny'
  """
  prog = os.path.basename(argv[0]) if argv else "metadcseg-benchmark"
  if prog.endswith(".py"):
    prog = f"python -m {module}"
  return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])
