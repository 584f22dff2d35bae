r"""Sweep methods x label-noise levels x seeds; one table of the final EMA test metrics.

    metadcseg-sweep --config=experiments/configs/synthetic.py --workdir=runs/sweep \
        --methods=ce,l2b,metadcseg --noise=none,l2b20,l2b40,l2b60 --seeds=0,1,2

Each combination trains with `train.train_and_evaluate` into
`<workdir>/<noise>/<method>/seed<k>` (config.method, config.data.noise.kind and config.seed set
from the flags; any other `--config.x=y` override applies to every run). A combination whose
results.json exists is skipped and an unfinished one resumes from its last checkpoint, so
rerunning the same command after an interruption picks up where it stopped. After every run
the sweep rewrites `<workdir>/sweep.md` (mean ± std over seeds of EMA Dice, IoU, HD95, with the
command line), `sweep.json` (the same rows, per-seed values and raw-parameter metrics) and
`sweep.png` (grouped bars of EMA Dice).

Seeds vary the model initialisation and the data order (config.seed) only: the noisy labels
(config.data.noise.seed) and the meta split (config.data.seed) are the same for every run, so
methods are compared on identical labels. Cost: runs x the config's cost (synthetic.py: see
its docstring); seeds are the outer loop, so a complete table for seed 0 comes first.
"""

import json
import math
import os
import pathlib
import shlex
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np

from metadcseg_jax import figures
from metadcseg_jax import methods
from metadcseg_jax import noise
from metadcseg_jax import train
from metadcseg_jax.data import pipeline
from metadcseg_jax.noise import cache as noise_cache
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.metrics import METRIC_KEYS

# Ordering of the table: the registry's (baselines first, MetaDCSeg last; noise increasing).
METHOD_ORDER = methods.NAMES
NOISE_ORDER = ("none", *noise.KINDS)
METRICS = METRIC_KEYS
TABLE_METRICS = (("dice", "Dice", 4), ("iou", "IoU", 4), ("hd95", "HD95", 2))


# ----------------------------------------------------------------------------- the runs


def run_dir(workdir, noise: str, method: str, seed: int) -> pathlib.Path:
  """`<workdir>/<noise>/<method>/seed<k>`: where one combination trains."""
  return pathlib.Path(workdir) / noise / method / f"seed{seed}"


def parse_seeds(seeds: Iterable[Any]) -> list[int]:
  """Seeds as ints; ConfigError naming `--seeds` otherwise."""
  out = []
  for s in seeds:
    try:
      out.append(int(s))
    except (TypeError, ValueError):
      raise ConfigError(f"--seeds: {s!r} is not an integer") from None
  if not out:
    raise ConfigError("--seeds: give at least one seed")
  return out


def check_grid(methods: Sequence[str], noises: Sequence[str], seeds: Sequence[int]) -> None:
  """Clear errors before the first (possibly hours-long) run rather than in the middle."""
  bad = [m for m in methods if m not in METHOD_ORDER]
  if bad or not methods:
    raise ConfigError(f"--methods: unknown {bad or 'empty list'}, choose from {METHOD_ORDER}")
  known = NOISE_ORDER
  bad = [n for n in noises if n not in known]
  if bad or not noises:
    raise ConfigError(f"--noise: unknown {bad or 'empty list'}, choose from {known}")
  for name, values in (("methods", methods), ("noise", noises), ("seeds", seeds)):
    if len(set(values)) != len(values):
      raise ConfigError(f"--{name}: repeated values in {list(values)}")


def run_config(
  config: ml_collections.ConfigDict, *, method: str, noise: str, seed: int
) -> ml_collections.ConfigDict:
  """A copy of `config` with the combination's method, noise kind and seed."""
  cfg = config.copy_and_resolve_references()
  cfg.method = method
  cfg.data.noise.kind = noise
  cfg.seed = seed
  return cfg


def combinations(
  methods: Sequence[str], noises: Sequence[str], seeds: Sequence[int]
) -> list[tuple[str, str, int]]:
  """(noise, method, seed) in run order: seeds outermost, then noise, then method."""
  return [(n, m, s) for s in seeds for n in noises for m in methods]


def _short(results: Mapping[str, Any]) -> str:
  ema, raw = results["test"]["ema"], results["test"]["raw"]
  return (
    f"EMA Dice {ema['dice']:.4f} IoU {ema['iou']:.4f} HD95 {ema['hd95']:.2f} "
    f"(raw Dice {raw['dice']:.4f}, epoch {results['epoch']})"
  )


def run_sweep(
  config: ml_collections.ConfigDict,
  workdir,
  *,
  methods: Sequence[str],
  noises: Sequence[str],
  seeds: Sequence[int],
  command: str = "",
  echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
  """Trains every (noise, method, seed) not finished yet, then writes the sweep's outputs.

  Args:
    config: the base config (locked is fine: only existing fields are set).
    workdir: the sweep's root directory.
    methods: values of config.method.
    noises: values of config.data.noise.kind ("none" for clean labels).
    seeds: values of config.seed.
    command: the command line, recorded in sweep.md and sweep.json.
    echo: where progress lines go.

  Returns:
    The table rows (`collect`) of the requested combinations.

  Raises:
    ConfigError: an unknown method or noise kind, a repeated value.
    NonFiniteLossError: after the other runs, if some run's loss went non-finite (those
      runs are listed in sweep.json and sweep.md).
  """
  seeds = parse_seeds(seeds)
  check_grid(methods, noises, seeds)
  root = pathlib.Path(workdir).expanduser().resolve()
  root.mkdir(parents=True, exist_ok=True)
  combos = combinations(methods, noises, seeds)
  failed: list[dict[str, Any]] = []
  for i, (noise, method, seed) in enumerate(combos, start=1):
    rdir = run_dir(root, noise, method, seed)
    tag = f"[{i}/{len(combos)}] {noise}/{method}/seed{seed}"
    done = rdir / "results.json"
    if done.is_file():
      results = _load_results(done)
      note = ""
      if results["epoch"] != config.train.num_epochs:
        # Without results.json the trainer resumes from the last checkpoint: right for more
        # epochs, wrong for fewer (it would re-evaluate the longer run).
        fix = (
          f"delete {done} to train on from its checkpoint"
          if results["epoch"] < config.train.num_epochs
          else f"delete {rdir} to redo it"
        )
        note = (
          f"  WARNING: finished at epoch {results['epoch']}, the config asks for "
          f"{config.train.num_epochs}; {fix}"
        )
      echo(f"{tag}: done already, {_short(results)}{note}")
      continue
    echo(f"{tag}: training in {rdir}")
    t0 = time.perf_counter()
    try:
      results = train.train_and_evaluate(
        run_config(config, method=method, noise=noise, seed=seed), str(rdir)
      )
    except NonFiniteLossError as e:
      # One diverging method must not cost the rest of the sweep; rerunning retries it.
      echo(f"{tag}: FAILED: {e}")
      failed.append({"noise": noise, "method": method, "seed": seed, "error": str(e)})
      continue
    echo(f"{tag}: {_short(results)}  [{time.perf_counter() - t0:.0f} s]")
    write_outputs(root, methods=methods, noises=noises, seeds=seeds, command=command, failed=failed)
  rows = write_outputs(
    root, methods=methods, noises=noises, seeds=seeds, command=command, failed=failed
  )
  echo(f"table: {root / 'sweep.md'}   rows: {root / 'sweep.json'}   plot: {root / 'sweep.png'}")
  if failed:
    raise NonFiniteLossError(
      f"{len(failed)} of {len(combos)} runs diverged: "
      + ", ".join(f"{f['noise']}/{f['method']}/seed{f['seed']}" for f in failed)
    )
  return rows


# ----------------------------------------------------------------------------- the table


def _load_results(path: pathlib.Path) -> dict[str, Any]:
  try:
    results = json.loads(path.read_text())
    for params in ("raw", "ema"):
      for k in ("dice", "iou", "hd95"):
        float(results["test"][params][k])
    int(results["epoch"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not a trainer results.json ({type(e).__name__}: {e})") from None
  return results


def _stat(values: Sequence[float]) -> dict[str, Any]:
  """Mean and sample std (ddof=1; None for a single seed) over seeds."""
  arr = np.asarray(values, float)
  std = float(np.std(arr, ddof=1)) if arr.size > 1 else None
  return {"mean": float(np.mean(arr)), "std": std, "values": [float(v) for v in arr]}


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
  values = set(values)
  return [v for v in preferred if v in values] + sorted(values - set(preferred))


def collect(
  workdir,
  *,
  methods: Sequence[str] | None = None,
  noises: Sequence[str] | None = None,
  seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
  """Table rows from the finished runs under `workdir` (`<noise>/<method>/seed<k>/results.json`).

  Args:
    workdir: the sweep's root directory.
    methods, noises, seeds: keep only these (all found when None); they also fix the order of
      the rows, otherwise noise levels and methods follow `NOISE_ORDER` / `METHOD_ORDER`.

  Returns:
    One row per (noise, method) with at least one finished seed, noise-major:
    `{"noise", "method", "dataset", "epochs": [...], "seeds": [...], "workdirs": [...],
    "ema": {metric: {"mean", "std", "values"}}, "raw": {...}}` over `METRICS`; std is the
    sample std over seeds (ddof=1), None for one seed.

  Raises:
    ValueError: `workdir` is not a directory, or a results.json is malformed.
  """
  root = pathlib.Path(workdir).expanduser()
  if not root.is_dir():
    raise ValueError(f"workdir={str(workdir)!r}: not a directory")
  found: dict[tuple[str, str], list[tuple[int, pathlib.Path, dict[str, Any]]]] = {}
  for path in root.glob("*/*/seed*/results.json"):
    seed_name = path.parent.name[len("seed") :]
    if not seed_name.isdigit():
      continue
    seed, method, noise = int(seed_name), path.parent.parent.name, path.parent.parent.parent.name
    if (
      (methods is not None and method not in methods)
      or (noises is not None and noise not in noises)
      or (seeds is not None and seed not in seeds)
    ):
      continue
    found.setdefault((noise, method), []).append((seed, path.parent, _load_results(path)))
  noise_order = list(noises) if noises is not None else _order((n for n, _ in found), NOISE_ORDER)
  method_order = (
    list(methods) if methods is not None else _order((m for _, m in found), METHOD_ORDER)
  )
  rows = []
  for noise in noise_order:
    for method in method_order:
      runs = sorted(found.get((noise, method), []), key=lambda r: r[0])
      if not runs:
        continue
      row = {
        "noise": noise,
        "method": method,
        "dataset": sorted({str(r[2].get("dataset", "?")) for r in runs}),
        "epochs": [int(r[2]["epoch"]) for r in runs],
        "seeds": [r[0] for r in runs],
        "workdirs": [str(r[1]) for r in runs],
      }
      for params in ("ema", "raw"):
        row[params] = {
          k: _stat([r[2]["test"][params][k] for r in runs])
          for k in METRICS
          if all(k in r[2]["test"][params] for r in runs)
        }
      rows.append(row)
  return rows


def _fmt(stat: Mapping[str, Any] | None, digits: int) -> str:
  if stat is None:
    return "-"
  if stat["std"] is None:
    return f"{stat['mean']:.{digits}f}"
  return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def to_markdown(
  rows: Sequence[Mapping[str, Any]], *, command: str = "", failed: Sequence[Mapping[str, Any]] = ()
) -> str:
  """The sweep's markdown: the command line, a noise x method table of EMA Dice, and a long
  table of EMA Dice, IoU and HD95 (mean ± sample std over seeds; the mean alone for one seed).

  Args:
    rows: from `collect`.
    command: the command line that produced the sweep (shown in a code block when given).
    failed: runs that diverged ({"noise", "method", "seed", "error"}), listed at the end.

  Returns:
    Markdown text ending in a newline.
  """
  out = ["# Sweep: final test metrics, EMA parameters", ""]
  if command:
    out += ["```bash", command, "```", ""]
  if not rows:
    out += ["No finished runs yet.", ""]
  else:
    datasets = sorted({d for r in rows for d in r["dataset"]})
    out += [
      f"Dataset: {', '.join(datasets)}. Mean ± std (ddof=1) over seeds; HD95 in pixels "
      "unless the dataset has a spacing.",
      "",
    ]
    noises = list(dict.fromkeys(r["noise"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["noise"], r["method"]): r for r in rows}
    out += [
      "## EMA Dice",
      "",
      "| noise | " + " | ".join(methods) + " |",
      "|---|" + "---|" * len(methods),
    ]
    for noise in noises:
      vals = [
        _fmt(cell[noise, m]["ema"].get("dice"), 4) if (noise, m) in cell else "-" for m in methods
      ]
      out.append(f"| {noise} | " + " | ".join(vals) + " |")
    out += [
      "",
      "## All runs",
      "",
      "| noise | method | seeds | epochs | "
      + " | ".join(f"EMA {label}" for _, label, _ in TABLE_METRICS)
      + " |",
      "|---|---|---|---|" + "---|" * len(TABLE_METRICS),
    ]
    for r in rows:
      epochs = sorted(set(r["epochs"]))
      vals = [_fmt(r["ema"].get(k), digits) for k, _, digits in TABLE_METRICS]
      out.append(
        f"| {r['noise']} | {r['method']} | {','.join(map(str, r['seeds']))} | "
        f"{','.join(map(str, epochs))} | " + " | ".join(vals) + " |"
      )
    out.append("")
  if failed:
    out += ["## Failed runs", ""]
    out += [f"- {f['noise']}/{f['method']}/seed{f['seed']}: {f['error']}" for f in failed]
    out.append("")
  return "\n".join(out)


def _json_safe(obj):
  """NaN/inf (an empty prediction's distance, say) as None: sweep.json stays strict JSON."""
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
  methods=None,
  noises=None,
  seeds=None,
  command: str = "",
  failed: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
  """Writes sweep.md, sweep.json and (when there are rows) sweep.png; returns the rows."""
  root = pathlib.Path(workdir)
  rows = collect(root, methods=methods, noises=noises, seeds=seeds)
  (root / "sweep.md").write_text(to_markdown(rows, command=command, failed=failed))
  (root / "sweep.json").write_text(
    json.dumps(_json_safe({"command": command, "rows": rows, "failed": list(failed)}), indent=1)
  )
  if rows:
    try:
      figures.plot_sweep(rows, root / "sweep.png")
    except Exception as e:  # pylint: disable=broad-except  (a figure must never cost the table)
      logging.warning("could not write sweep.png: %s", e)
  return rows


def command_line(argv: Sequence[str]) -> str:
  """The command as a user would retype it (the entry point's name, not its full path)."""
  prog = os.path.basename(argv[0]) if argv else "metadcseg-sweep"
  if prog.endswith(".py"):
    prog = "python -m experiments.sweep"
  return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


# ----------------------------------------------------------------------------- label noise


def corruption_table(config: ml_collections.ConfigDict, kinds: Sequence[str]) -> str:
  """Builds (or reuses) the cached noisy training labels of each kind; the markdown table of
  their measured corruption 1 - Dice (Eq. 20): mean, std, min, max, share emptied.

  The cache is the one training reads (`<data_dir>/noisy_labels/<dataset build>/`). The meta
  split is not corrupted at training time; this table covers every training mask, as the
  paper's corruption rates do.
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
