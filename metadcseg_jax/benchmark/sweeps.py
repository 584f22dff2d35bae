"""Benchmarks that differ in one setting, side by side: where a gap between methods opens or
closes (training budget, meta-set size), and what the meta step does on the way.

    sweeps = {"10 epochs": "runs/e10", "20 epochs": "runs/e20", "40 epochs": "runs/e40"}
    print(setting_table(sweeps, methods=("ce", "l2b", "metadcseg"), noises=("none", "l2b40")))
    print(diagnostics_table(sweeps, methods=("l2b", "metadcseg"), noises=("none", "l2b40")))
    plot_sweep(sweeps, "budget.png", xlabel="epochs")

Each workdir is a `metadcseg-benchmark` root; its finished runs are read as the benchmark reads
them (`tables.collect`, `tables.comparisons`: the paired differences with their 95%
intervals over seeds and test cases, failed runs counted).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import stats
from metadcseg_jax.benchmark import tables
from metadcseg_jax.training import figures

# The claims a sweep table states, (row, reference).
CLAIMS = (("l2b", "ce"), ("metadcseg", "ce"), ("metadcseg", "l2b"))
# The diagnostics (metrics.jsonl, split "diagnostics") a sweep table averages.
DIAGNOSTICS = (
  "weight_zero_frac",
  "effective_pixel_frac",
  "alpha_share",
  "alpha_share_disagree",
  "disagree_frac",
)


def _cell_text(cell: Mapping[str, Any] | None, params: str) -> str:
  if cell is None:
    return "–"
  stat = cell["test"][params]["dice"]
  std = f" ± {100 * stat['std']:.1f}" if stat.get("std") is not None else ""
  return f"{100 * stat['mean']:.1f}{std}"


def _claim_text(c: Mapping[str, Any] | None) -> str:
  if c is not None and c["verdict"] == "one seed" and c.get("se_test") is not None:
    # The seed part is unknown: the half-width over the test cases alone, a lower bound.
    half = 100 * scipy_stats.norm.ppf(0.5 + stats.LEVEL / 2) * c["se_test"]
    return f"{100 * c['mean']:+.1f} (one seed; test cases ±{half:.1f})"
  if c is None or c.get("low") is None or not math.isfinite(c["mean"]):
    return "–" if c is None else c["verdict"]
  return f"{100 * c['mean']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] {c['verdict']}"


def _rows(methods: Sequence[str | presets.Row]) -> list[presets.Row]:
  return [m if isinstance(m, presets.Row) else presets.Row(m, m) for m in methods]


def setting_table(
  workdirs: Mapping[str, str | pathlib.Path],
  *,
  methods: Sequence[str | presets.Row] = ("ce", "l2b", "metadcseg"),
  noises: Sequence[str] = ("none", "l2b40"),
  params: str = "ema",
  seeds: Sequence[int] | None = None,
  claims: Sequence[tuple[str, str]] | None = None,
) -> str:
  """A Markdown table: one line per (setting, noise level) with each row's test Dice (%,
  mean ± std over seeds) and each claim's paired difference (points, 95% interval, verdict).

  Args:
    workdirs: {setting label: benchmark root}, in the order the lines go.
    methods: the rows: method names, or `presets.Row`s (a variant, by its label).
    noises: the noise levels.
    params: "ema" or "raw".
    seeds: the seeds to read (None: every finished seed), e.g. the seeds every setting has.
    claims: (row label, reference label) pairs (default `CLAIMS`); those naming a row not in
      `methods` are left out.
  """
  rows = _rows(methods)
  labels = [r.label for r in rows]
  claims = [(a, b) for a, b in (CLAIMS if claims is None else claims) if {a, b} <= set(labels)]
  head = ["setting", "noise", "seeds", *labels, *(f"{a} − {b}" for a, b in claims)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, root in workdirs.items():
    cells = tables.collect(root, rows=rows, noises=noises, seeds=seeds)
    comps = tables.comparisons(root, cells, pairs=claims, params=(params,))
    by_cell = {(c["noise"], c["label"]): c for c in cells}
    by_claim = {(c["noise"], c["row"], c["reference"]): c for c in comps}
    for noise_kind in presets.sort_noises(noises):
      found = sorted(
        {s for m in labels for s in (by_cell.get((noise_kind, m)) or {}).get("seeds", [])}
      )
      if not found:
        continue
      values = [_cell_text(by_cell.get((noise_kind, m)), params) for m in labels]
      diffs = [_claim_text(by_claim.get((noise_kind, a, b))) for a, b in claims]
      lines.append(
        "| "
        + " | ".join([label, presets.noise_label(noise_kind), str(len(found)), *values, *diffs])
        + " |"
      )
  return "\n".join(lines)


def run_diagnostics(run: pathlib.Path, *, last: int = 3) -> dict[str, float]:
  """The mean of `DIAGNOSTICS` over a finished run's last `last` diagnostics points ({} if
  none, or the run has not finished)."""
  path = pathlib.Path(run) / "metrics.jsonl"
  if not path.is_file() or not (pathlib.Path(run) / "results.json").is_file():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  diag = [r for r in records if r.get("split") == "diagnostics"][-last:]
  return {
    k: float(np.mean([r[k] for r in diag if k in r]))
    for k in DIAGNOSTICS
    if any(k in r for r in diag)
  }


def diagnostics_table(
  workdirs: Mapping[str, str | pathlib.Path],
  *,
  methods: Sequence[str | presets.Row] = ("l2b", "metadcseg"),
  noises: Sequence[str] = ("none", "l2b40"),
  last: int = 3,
  seeds: Sequence[int] | None = None,
) -> str:
  """A Markdown table of the meta step's diagnostics (`DIAGNOSTICS`, mean over seeds of each
  run's last `last` points) per (setting, noise, row).

  Args:
    workdirs: {setting label: benchmark root}, in the order the lines go.
    methods: the meta methods (names or `presets.Row`s) whose runs logged diagnostics.
    noises: the noise levels.
    last: how many of a run's last diagnostics points to average.
    seeds: the seeds to read (None: every finished seed).
  """
  head = ["setting", "noise", "method", "seeds", *DIAGNOSTICS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, root in workdirs.items():
    for noise_kind in presets.sort_noises(noises):
      for row in _rows(methods):
        runs = sorted(pathlib.Path(root, noise_kind, row.dirname).glob("seed*"))
        if seeds is not None:
          runs = [r for r in runs if r.name[len("seed") :] in {str(s) for s in seeds}]
        found = [d for d in (run_diagnostics(r, last=last) for r in runs) if d]
        if not found:
          continue
        values = [
          f"{np.mean([d[k] for d in found if k in d]):.3f}" if any(k in d for d in found) else "–"
          for k in DIAGNOSTICS
        ]
        lines.append(
          "| "
          + " | ".join(
            [label, presets.noise_label(noise_kind), row.label, str(len(found)), *values]
          )
          + " |"
        )
  return "\n".join(lines)


def plot_sweep(
  workdirs: Mapping[str, str | pathlib.Path],
  out_png,
  *,
  methods: Sequence[str | presets.Row] = ("ce", "l2b", "metadcseg"),
  noises: Sequence[str] = ("none", "l2b40"),
  params: str = "ema",
  seeds: Sequence[int] | None = None,
  xlabel: str = "setting",
) -> pathlib.Path:
  """Test Dice against the setting the workdirs differ in, one panel per noise level
  (`figures.plot_setting_sweep`).

  Args:
    workdirs: {setting label: benchmark root}, in the order of the x axis.
    out_png: the PNG to write.
    methods: the rows: method names, or `presets.Row`s.
    noises: the noise levels, one panel each.
    params: "ema" or "raw".
    seeds: the seeds to read (None: every finished seed).
    xlabel: the setting's name, under the x axis.

  Returns:
    The PNG written.
  """
  rows = _rows(methods)
  series = {
    label: tables.collect(root, rows=rows, noises=noises, seeds=seeds)
    for label, root in workdirs.items()
  }
  return figures.plot_setting_sweep(
    series, out_png, label=presets.noise_label, xlabel=xlabel, params=params
  )
