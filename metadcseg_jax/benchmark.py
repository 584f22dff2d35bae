r"""The benchmark: methods (and ablation variants) x label-noise levels x seeds, in the layout of
the paper's tables.

    metadcseg-benchmark --config=experiments/configs/benchmark.py --workdir=runs/bench \
        --preset=main
    metadcseg-benchmark --config=experiments/configs/benchmark.py --workdir=runs/bench \
        --preset=ablation

Each (noise, row, seed) trains with `train.train_and_evaluate` into
`<workdir>/<noise>/<row>/seed<k>`, where a row is a method, or a method with config overrides
(an ablation variant). A finished run (results.json present) is skipped and an unfinished one
resumes from its checkpoint, so rerunning the same command after an interruption carries on.
A run that fails (diverges, runs out of memory, raises) is listed with its reason in
benchmark.md and the others go on; the next invocation retries it. A stop signal stops the
benchmark once the run in progress has checkpointed (`errors.Preempted`, exit status 75).
After every run the benchmark rewrites, in `<workdir>`:

* `benchmark.md`: first which row to choose at each noise level (`choose`: the best mean test
  Dice and every other row's paired difference to it); the main table in the layout of the
  paper's Table 2 (rows: methods; for each noise level: mIoU, DSC, HD95 as mean ± std over
  seeds, and how many seeds a cell lost to failed runs) on the test split, for the EMA and the
  raw parameters; the same on the validation split (what settings are chosen on); the paired
  comparisons; the ablation table (the paper's Table 5 layout) when variants ran; the measured
  corruption of each level; the failed runs; the command line.
* `benchmark.json`: every run's numbers, the per-seed values, the comparisons, the choice, the
  failed runs.
* `dice_vs_noise.png`: test Dice against noise level with error bars, one line per row.

Noise levels are ordered by value in the tables and the plot (`sort_noises`), whatever the
order of `--noise`.

Two label modes. `labels="per_seed"` (the presets' default): seed k also draws the noise
realisation (config.data.noise.seed = k) and the clean meta split (config.data.meta_seed = k),
so the spread over seeds is the spread a user meets on new data; every row of one seed still
sees the same corrupted masks and meta set, so rows stay paired. `labels="fixed"`: seeds vary
the initialisation and the data order only (config.seed), the noisy labels and the meta split
those of the base config. Each run reads its test split once, after training, and keeps every
test case's scores (cases.json), from which the paired comparisons are computed:
`metadcseg_jax.stats` (mean paired difference, a 95% interval over seeds and test cases, its
seed and test-set parts, a verdict, the seeds for a ±2-point interval and for 80% power at a
2-point gap). A run that failed stays in its comparisons as a failure (`count_failures`).
"""

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import re
import shlex
import signal
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from metadcseg_jax import cli
from metadcseg_jax import figures
from metadcseg_jax import methods
from metadcseg_jax import noise
from metadcseg_jax import preemption
from metadcseg_jax import stats
from metadcseg_jax import train
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.errors import Preempted
from metadcseg_jax.errors import RunStopped
from metadcseg_jax.errors import UserError
from metadcseg_jax.metrics import METRIC_KEYS
from metadcseg_jax.noise import cache as noise_cache

NOISE_ORDER = ("none", *noise.KINDS)
# The paper's table columns for each noise level: (metric key, header, decimals, scale).
TABLE_METRICS = (("miou", "mIoU", 2, 100.0), ("dice", "DSC", 2, 100.0), ("hd95", "HD95", 2, 1.0))


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table: a method, with config overrides for an ablation variant.

  Attributes:
    label: the row's name in the tables ("metadcseg", "metadcseg: DCD off").
    method: config.method.
    overrides: ((dotted config key, value), ...) applied on top of the base config.
  """

  label: str
  method: str
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def dirname(self) -> str:
    """The run folder's name: the label with anything but [A-Za-z0-9_.=+-] as '_'."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", self.label)


def method_rows(names: Sequence[str]) -> list[Row]:
  return [Row(n, n) for n in names]


# The paper's Table 5 (meta, DCD, Dice), every option of the DCD weights and the objective, and
# a softer temperature (the diagnostics show Eq. 12's weights still peaked at τ_dcd 1): variants
# of MetaDCSeg, each one setting changed from the default.
ABLATIONS = (
  Row("metadcseg", "metadcseg"),
  Row("metadcseg: meta off", "metadcseg", (("meta.use", False),)),
  Row("metadcseg: DCD off", "metadcseg", (("dcd.use", False),)),
  Row("metadcseg: Dice off", "metadcseg", (("dcd.use_dice", False),)),
  Row("metadcseg: DCD scale none", "metadcseg", (("dcd.dcd_scale", "none"),)),
  Row("metadcseg: weights sum to one", "metadcseg", (("dcd.weight_sum", "sum_one"),)),
  Row("metadcseg: mixing pixel loss", "metadcseg", (("dcd.pixel_loss", "mixing"),)),
  Row("metadcseg: gradient into w", "metadcseg", (("dcd.detach_weights", False),)),
  Row("metadcseg: tau_dcd 4", "metadcseg", (("dcd.tau_dcd", 4.0),)),
  Row("metadcseg: Sobel edges", "metadcseg", (("dcd.edges", "sobel"),)),
  Row("metadcseg: (a0,b0)=(1,0)", "metadcseg", (("meta.a0", 1.0),)),
  Row("metadcseg: batch normaliser", "metadcseg", (("meta.normalizer", "batch"),)),
)
LABEL_MODES = ("per_seed", "fixed")
PRESETS = {
  # The acceptance table: baselines and MetaDCSeg at 0/40/60% noise, 3 seeds.
  "main": dict(
    rows=method_rows(("ce", "l2b", "metadcseg")),
    noises=("none", "l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
  # The comparisons under noise only (the Kvasir-SEG CPU table).
  "noisy": dict(
    rows=method_rows(("ce", "l2b", "metadcseg")),
    noises=("l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
  # The paper's Table 2 columns.
  "paper": dict(
    rows=method_rows(("ce", "l2b", "metadcseg")),
    noises=("none", "l2b20", "l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
  "ablation": dict(rows=list(ABLATIONS), noises=("l2b40",), seeds=(0, 1, 2), labels="per_seed"),
  # Every registered method (plain losses, two networks, GSD-Net, DALE, L2B, MetaDCSeg) at the
  # same noise levels, seeds and budget.
  "comparison": dict(
    rows=method_rows(methods.NAMES),
    noises=("none", "l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
}


# ----------------------------------------------------------------------------- the runs


def run_dir(workdir, noise_kind: str, row: Row, seed: int) -> pathlib.Path:
  """`<workdir>/<noise>/<row>/seed<k>`: where one combination trains."""
  return pathlib.Path(workdir) / noise_kind / row.dirname / f"seed{seed}"


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


def check_grid(rows: Sequence[Row], noises: Sequence[str], seeds: Sequence[int]) -> None:
  """Clear errors before the first (possibly hours-long) run rather than in the middle."""
  bad = [r.method for r in rows if r.method not in methods.NAMES]
  if bad or not rows:
    raise ConfigError(f"--methods: unknown {bad or 'empty list'}, choose from {methods.NAMES}")
  bad = [n for n in noises if n not in NOISE_ORDER]
  if bad or not noises:
    raise ConfigError(f"--noise: unknown {bad or 'empty list'}, choose from {NOISE_ORDER}")
  for name, values in (("rows", [r.label for r in rows]), ("noise", noises), ("seeds", seeds)):
    if len(set(values)) != len(values):
      raise ConfigError(f"--{name}: repeated values in {list(values)}")


def run_config(
  config: ml_collections.ConfigDict,
  *,
  row: Row,
  noise_kind: str,
  seed: int,
  labels: str = "fixed",
) -> ml_collections.ConfigDict:
  """A copy of `config` with the row's method and overrides, the noise kind and the seed; with
  `labels="per_seed"` the seed also draws the noise realisation and the meta split."""
  if labels not in LABEL_MODES:
    raise ConfigError(f"--labels: {labels!r}, choose from {LABEL_MODES}")
  cfg = config.copy_and_resolve_references()
  cfg.method = row.method
  cfg.data.noise.kind = noise_kind
  cfg.seed = seed
  if labels == "per_seed":
    cfg.data.noise.seed = seed
    cfg.data.meta_seed = seed
  for key, value in row.overrides:
    *path, field = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    if field not in node:
      raise ConfigError(f"row {row.label!r}: config has no setting {key!r}")
    node[field] = value
  return cfg


def _short(results: Mapping[str, Any]) -> str:
  ema, raw = results["test"]["ema"], results["test"]["raw"]
  return (
    f"test Dice EMA {ema['dice']:.4f} raw {raw['dice']:.4f}, HD95 EMA {ema['hd95']:.2f} "
    f"(val Dice EMA {results['val']['ema']['dice']:.4f})"
  )


def default_processes(cpus: int | None = None, backend: str | None = None) -> int:
  """How many runs train at once when the command is not told: 2 on a CPU backend with
  2 cores, where two processes trained 1.06x (MetaDCSeg) to 1.10x (CE) the images per second
  of one (BUILD_NOTES.md,
  "XLA threads and processes on a 2-core CPU"); otherwise 1 (one accelerator trains one run
  at a time; on more cores one process's XLA threads spread over them, and several processes
  were not measured)."""
  cpus = cli.visible_cpus() if cpus is None else cpus
  backend = jax.default_backend() if backend is None else backend
  return 2 if backend == "cpu" and cpus == 2 else 1


_STOP_BEFORE_START = False  # in a worker process: a stop signal arrived between runs


def _record_stop(signum, frame) -> None:
  del signum, frame
  global _STOP_BEFORE_START
  _STOP_BEFORE_START = True


def _worker_init() -> None:
  """A benchmark worker process: a stop signal between runs is recorded instead of ending the
  process (a dead worker breaks the whole pool). During a run the trainer's own handlers take
  it (`preemption.StopSignals`): the run checkpoints and raises `Preempted`."""
  for s in preemption.STOP_SIGNALS:
    signal.signal(s, _record_stop)


class _NotStarted(Preempted):
  """A queued run that a worker took after a stop signal and did not start."""


def _train_in_worker(trainer: Callable, cfg, rdir: str) -> tuple[dict[str, Any], float]:
  """One run in a worker process: (its results, its wall seconds)."""
  if _STOP_BEFORE_START:
    raise _NotStarted(f"{rdir}: not started, a stop signal came first")
  t0 = time.perf_counter()
  try:
    results = trainer(cfg, rdir)
  except RunStopped:
    _record_stop(None, None)  # the trainer took the signal: start no queued run after it
    raise
  return results, time.perf_counter() - t0


@dataclasses.dataclass
class _Outcomes:
  """What the runs of one benchmark invocation came to, and the progress lines about them."""

  echo: Callable[[str], None]
  write: Callable[[], Any]
  failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  diverged: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  stopped: RunStopped | None = None

  def add(self, job, results=None, seconds: float = 0.0, error: Exception | None = None) -> None:
    tag, noise_kind, row, seed = job
    if isinstance(error, RunStopped):
      # A stop signal (the run checkpointed) or a full disk: the other runs would stop alike.
      self.echo(f"{tag}: {error}")
      # The stop reported is a run's that was training: a queued run that a worker took after
      # the signal (the pool hands a worker its next job before it can be cancelled) may
      # finish first and says less.
      if self.stopped is None or isinstance(self.stopped, _NotStarted):
        self.stopped = error
    elif error is not None:
      # One failing run (diverged, out of memory, a bug) must not cost the rest of the
      # benchmark; it is listed with its reason and a rerun retries it.
      reason = _reason(error)
      self.echo(f"{tag}: FAILED: {reason}")
      self.failed.append(
        {"noise": noise_kind, "row": row.label, "method": row.method, "seed": seed, "error": reason}
      )
      if isinstance(error, NonFiniteLossError):
        self.diverged.append(self.failed[-1])
    else:
      self.echo(f"{tag}: {_short(results)}  [{seconds:.0f} s]")
    self.write()


def _run_in_processes(jobs, processes: int, outcomes: _Outcomes, trainer: Callable) -> None:
  """Trains `jobs` ((tag, noise, row, seed), config, run folder) in `processes` worker
  processes (spawned: a forked JAX is not safe), in order. A stop signal to this process, or
  a run that stopped, stops the rest: queued runs are cancelled and the signal is passed to
  the workers, whose runs checkpoint and stop as a run in this process would."""
  context = multiprocessing.get_context("spawn")
  with (
    preemption.StopSignals() as signals,
    concurrent.futures.ProcessPoolExecutor(
      processes, mp_context=context, initializer=_worker_init
    ) as pool,
  ):
    pending, order = {}, {}
    for job, cfg, rdir in jobs:
      outcomes.echo(f"{job[0]}: queued, trains in {rdir}")
      future = pool.submit(_train_in_worker, trainer, cfg, str(rdir))
      pending[future], order[future] = job, len(order)
    passed_on = False
    while pending:
      done, _ = concurrent.futures.wait(
        pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED
      )
      for future in sorted(done, key=order.get):
        job = pending.pop(future)
        if future.cancelled():
          continue
        error = future.exception()
        if error is None:
          outcomes.add(job, *future.result())
        else:
          outcomes.add(job, error=error)
      if (signals.received or outcomes.stopped) and not passed_on:
        passed_on = True
        for future in pending:
          future.cancel()
        for child in multiprocessing.active_children():
          os.kill(child.pid, signals.received or signal.SIGTERM)
    if signals.received and outcomes.stopped is None:
      outcomes.stopped = Preempted(f"stopped by signal {signals.received}; no run was training")


def run_benchmark(
  config: ml_collections.ConfigDict,
  workdir,
  *,
  rows: Sequence[Row],
  noises: Sequence[str],
  seeds: Sequence[int],
  labels: str = "fixed",
  command: str = "",
  echo: Callable[[str], None] = print,
  processes: int = 1,
  trainer: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
  """Trains every (noise, row, seed) not finished yet (seeds outermost, so a complete table
  for seed 0 comes first), then writes the benchmark's outputs.

  Args:
    config: the base config (locked is fine: only existing fields are set).
    workdir: the benchmark's root directory.
    rows: the table's rows (`method_rows`, `ABLATIONS`, or a preset's).
    noises: values of config.data.noise.kind ("none" for clean labels).
    seeds: values of config.seed.
    labels: "per_seed" (the seed draws the noise and the meta split too) or "fixed".
    command: the command line, recorded in benchmark.md and benchmark.json.
    echo: where progress lines go.
    processes: runs trained at once, each in its own worker process (1: one after another in
      this process; `default_processes` is the measured best). A run's numbers do not depend
      on it.
    trainer: `(config, run folder) -> results`, `train.train_and_evaluate` unless given (a
      module-level function: worker processes import it by name).

  Returns:
    The cells (`collect`) of the requested combinations.

  Raises:
    ConfigError: an unknown method or noise kind, a repeated value.
    NonFiniteLossError: after the other runs, if some runs' loss went non-finite and no run
      failed otherwise; RunsFailedError: after the other runs, if some failed in any other
      way (an exception, out of memory). Either way the failed runs are listed with their
      reasons in benchmark.json and benchmark.md, and a rerun retries them.
    RunStopped: a run stopped on a signal (checkpointed: a rerun resumes it) or on a full
      disk; the outputs are written first and no further run starts.
  """
  seeds = parse_seeds(seeds)
  rows = list(rows)
  check_grid(rows, noises, seeds)
  if processes < 1:
    raise ConfigError(f"processes must be >= 1, got {processes}")
  root = pathlib.Path(workdir).expanduser().resolve()
  root.mkdir(parents=True, exist_ok=True)
  combos = [(n, r, s) for s in seeds for n in noises for r in rows]
  ema_choice = train.ema_batch_stats(config)
  failed: list[dict[str, Any]] = []
  write = lambda: write_outputs(
    root,
    rows=rows,
    noises=noises,
    seeds=seeds,
    command=command,
    failed=failed,
    ema_choice=ema_choice,
  )
  outcomes = _Outcomes(echo=echo, write=write, failed=failed)
  jobs = []
  for i, (noise_kind, row, seed) in enumerate(combos, start=1):
    rdir = run_dir(root, noise_kind, row, seed)
    tag = f"[{i}/{len(combos)}] {noise_kind}/{row.label}/seed{seed}"
    done = rdir / "results.json"
    cfg = run_config(config, row=row, noise_kind=noise_kind, seed=seed, labels=labels)
    if done.is_file():
      results = _load_results(done)
      _check_labels(results, cfg, rdir)
      note = ""
      if results["epoch"] != config.train.num_epochs:
        note = (
          f"  WARNING: finished at epoch {results['epoch']}, the config asks for "
          f"{config.train.num_epochs}; delete {rdir} to redo it"
        )
      echo(f"{tag}: done already, {_short(results)}{note}")
      continue
    jobs.append(((tag, noise_kind, row, seed), cfg, rdir))
  trainer = trainer or train.train_and_evaluate
  if processes > 1 and len(jobs) > 1:
    _run_in_processes(jobs, min(processes, len(jobs)), outcomes, trainer)
  else:
    for job, cfg, rdir in jobs:
      echo(f"{job[0]}: training in {rdir}")
      t0 = time.perf_counter()
      try:
        results = trainer(cfg, str(rdir))
      except Exception as e:  # pylint: disable=broad-except  (sorted out by `_Outcomes.add`)
        outcomes.add(job, error=e)
        if outcomes.stopped:
          break
        continue
      outcomes.add(job, results, time.perf_counter() - t0)
  if outcomes.stopped is not None:
    outcomes.write()
    raise outcomes.stopped
  cells = outcomes.write()
  paired = comparisons(root, cells, ema_choice=ema_choice, failed=failed)
  if paired:
    echo(
      "paired differences, test Dice (points):\n" + comparison_table(paired) + "\n" + _PLANNING_NOTE
    )
  choice = choose(root, cells, ema_choice=ema_choice, failed=failed)
  if choice:
    echo("\n".join(choice_lines(choice)))
  echo(
    f"tables: {root / 'benchmark.md'}  numbers: {root / 'benchmark.json'}  "
    f"plot: {root / 'dice_vs_noise.png'}"
  )
  diverged = outcomes.diverged
  if failed:
    names = ", ".join(f"{f['noise']}/{f['row']}/seed{f['seed']}" for f in failed)
    if len(diverged) == len(failed):
      raise NonFiniteLossError(f"{len(failed)} of {len(combos)} runs diverged: {names}")
    raise RunsFailedError(
      f"{len(failed)} of {len(combos)} runs failed ({len(diverged)} diverged): {names}; the "
      f"reasons are in {root / 'benchmark.md'}, and rerunning the command retries them"
    )
  return cells


class RunsFailedError(UserError):
  """Some runs of a benchmark failed; the others finished (reasons in benchmark.md)."""


def _reason(error: Exception) -> str:
  """One line for benchmark.md: the trainer's message, or the exception's type and first line."""
  if isinstance(error, UserError):
    return str(error).splitlines()[0] if str(error) else type(error).__name__
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- the numbers


def _check_labels(results: Mapping[str, Any], cfg: ml_collections.ConfigDict, rdir) -> None:
  """A finished run trained on other noisy labels than this invocation asks for (the other
  label mode) would pair wrongly with the new runs: refused, naming the folder."""
  want = cfg.data.noise.seed if cfg.data.noise.kind != "none" else None
  got = (results.get("noise") or {}).get("seed")
  if want is not None and got is not None and int(got) != int(want):
    raise ConfigError(
      f"{rdir} was trained with noise seed {got}, this benchmark asks for {want} (another "
      "--labels mode?): use another --workdir, or delete the folder to retrain it"
    )


def _load_results(path: pathlib.Path) -> dict[str, Any]:
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


def _corruption(run: pathlib.Path) -> float | None:
  try:
    return float(json.loads((run / "data_info.json").read_text())["noise"]["corruption_mean"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def collect(
  workdir,
  *,
  rows: Sequence[Row],
  noises: Sequence[str],
  seeds: Sequence[int] | None = None,
  ema_choice: str | None = None,
) -> list[dict[str, Any]]:
  """The table cells from the finished runs under `workdir`.

  Returns:
    One cell per (noise, row) with at least one finished seed, noise-major (levels by value,
    `sort_noises`):
    `{"noise", "label", "method", "overrides": [[key, value], ...], "seeds": [...], "epochs":
    [...], "corruption": mean 1 - Dice of the training labels or None, "test"/"val":
    {"ema"/"raw": {metric: {"mean", "std", "values"}}}}` over `METRIC_KEYS`; std is the sample
    std over seeds (ddof=1), None for one.

  Raises:
    ValueError: `workdir` is not a directory, or a results.json is malformed.
  """
  root = pathlib.Path(workdir).expanduser()
  if not root.is_dir():
    raise ValueError(f"workdir={str(workdir)!r}: not a directory")
  cells = []
  for noise_kind in sort_noises(noises):
    for row in rows:
      found = []
      for seed_dir in sorted((root / noise_kind / row.dirname).glob("seed*")):
        seed_text = seed_dir.name[len("seed") :]
        if not seed_text.isdigit() or (seeds is not None and int(seed_text) not in seeds):
          continue
        if (seed_dir / "results.json").is_file():
          results = _with_ema_choice(_load_results(seed_dir / "results.json"), ema_choice)
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
        # The EMA weights with each choice of BatchNorm statistics (runs that recorded both).
        if all("ema_bn" in f[2][split] for f in found):
          for bn in train.EMA_BATCH_STATS:
            cell[split][f"ema_bn_{bn}"] = {
              "dice": _stat([f[2][split]["ema_bn"][bn]["dice"] for f in found])
            }
      cells.append(cell)
  return cells


# ----------------------------------------------------------------------------- paired comparisons


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
  """(seeds, a (S, N), b (S, N)) over the seeds both cells finished with case scores."""
  dir_a, dir_b = (Row(c["label"], c["method"]).dirname for c in (cell_a, cell_b))
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
  for noise_kind in sort_noises([c["noise"] for c in cells] + [n for n, _ in lost]):
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
  """Which row to choose at each noise level: the best mean test Dice of the EMA weights (the
  tables' numbers) and every other row's paired difference to it (`comparisons`, failed runs
  counted).

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
  for noise_kind in sort_noises(c["noise"] for c in cells):
    level = [c for c in cells if c["noise"] == noise_kind and "dice" in c["test"]["ema"]]
    if not level:
      continue
    best = max(level, key=lambda c: c["test"]["ema"]["dice"]["mean"])
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
_PLANNING_NOTE = (
  "Seeds for a ±2-point interval: the seeds at which the interval's half-width would be 2 "
  "points at the measured variance (a precision estimate, itself noisy from 3 seeds). Seeds "
  "for 80% power: the seeds at which a true 2-point difference would be called ahead 80% of "
  "the time, from the measured seed, test-set and interaction components (`metadcseg_jax.stats`)."
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
      f"| {noise_label(c['noise'])} | {c['row']} − {c['reference']} | {c['params']} "
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
    "Test Dice of the EMA weights, as in the tables: at each noise level the row with the best "
    "mean, and each other row's paired difference to it in points with its 95% interval and "
    "verdict (behind: the best row is resolved ahead of it).",
    "",
  ]
  for ch in choice:
    head = f"- {noise_label(ch['noise'])}: **{ch['best']}** (mean {ch['best_mean'] * 100:.2f}"
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
    if ahead:  # possible where the paired seeds are not all the seeds of the means
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
      f"| {noise_label(c['noise'])} | {c['row']} | {len(c['seed_list'])} "
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


# ----------------------------------------------------------------------------- the tables


def noise_level(kind: str) -> int | None:
  """The nominal noise level in % of a kind: 0 for none, 20/40/60 for the L2B levels; None for
  the kinds without one (the Markov and distance kinds)."""
  if kind == "none":
    return 0
  return int(kind[len("l2b") :]) if kind in noise.l2b.L2B_LEVELS else None


def sort_noises(kinds: Iterable[str]) -> list[str]:
  """Noise kinds (repeats dropped) by value: none, the L2B levels by `noise_level`, then the
  other kinds in `noise.KINDS` order (unknown kinds last, in the order given)."""

  def key(kind):
    level = noise_level(kind)
    if level is not None:
      return (0, level)
    return (1, NOISE_ORDER.index(kind) if kind in NOISE_ORDER else len(NOISE_ORDER))

  return sorted(dict.fromkeys(kinds), key=key)


def noise_label(kind: str) -> str:
  """The column header of a noise kind: "0%" for none, "40%" for l2b40, else the kind."""
  if kind == "none":
    return "0%"
  return f"{kind[3:]}%" if kind in noise.l2b.L2B_LEVELS else kind


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
  noises = sort_noises([c["noise"] for c in cells] + [n for n, _ in lost])
  labels = list(dict.fromkeys([c["label"] for c in cells] + [r for _, r in lost]))
  by = {(c["noise"], c["label"]): c for c in cells}
  lossy = {n for n, _ in lost}
  head = []
  for n in noises:
    head += [f"{noise_label(n)} {name}" for _, name, _, _ in TABLE_METRICS]
    head += [f"{noise_label(n)} seeds lost"] if n in lossy else []
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


# The switches of the paper's Table 5 and the config key of each (on unless overridden).
TABLE5_SWITCHES = (("Meta", "meta.use"), ("DCD", "dcd.use"), ("Dice", "dcd.use_dice"))


def ablation_table(cells: Sequence[Mapping[str, Any]]) -> str:
  """The paper's Table 5 layout for MetaDCSeg's variants: a check per component (meta, DCD,
  Dice), the other changed setting, and per noise level the DSC (in %, mean ± std) on test and
  validation, EMA and raw parameters. Empty when no variant (a row with overrides) ran."""
  cells = [c for c in cells if c["method"] == "metadcseg"]
  if not any(c.get("overrides") for c in cells):
    return ""
  noises = sort_noises(c["noise"] for c in cells)
  labels = list(dict.fromkeys(c["label"] for c in cells))
  by = {(c["noise"], c["label"]): c for c in cells}
  columns = [("test", "ema"), ("test", "raw"), ("val", "ema"), ("val", "raw")]
  switch_keys = {key for _, key in TABLE5_SWITCHES}
  head = "| variant | " + " | ".join(name for name, _ in TABLE5_SWITCHES) + " | other setting | "
  head += " | ".join(f"{noise_label(n)} {sp} DSC {pa}" for n in noises for sp, pa in columns)
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
    f"- {noise_label(n)} ({n}): measured corruption 1 - Dice of the training labels {seen[n]:.3f}"
    for n in sort_noises(seen)
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
  their intervals and verdicts, the EMA statistics' choice, corruption, the failed runs."""
  out = ["# Benchmark", ""]
  if command:
    out += ["```bash", command, "```", ""]
  if choice:
    out += choice_lines(choice) + [""]
  if not cells:
    out += ["No finished runs yet.", ""]
  else:
    lost = lost_seeds(failed, cells)
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
    if paired:
      out += [
        "## Paired differences: test Dice, points",
        "",
        "Mean over seeds and test cases of the per-case difference; the 95% interval covers "
        "both the seeds and the finite test set (`metadcseg_jax.stats`), the two parts given "
        "as standard errors. Verdict: ahead / behind when the interval excludes zero. A failed "
        "run counts against its row: the interval is over the seeds both rows finished, the "
        "seeds lost are listed, and a verdict in favour of a row that lost seeds is withheld. "
        + _PLANNING_NOTE,
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
  the `failed` runs count against their rows (`count_failures`)."""
  root = pathlib.Path(workdir)
  cells = collect(root, rows=rows, noises=noises, seeds=seeds, ema_choice=ema_choice)
  paired = comparisons(root, cells, ema_choice=ema_choice, failed=failed)
  choice = choose(root, cells, ema_choice=ema_choice, failed=failed)
  ema_bn = ema_bn_comparisons(root, cells)
  (root / "benchmark.md").write_text(
    to_markdown(cells, command=command, failed=failed, paired=paired, ema_bn=ema_bn, choice=choice)
  )
  record = {
    "command": command,
    "cells": cells,
    "choice": choice,
    "comparisons": paired,
    "ema_batch_stats": ema_bn,
    "failed": list(failed),
  }
  (root / "benchmark.json").write_text(json.dumps(_json_safe(record), indent=1))
  if cells:
    try:
      figures.plot_dice_vs_noise(cells, root / "dice_vs_noise.png", label=noise_label)
    except Exception as e:  # pylint: disable=broad-except  (a figure must never cost the table)
      logging.warning("could not write dice_vs_noise.png: %s", e)
  return cells


def command_line(argv: Sequence[str]) -> str:
  """The command as a user would retype it (the entry point's name, not its full path)."""
  prog = os.path.basename(argv[0]) if argv else "metadcseg-benchmark"
  if prog.endswith(".py"):
    prog = "python -m experiments.benchmark"
  return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


# ----------------------------------------------------------------------------- label noise


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
