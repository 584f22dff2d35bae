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

* `benchmark.md`: first which row to choose at each noise level (`tables.choose`: the best mean test
  Dice and every other row's paired difference to it); the main table in the layout of the
  paper's Table 2 (rows: methods; for each noise level: mIoU, DSC, HD95 as mean ± std over
  seeds, and how many seeds a cell lost to failed runs) on the test split, for the EMA and the
  raw parameters; the same on the validation split (what settings are chosen on); the paired
  comparisons; the ablation table (the paper's Table 5 layout) when variants ran; the measured
  corruption of each level; the failed runs; the command line.
* `benchmark.json`: every run's numbers, the per-seed values, the comparisons, the choice, the
  failed runs.
* `dice_vs_noise.png`: test Dice against noise level with error bars, one line per row.

Noise levels are ordered by value in the tables and the plot (`presets.sort_noises`), whatever the
order of `--noise`.

Two label modes. `labels="per_seed"` (the presets' default): seed k also draws the noise realisation
(config.data.noise.seed = k) and the clean meta split (config.data.meta_seed = k), so the spread
over seeds is the spread a user meets on new data; every row of one seed still sees the same
corrupted masks and meta set, so rows stay paired. `labels="fixed"`: seeds vary the initialisation
and the data order only (config.seed), the noisy labels and the meta split those of the base config.
Each run reads its test split once, after training, and keeps every test case's scores (cases.json),
from which the paired comparisons are computed: `metadcseg_jax.benchmark.stats` (mean paired
difference, a 95% interval over seeds and test cases, its seed and test-set parts, a verdict, the
seeds for a ±2-point interval and for 80% power at a 2-point gap). A run that failed stays in its
comparisons as a failure (`tables.count_failures`).
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import pathlib
import signal
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

from metadcseg_jax import check_settings
from metadcseg_jax import cli
from metadcseg_jax.benchmark import presets
from metadcseg_jax.benchmark import report
from metadcseg_jax.benchmark import tables
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.errors import Preempted
from metadcseg_jax.errors import RunStopped
from metadcseg_jax.errors import UserError
from metadcseg_jax.training import preemption
from metadcseg_jax.training import train


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
  rows: Sequence[presets.Row],
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
  seeds = presets.parse_seeds(seeds)
  rows = list(rows)
  presets.check_grid(rows, noises, seeds)
  if processes < 1:
    raise ConfigError(f"processes must be >= 1, got {processes}")
  root = pathlib.Path(workdir).expanduser().resolve()
  root.mkdir(parents=True, exist_ok=True)
  combos = [(n, r, s) for s in seeds for n in noises for r in rows]
  ema_choice = config.train.ema_batch_stats
  failed: list[dict[str, Any]] = []
  write = lambda: report.write_outputs(
    root,
    rows=rows,
    noises=noises,
    seeds=seeds,
    command=command,
    failed=failed,
    ema_choice=ema_choice,
  )
  outcomes = _Outcomes(echo=echo, write=write, failed=failed)
  jobs = _pending_jobs(config, root, combos, labels=labels, echo=echo)
  trainer = trainer or train.train_and_evaluate
  if processes > 1 and len(jobs) > 1:
    _run_in_processes(jobs, min(processes, len(jobs)), outcomes, trainer)
  else:
    _run_in_turn(jobs, outcomes, trainer)
  if outcomes.stopped is not None:
    outcomes.write()
    raise outcomes.stopped
  cells = outcomes.write()
  _summarize(root, cells, outcomes, runs=len(combos), ema_choice=ema_choice)
  return cells


def _pending_jobs(
  config: ml_collections.ConfigDict,
  root: pathlib.Path,
  combos: Sequence[tuple[str, presets.Row, int]],
  *,
  labels: str,
  echo: Callable[[str], None],
) -> list[tuple[tuple[str, str, presets.Row, int], ml_collections.ConfigDict, pathlib.Path]]:
  """The (noise, row, seed) combinations not finished yet, as jobs ((tag, noise, row, seed),
  config, run folder); a finished one gets its line (and a warning if it stopped at another
  epoch than the config's)."""
  jobs = []
  for i, (noise_kind, row, seed) in enumerate(combos, start=1):
    rdir = presets.run_dir(root, noise_kind, row, seed)
    tag = f"[{i}/{len(combos)}] {noise_kind}/{row.label}/seed{seed}"
    done = rdir / "results.json"
    cfg = presets.run_config(config, row=row, noise_kind=noise_kind, seed=seed, labels=labels)
    if done.is_file():
      results = tables.load_results(done)
      _check_labels(results, cfg, rdir)
      note = ""
      if results["epoch"] != config.train.num_epochs:
        note = (
          f"  WARNING: finished at epoch {results['epoch']}, the config asks for "
          f"{config.train.num_epochs}; delete {rdir} to redo it"
        )
      echo(f"{tag}: done already, {_short(results)}{note}")
      continue
    # A setting no run can train with (a meta method on masks no one verified, say) stops the
    # benchmark before its first run rather than failing every run that has it.
    problems = check_settings.problems(cfg)
    if problems:
      raise ConfigError(f"{noise_kind}/{row.label}/seed{seed}: " + "; ".join(problems))
    jobs.append(((tag, noise_kind, row, seed), cfg, rdir))
  return jobs


def _run_in_turn(jobs, outcomes: _Outcomes, trainer: Callable) -> None:
  """Trains `jobs` one after another in this process; a run that stops stops the rest."""
  for job, cfg, rdir in jobs:
    outcomes.echo(f"{job[0]}: training in {rdir}")
    t0 = time.perf_counter()
    try:
      results = trainer(cfg, str(rdir))
    except Exception as e:  # pylint: disable=broad-except  (sorted out by `_Outcomes.add`)
      outcomes.add(job, error=e)
      if outcomes.stopped:
        break
      continue
    outcomes.add(job, results, time.perf_counter() - t0)


def _summarize(
  root: pathlib.Path, cells, outcomes: _Outcomes, *, runs: int, ema_choice: str | None
) -> None:
  """The closing lines (paired comparisons, the choice, where the outputs are), then the failed
  runs raised (`run_benchmark`'s Raises)."""
  echo, failed = outcomes.echo, outcomes.failed
  paired = tables.comparisons(root, cells, ema_choice=ema_choice, failed=failed)
  if paired:
    echo(
      "paired differences, test Dice (points):\n"
      + report.comparison_table(paired)
      + "\n"
      + report.PLANNING_NOTE
    )
  choice = tables.choose(root, cells, ema_choice=ema_choice, failed=failed)
  if choice:
    echo("\n".join(report.choice_lines(choice)))
  echo(
    f"tables: {root / 'benchmark.md'}  numbers: {root / 'benchmark.json'}  "
    f"plot: {root / 'dice_vs_noise.png'}"
  )
  diverged = outcomes.diverged
  if failed:
    names = ", ".join(f"{f['noise']}/{f['row']}/seed{f['seed']}" for f in failed)
    if len(diverged) == len(failed):
      raise NonFiniteLossError(f"{len(failed)} of {runs} runs diverged: {names}")
    raise RunsFailedError(
      f"{len(failed)} of {runs} runs failed ({len(diverged)} diverged): {names}; the "
      f"reasons are in {root / 'benchmark.md'}, and rerunning the command retries them"
    )


class RunsFailedError(UserError):
  """Some runs of a benchmark failed; the others finished (reasons in benchmark.md)."""


def _reason(error: Exception) -> str:
  """One line for benchmark.md: the trainer's message, or the exception's type and first line."""
  if isinstance(error, UserError):
    return str(error).splitlines()[0] if str(error) else type(error).__name__
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


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
