r"""One report of what the project does on a GPU, measured within a fixed time budget.

    python -m experiments.gpu_report --output=/tmp/gpu_report --kvasir_dir=/data/Kvasir-SEG
    python -m experiments.gpu_report --output=/tmp/gpu_report_tiny --tiny   # any CPU, minutes

Four sections, in this order, each with its own time budget (`Settings.budgets`):

1. throughput: each method's jitted train step (`throughput.time_step`) at every batch size:
   ms/step, images/s, the device's peak memory, FLOPs from XLA's cost analysis of the same step
   compiled for the CPU (`throughput.cpu_flops`, in helper processes while the device is
   timed) and MFU = FLOPs / time / the device's dense peak (`throughput.peak_tflops`); PyTorch's
   plain and L2B steps (`torch_ref.time_steps`) beside them where torch imports.
2. precision: the relative error of the meta-gradients and meta-weights against a float64
   CPU reference at the backend's default precision (TF32 on an NVIDIA GPU), `highest` and
   bfloat16 (`metadcseg_jax.tools.precision.measure`).
3. trainer: the trainer's images/s against its bare step at the Kvasir-SEG shape
   (`throughput.trainer_rates`).
4. kvasir: as many epochs of the paper's Kvasir-SEG setting as the time left allows, the time
   per epoch by phase, and the projected time of the paper's whole table (a benchmark
   preset's methods x noise levels x seeds x the config's epochs).

The budgets add up to the run's: a section may use what the ones before it left over, and
starts only with at least its `Settings.min_s` left (otherwise the report says it was skipped
and why). A failure inside a section (a batch that does not fit in memory, an error) is
written into the report and the next row or section runs. report.md and report.json are
rewritten after every row, so a run stopped at a time limit leaves every finished row on disk,
and each section carries its own wall time.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

from metadcseg_jax import files
from metadcseg_jax import methods
from metadcseg_jax.benchmark import presets
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.tools import precision as precision_lib
from metadcseg_jax.tools import throughput
from metadcseg_jax.training import runs
from metadcseg_jax.training import train

try:  # the extra `bench`
  from metadcseg_jax.tools import torch_ref
except ImportError:
  torch_ref = None

SECTIONS = ("throughput", "precision", "trainer", "kvasir")
TITLES = {
  "throughput": "Throughput and MFU per method and batch",
  "precision": "Meta-weight error against float64: TF32 (default), highest, bfloat16",
  "trainer": "The trainer against its bare step at the Kvasir-SEG shape",
  "kvasir": "Kvasir-SEG in the paper's setting: epochs, and the whole table projected",
}
# The paper's three methods first: when the budget runs out, the rows left unmeasured are the
# ones the paper's comparison needs least.
DEFAULT_METHODS = ("ce", "l2b", "metadcseg") + tuple(
  m for m in methods.NAMES if m not in ("ce", "l2b", "metadcseg")
)
_FIELD_NAMES = {"ga": "Ga", "gb": "Gb", "a_hat": "â", "b_hat": "b̂"}
PrecisionFn = Callable[[int, int, int, int], Mapping[str, Mapping[str, float]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """What the report measures and how long each section may take.

  Attributes:
    tiny: the tiny setting (for a CPU): recorded in the report.
    size, width, channels: image size, U-Net++ width and input channels of sections 1 and 2.
    methods, batches: section 1's rows (every method at every batch).
    repeats: timed steps per JAX row (median); torch_repeats: per PyTorch row.
    torch: also time PyTorch's steps where torch imports.
    flops_processes: helper processes computing the CPU FLOPs (0: in this process, after each
      row).
    precision_size, precision_batch: section 2's image size and batch (the paper's Kvasir-SEG
      batch: its float64 reference runs on the CPU).
    trainer_methods, trainer_steps, trainer_epochs, trainer_runs: section 3
      (`throughput.trainer_config`, `throughput.trainer_rates`).
    kvasir_dir: the Kvasir-SEG folder ("": none).
    stand_in: without a folder, section 4 trains on the synthetic set instead of skipping.
    kvasir_overrides: flattened config overrides applied to the Kvasir-SEG config (the tiny
      setting shrinks it with these).
    kvasir_warmup_epochs: section 4's warm-up epochs (at most the config's), so that the meta
      phase is reached inside the budget; the projection counts the config's.
    kvasir_max_epochs: stop section 4 after this many epochs (0: when the time is up).
    table: the benchmark preset (`presets.PRESETS`) whose runs the projection counts.
    data_dir: dataset builds, noisy-label caches and JAX's compilation cache.
    budgets: seconds per section (0: the section is off).
    min_s: the least time left for a section to start.
  """

  tiny: bool = False
  size: int = 256
  width: int = 32
  channels: int = 3
  methods: tuple[str, ...] = DEFAULT_METHODS
  batches: tuple[int, ...] = (8, 32)
  repeats: int = 10
  torch_repeats: int = 5
  torch: bool = True
  flops_processes: int = 4
  precision_size: int = 256
  precision_batch: int = 2
  trainer_methods: tuple[str, ...] = ("metadcseg", "ce")
  trainer_steps: int = 50
  trainer_epochs: int = 3
  trainer_runs: int = 1
  kvasir_dir: str = ""
  stand_in: bool = False
  kvasir_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  kvasir_warmup_epochs: int = 2
  kvasir_max_epochs: int = 0
  table: str = "paper"
  data_dir: str = "~/metadcseg_data"
  # 540 s: a minute of the ten left for the process's start and for the piece of work a
  # section begins before its time is up (a compile, an epoch, the precision measurement).
  budgets: Mapping[str, float] = dataclasses.field(
    default_factory=lambda: {
      "throughput": 210.0,
      "precision": 90.0,
      "trainer": 90.0,
      "kvasir": 150.0,
    }
  )
  min_s: Mapping[str, float] = dataclasses.field(
    default_factory=lambda: {"throughput": 20.0, "precision": 40.0, "trainer": 40.0, "kvasir": 60.0}
  )


def tiny_settings() -> Settings:
  """The tiny setting, for checking the report end to end on a CPU: 16 px, width 4, plain CE
  where a method is timed, MetaDCSeg's two phases on the synthetic set standing in for
  Kvasir-SEG. Compiling is nearly all of its time: about a CPU-minute for the sections other
  than precision, whose measurement alone compiles for about two."""
  return Settings(
    tiny=True,
    size=16,
    width=4,
    methods=("ce",),
    batches=(2,),
    repeats=2,
    torch_repeats=1,
    flops_processes=1,
    precision_size=16,
    trainer_methods=("ce",),
    trainer_steps=4,
    trainer_epochs=2,
    stand_in=True,
    kvasir_overrides={
      "data.size": 16,
      "model.width": 4,
      "data.n_train": 24,
      "data.n_val": 4,
      "data.n_test": 4,
      "train.log_every_steps": 5,
    },
    kvasir_warmup_epochs=1,
    kvasir_max_epochs=2,
    data_dir="/tmp/metadcseg_data",
    # Compiling is nearly all of it, minutes on a small CPU: budgets that only a stuck run meets.
    budgets={"throughput": 600.0, "precision": 600.0, "trainer": 600.0, "kvasir": 600.0},
    min_s={"throughput": 1.0, "precision": 1.0, "trainer": 1.0, "kvasir": 1.0},
  )


def settings_for(tiny: bool, given: Mapping[str, Any]) -> Settings:
  """The preset (`Settings()` or `tiny_settings()`) with the values a user gave.

  Args:
    tiny: start from the tiny setting.
    given: {field: value} for fields of `Settings`, plus "<section>_s" for a section's budget;
      lists become tuples (batches of ints).

  Returns:
    The settings.

  Raises:
    ConfigError: an unknown field, method or table preset.
  """
  base = tiny_settings() if tiny else Settings()
  fields = {f.name for f in dataclasses.fields(Settings)}
  budgets, changes = dict(base.budgets), {}
  for key, value in given.items():
    if key.endswith("_s") and key[:-2] in SECTIONS:
      budgets[key[:-2]] = float(value)
    elif key in fields:
      if isinstance(value, (list, tuple)):
        value = tuple(int(v) for v in value) if key == "batches" else tuple(value)
      changes[key] = value
    else:
      raise ConfigError(f"unknown setting {key!r}")
  settings = dataclasses.replace(base, budgets=budgets, **changes)
  bad = [m for m in settings.methods + settings.trainer_methods if m not in methods.NAMES]
  if bad:
    raise ConfigError(f"unknown methods {bad}: choose from {methods.NAMES}")
  if settings.table not in presets.PRESETS:
    raise ConfigError(f"unknown table {settings.table!r}: choose from {sorted(presets.PRESETS)}")
  return settings


# ----------------------------------------------------------------------------- the report


class Report:
  """report.json and report.md in one folder, rewritten whole (atomically) on every `write`.

  Attributes:
    data: what report.json holds: "header" and "sections" (a list of dicts, one per section,
      each with "name", "title", "status", "budget_s", "wall_s", "note" and its results).
  """

  def __init__(self, folder: str | os.PathLike, header: dict[str, Any]):
    self.folder = pathlib.Path(folder).expanduser()
    self.folder.mkdir(parents=True, exist_ok=True)
    self.data: dict[str, Any] = {"header": header, "sections": []}

  def section(self, name: str, budget_s: float) -> dict[str, Any]:
    """A new section, "running" until its status is set (a run stopped during it says so)."""
    sec = {"name": name, "title": TITLES[name], "status": "running", "budget_s": budget_s}
    sec.update(wall_s=0.0, note="")
    self.data["sections"].append(sec)
    return sec

  def write(self) -> None:
    """Both files from `data`, each replaced whole (a reader never sees half of one)."""
    files.write_atomic(self.folder / "report.json", json.dumps(self.data, indent=1))
    files.write_atomic(self.folder / "report.md", markdown(self.data))


def header(settings: Settings, command: str) -> dict[str, Any]:
  """The report's first lines: the command, the device, the versions, the settings."""
  devices = jax.devices()
  names = ("jax", "jaxlib", "flax", "optax", "torch")
  versions = {n: _version(n) for n in names}
  for dist in importlib.metadata.distributions():  # the CUDA plugin, when there is one
    name = dist.metadata["Name"] or ""
    if name.startswith(("jax-cuda", "jax_cuda")):
      versions[name] = dist.version
  return {
    "command": command,
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": devices[0].device_kind,
    "platform": jax.default_backend(),
    "device_count": len(devices),
    "host_cpus": os.cpu_count(),
    "versions": versions,
    "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE")},
    "compilation_cache": jax.config.jax_compilation_cache_dir or None,
    "settings": dataclasses.asdict(settings),
    "total_budget_s": sum(settings.budgets.values()),
  }


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


# ----------------------------------------------------------------------------- the run


def run(
  settings: Settings,
  *,
  output: str | os.PathLike,
  command: str,
  kvasir_config: ml_collections.ConfigDict,
  precision: PrecisionFn = precision_lib.measure,
) -> dict[str, Any]:
  """Measures the four sections within their budgets into `output`/report.{md,json}.

  Args:
    settings: what to measure and the budgets.
    output: the report's folder (created).
    command: the command line, for the report's first line.
    kvasir_config: the paper's Kvasir-SEG config (`experiments/configs/kvasir_seg.py`).
    precision: `fn(size, width, channels, batch) -> {setting: {field: relative error}}`,
      section 2's measurement (`precision.measure`; tests give a stand-in).

  Returns:
    report.json's content.
  """
  start = time.perf_counter()
  train.enable_compilation_cache(settings.data_dir)  # a rerun compiles nothing again
  report = Report(output, header(settings, command))
  report.write()
  kvasir, why_not = _kvasir_config(settings, kvasir_config)
  helper = None
  if why_not is None and settings.budgets.get("kvasir", 0) > 0 and settings.kvasir_dir:
    # Reading and resizing Kvasir-SEG and calibrating its noise take the CPU a minute: done by
    # a helper on the host's other cores while the device is busy with the sections before it
    # (and left failing harmlessly: the section then builds them itself).
    helper = _spawn("data_worker", [kvasir.to_json()], report.folder / "logs" / "data.log")
  bodies = {
    "throughput": lambda sec, deadline: _throughput(settings, sec, deadline, report),
    "precision": lambda sec, deadline: _precision(settings, sec, precision),
    "trainer": lambda sec, deadline: _trainer(settings, kvasir, sec, deadline, report),
    "kvasir": lambda sec, deadline: _kvasir(
      settings, kvasir, why_not, helper, sec, deadline, report
    ),
  }
  try:
    planned = 0.0
    for name in SECTIONS:
      planned += float(settings.budgets.get(name, 0.0))
      # Time a section does not use goes to the ones after it; one that overruns takes from them.
      _section(report, settings, name, bodies[name], start=start, end=start + planned)
  finally:
    _stop(helper)
  report.data["header"]["wall_s"] = time.perf_counter() - start
  report.data["header"]["finished"] = True
  report.write()
  return report.data


def _section(
  report: Report,
  settings: Settings,
  name: str,
  body: Callable[[dict, float], None],
  *,
  start: float,
  end: float,
) -> None:
  """Section `name`: off (no budget), skipped (less than its `min_s` left before `end`), or
  `body(section, deadline)` until it is done or fails; then its wall and CPU time."""
  budget = float(settings.budgets.get(name, 0.0))
  sec = report.section(name, budget)
  t0, cpu0 = time.perf_counter(), time.process_time()
  sec["started_s"], left = t0 - start, end - t0
  if budget <= 0:
    sec.update(status="off", note=f"off (--{name}_s=0)")
  elif left < settings.min_s.get(name, 0.0):
    sec.update(
      status="skipped",
      note=f"skipped for lack of time: {max(left, 0):.0f} s left of the run's budget, the "
      f"section starts with at least {settings.min_s[name]:.0f} s",
    )
  else:
    sec["allowed_s"] = left
    report.write()  # a run stopped in this section leaves it marked unfinished
    try:
      body(sec, end)
      if sec["status"] == "running":
        sec["status"] = "done"
    except Exception as e:  # pylint: disable=broad-except  (recorded; the next section runs)
      sec.update(status="failed", note=f"failed: {_error(e)}")
      sec["traceback"] = traceback.format_exc()[-4000:]
  sec["wall_s"] = time.perf_counter() - t0
  sec["cpu_s"] = time.process_time() - cpu0  # this process's threads, not the helpers
  report.write()


def _error(e: BaseException) -> str:
  """One line for the report; device memory exhaustion named as such."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  kind = type(e).__name__
  if throughput.is_out_of_memory(e):
    kind = f"out of device memory ({kind})"
  return f"{kind}: {text[:300]}" if text else kind


def _estimate(walls: Sequence[float], same: float | None) -> float:
  """Seconds the next piece will take: the same piece's earlier time, else the median of
  what has run (0 before anything has: the first piece always starts)."""
  if same is not None:
    return same
  return statistics.median(walls) if walls else 0.0


# ----------------------------------------------------------------------------- 1. throughput


def _throughput(settings: Settings, sec: dict, deadline: float, report: Report) -> None:
  """Section 1 into `sec` ("rows", "torch_rows"): batch by batch, each method's step while the
  time before `deadline` allows; the FLOPs from the helpers as they come."""
  s = settings
  peak = throughput.peak_tflops("float32")
  sec["peak_tflops"] = peak
  sec["shape"] = {"size": s.size, "width": s.width, "channels": s.channels}
  rows = {
    (m, b): {"method": m, "batch": b, "status": "not reached"} for m in s.methods for b in s.batches
  }
  torch_rows = {}
  if s.torch and torch_ref is not None:
    torch_rows = {b: {"batch": b, "status": "not reached"} for b in s.batches}
  elif s.torch:
    sec["note"] = "PyTorch not installed: no PyTorch rows."
  sec["rows"] = list(rows.values())
  sec["torch_rows"] = list(torch_rows.values())
  # Measured batch by batch, so that the smaller batch of every method comes first.
  order = [(m, b) for b in s.batches for m in s.methods]
  configs = {k: throughput.config_for(k[0], s.size, s.width, s.channels, k[1]) for k in order}
  jobs = [(f"{m}/{b}", configs[(m, b)]) for m, b in order]
  flops = _Flops(jobs, s.flops_processes, report.folder / "logs")
  walls: list[float] = []
  try:
    for batch in s.batches:
      for method in s.methods:
        row = rows[(method, batch)]
        same = [r["wall_s"] for (m, _), r in rows.items() if m == method and "wall_s" in r]
        need = _estimate(walls, same[0] if same else None)
        if deadline - time.perf_counter() < need:
          row.update(status="skipped", note=f"skipped for lack of time: {_no_time(deadline, need)}")
          continue
        t0 = time.perf_counter()
        try:
          r = throughput.time_step(configs[(method, batch)], s.repeats)
          row.update(status="done", **r)
        except Exception as e:  # pylint: disable=broad-except  (e.g. out of device memory)
          row.update(status="failed", note=_error(e))
        row["wall_s"] = time.perf_counter() - t0
        walls.append(row["wall_s"])
        if s.flops_processes == 0 and row["status"] == "done":
          flops.compute(f"{method}/{batch}", configs[(method, batch)])
        _add_flops(rows, flops.results(), peak)
        report.write()
      if batch in torch_rows:
        _torch_row(s, torch_rows[batch], deadline, torch_rows)
        report.write()
  finally:
    wanted = [f"{m}/{b}" for (m, b), r in rows.items() if r["status"] == "done"]
    _add_flops(rows, flops.close(wanted, deadline), peak)
    sec["flops_errors"] = {k: e for k, e in flops.errors.items() if k in wanted}
  if any(r["status"] != "done" for r in sec["rows"] + sec["torch_rows"]):
    sec["status"] = "partial"


def _no_time(deadline: float, need: float) -> str:
  left = max(deadline - time.perf_counter(), 0.0)
  return f"{left:.0f} s left, about {need:.0f} s needed"


def _torch_row(s: Settings, row: dict, deadline: float, torch_rows: dict) -> None:
  """PyTorch's plain and L2B steps at `row`'s batch (time scaled from a smaller batch's)."""
  done = [(b, r["wall_s"]) for b, r in torch_rows.items() if "wall_s" in r]
  need = done[-1][1] * row["batch"] / done[-1][0] if done else 0.0
  if deadline - time.perf_counter() < need:
    row.update(status="skipped", note=f"skipped for lack of time: {_no_time(deadline, need)}")
    return
  t0 = time.perf_counter()
  try:
    t = torch_ref.time_steps(s.size, s.width, s.channels, row["batch"], s.torch_repeats)
    row.update(status="done", plain_s=t["plain"], l2b_s=t["l2b"])
  except Exception as e:  # pylint: disable=broad-except
    row.update(status="failed", note=_error(e))
  row["wall_s"] = time.perf_counter() - t0


def _add_flops(rows: dict, found: Mapping[str, float | None], peak: float | None) -> None:
  for (method, batch), row in rows.items():
    f = found.get(f"{method}/{batch}")
    if f and row["status"] == "done":
      row["gflop"] = f / 1e9
      row["mfu"] = f / row["seconds"] / (peak * 1e12) if peak else None


def _spawn(function: str, args: Sequence[str], log: pathlib.Path) -> subprocess.Popen:
  """`gpu_report.<function>(*args)` in a helper process that sees only the CPU
  (JAX_PLATFORMS=cpu: it takes no device memory), its output into `log`."""
  code = (
    f"import sys; from metadcseg_jax.tools import gpu_report; gpu_report.{function}(*sys.argv[1:])"
  )
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "wb") as f:
    return subprocess.Popen(
      [sys.executable, "-c", code, *args],
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      stdout=f,
      stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen | None) -> None:
  if proc is not None and proc.poll() is None:
    proc.kill()
  if proc is not None:
    proc.wait()


class _Flops:
  """FLOPs per step from XLA's cost analysis of CPU compilations, computed by helper processes
  on the host's other cores while the device is timed: a CPU compile of a 256 px step takes
  seconds that would otherwise be spent in series with every row.

  Attributes:
    errors: {key: why its FLOPs are missing}.
  """

  def __init__(
    self, jobs: Sequence[tuple[str, ml_collections.ConfigDict]], processes: int, logs: pathlib.Path
  ):
    self._found: dict[str, float | None] = {}
    self._procs: list[tuple[subprocess.Popen, pathlib.Path]] = []
    self.errors: dict[str, str] = {}
    for i in range(min(processes, len(jobs))):
      jobs_file, out = logs / f"flops_jobs{i}.json", logs / f"flops{i}.jsonl"
      logs.mkdir(parents=True, exist_ok=True)
      jobs_file.write_text(json.dumps([(k, c.to_json()) for k, c in jobs[i::processes]]))
      out.write_text("")
      proc = _spawn("flops_worker", [str(jobs_file), str(out)], logs / f"flops{i}.log")
      self._procs.append((proc, out))

  def compute(self, key: str, config: ml_collections.ConfigDict) -> None:
    """In this process (no helpers)."""
    self._found[key] = throughput.cpu_flops(config)

  def results(self) -> dict[str, float | None]:
    for _, out in self._procs:
      for line in out.read_text().split("\n")[:-1]:  # whole lines only
        r = json.loads(line)
        self._found[r["key"]] = r.get("flops")
        if "error" in r:
          self.errors[r["key"]] = r["error"]
    return dict(self._found)

  def close(self, wanted: Sequence[str], deadline: float) -> dict[str, float | None]:
    """Waits until the `wanted` keys are in or the deadline passes, then stops the helpers."""
    while self._procs and time.perf_counter() < deadline:
      found = self.results()
      if all(k in found for k in wanted) or all(p.poll() is not None for p, _ in self._procs):
        break
      time.sleep(0.2)
    found = self.results()
    for proc, _ in self._procs:
      _stop(proc)
    return found


def flops_worker(jobs_path: str, out_path: str) -> None:
  """A helper process of `_Flops`: for each (key, config JSON) of `jobs_path`, one line
  {"key", "flops"} (or {"key", "error"}) appended to `out_path` as soon as it is known."""
  for key, config_json in json.loads(pathlib.Path(jobs_path).read_text()):
    try:
      line = {
        "key": key,
        "flops": throughput.cpu_flops(ml_collections.ConfigDict(json.loads(config_json))),
      }
    except Exception as e:  # pylint: disable=broad-except  (the row keeps its timing)
      line = {"key": key, "error": _error(e)}
    with open(out_path, "a") as f:
      f.write(json.dumps(line) + "\n")


def data_worker(config_json: str) -> None:
  """A helper process of `run`: builds section 4's dataset and noisy labels into their caches
  (under the data folder's locks) while the other sections run."""
  with tempfile.TemporaryDirectory(prefix="gpu_report_data_") as workdir:
    runs.prepare(ml_collections.ConfigDict(json.loads(config_json)), workdir)


# ----------------------------------------------------------------------------- 2. precision


def _precision(settings: Settings, sec: dict, precision: PrecisionFn) -> None:
  """Section 2 into `sec["rows"]`: one call of `precision` (it cannot stop halfway)."""
  s = settings
  sec["shape"] = {
    "size": s.precision_size,
    "width": s.width,
    "channels": s.channels,
    "batch": s.precision_batch,
  }
  out = precision(s.precision_size, s.width, s.channels, s.precision_batch)
  sec["rows"] = [
    {"setting": label, **{k: float(v) for k, v in errs.items()}} for label, errs in out.items()
  ]


# ----------------------------------------------------------------------------- 3. trainer


def _trainer(
  settings: Settings, kvasir: ml_collections.ConfigDict, sec: dict, deadline: float, report: Report
) -> None:
  """Section 3 into `sec["rows"]`: `throughput.trainer_rates` per method at the shape of
  `kvasir` (size, channels, width, batch) while the time before `deadline` allows."""
  s = settings
  size, channels = kvasir.data.size, kvasir.data.channels
  width, batch = kvasir.model.width, kvasir.train.batch_size
  sec["shape"] = {"size": size, "width": width, "channels": channels, "batch": batch}
  sec["runs"] = s.trainer_runs
  sec["rows"] = [{"method": m, "status": "not reached"} for m in s.trainer_methods]
  walls: list[float] = []
  for row in sec["rows"]:
    need = _estimate(walls, None)
    if deadline - time.perf_counter() < need:
      row.update(status="skipped", note=f"skipped for lack of time: {_no_time(deadline, need)}")
      continue
    t0 = time.perf_counter()
    try:
      base = throughput.config_for(row["method"], size, width, channels, batch)
      config = throughput.trainer_config(base, s.trainer_steps, s.data_dir, epochs=s.trainer_epochs)
      r = throughput.trainer_rates(config, s.repeats, runs=s.trainer_runs)
      row.update(status="done", **r)
    except Exception as e:  # pylint: disable=broad-except
      row.update(status="failed", note=_error(e))
    row["wall_s"] = time.perf_counter() - t0
    walls.append(row["wall_s"])
    report.write()
  if any(r["status"] != "done" for r in sec["rows"]):
    sec["status"] = "partial"


# ----------------------------------------------------------------------------- 4. kvasir


class _Enough(Exception):
  """Raised from the trainer's `after_epoch` to end the run: the next epoch would not fit."""


def _kvasir_config(
  settings: Settings, base: ml_collections.ConfigDict
) -> tuple[ml_collections.ConfigDict, str | None]:
  """The paper's Kvasir-SEG config with the settings' overrides and data folders (the
  synthetic set standing in where allowed), and why section 4 cannot train it (None: it can)."""
  config = base.copy_and_resolve_references()
  config.update_from_flattened_dict(dict(settings.kvasir_overrides))
  config.data.data_dir = settings.data_dir
  if settings.kvasir_dir:
    config.data.manual_dir = settings.kvasir_dir
    if not pathlib.Path(settings.kvasir_dir).expanduser().is_dir():
      return config, f"skipped: no Kvasir-SEG folder at {settings.kvasir_dir}"
  elif settings.stand_in:
    config.data.name = "synthetic"
  else:
    return config, "skipped: no Kvasir-SEG folder given (--kvasir_dir)"
  return config, None


def _kvasir(
  settings: Settings,
  kvasir: ml_collections.ConfigDict,
  why_not: str | None,
  helper: subprocess.Popen | None,
  sec: dict,
  deadline: float,
  report: Report,
) -> None:
  """Section 4 into `sec`: the data (from `helper`'s caches), then the trainer on `kvasir` with
  a shorter warm-up, epoch by epoch ("epochs") until the next would end after `deadline`, and
  the projection of the whole table ("projection") after each."""
  s, config = settings, kvasir.copy_and_resolve_references()
  if why_not is not None:
    sec.update(status="skipped", note=why_not)
    return
  if config.data.name == "synthetic":
    sec["note"] = "The synthetic set stands in for Kvasir-SEG (no folder given): not its timings."
  paper_epochs, paper_warmup = config.train.num_epochs, config.train.warmup_epochs
  config.train.warmup_epochs = min(paper_warmup, s.kvasir_warmup_epochs)
  # Diagnostics compile a function of their own; their 1-2 steps per hundred are left out.
  config.train.diagnostics_every_steps = 0
  sec["setting"] = {
    "dataset": config.data.name,
    "method": config.method,
    "size": config.data.size,
    "channels": config.data.channels,
    "width": config.model.width,
    "batch": config.train.batch_size,
    "noise": config.data.noise.kind,
    "epochs": paper_epochs,
    "warmup_epochs": paper_warmup,
    "warmup_epochs_run": config.train.warmup_epochs,
  }
  t0 = time.perf_counter()
  if helper is not None:  # the data helper's build, or what is left of it
    try:
      helper.wait(timeout=max(deadline - t0, 0.0))
    except subprocess.TimeoutExpired:
      pass
    code = helper.returncode
    sec["data_helper"] = {0: "done", None: "still running"}.get(code, f"failed (exit {code})")
    if code is None:  # building under the data folder's lock: waiting for it would overrun
      sec.update(status="partial", stopped="the data was not ready in the time left")
      return
  with tempfile.TemporaryDirectory(prefix="gpu_report_data_") as workdir:
    prepared = runs.prepare(config, workdir)  # from the caches when the helper built them
  sec["data_s"] = time.perf_counter() - t0
  sec["steps_per_epoch"] = prepared.steps_per_epoch
  sec["n_train"] = len(prepared.splits.train)
  if time.perf_counter() >= deadline:
    sec.update(status="partial", stopped="no time left for an epoch once the data was ready")
    return
  method = methods.create(prepared.config, steps_per_epoch=prepared.steps_per_epoch)
  epochs: list[dict[str, Any]] = []
  sec["epochs"] = epochs
  limit = min(s.kvasir_max_epochs or paper_epochs, paper_epochs)

  with tempfile.TemporaryDirectory(prefix="gpu_report_run_") as workdir:
    marks = [time.perf_counter()]

    def after_epoch(epoch: int) -> None:
      now = time.perf_counter()
      rates = _trainer_rates(pathlib.Path(workdir) / "metrics.jsonl")
      phase = method.phase(epoch - 1)
      epochs.append(
        {
          "epoch": epoch,
          "phase": phase,
          "wall_s": now - marks[-1],
          "first_of_phase": not any(e["phase"] == phase for e in epochs),
          "images_per_s": rates.get(epoch),
        }
      )
      marks.append(now)
      sec["projection"] = _projection(
        s, epochs, paper_epochs=paper_epochs, paper_warmup=paper_warmup
      )
      report.write()
      if epoch >= limit:
        why = "--kvasir_max_epochs" if s.kvasir_max_epochs else "the config's epochs"
        raise _Enough(f"stopped after {epoch} epochs ({why})")
      need = _next_epoch(epochs, method.phase(epoch))
      if deadline - now < need:
        raise _Enough(f"stopped after {epoch} epochs: {_no_time(deadline, need)} for the next")

    try:
      train.train_and_evaluate(config, workdir, after_epoch=after_epoch)
    except _Enough as e:
      sec["stopped"] = str(e)
  sec["projection"] = _projection(s, epochs, paper_epochs=paper_epochs, paper_warmup=paper_warmup)


def _trainer_rates(path: pathlib.Path) -> dict[int, float]:
  """{epoch: the trainer's images/s} from its metrics.jsonl (steps only, no checkpoint)."""
  if not path.exists():
    return {}
  lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return {r["epoch"]: r["images_per_s"] for r in lines if r.get("split") == "train"}


def _next_epoch(epochs: Sequence[dict], phase: str) -> float:
  """The seconds the next epoch (of `phase`) will take: its phase's last epoch, else (a new
  phase, compiled in its first epoch) the first epoch of the run, which compiled too."""
  same = [e["wall_s"] for e in epochs if e["phase"] == phase]
  return same[-1] if same else epochs[0]["wall_s"]


def _phase_seconds(epochs: Sequence[dict]) -> dict[str, dict[str, Any]]:
  """{phase: {"s": seconds per epoch, "steady": whether from an epoch after the phase's first,
  which compiles}}: the median of the steady epochs, else the first (an upper bound)."""
  out = {}
  for phase in dict.fromkeys(e["phase"] for e in epochs):
    steady = [e["wall_s"] for e in epochs if e["phase"] == phase and not e["first_of_phase"]]
    first = [e["wall_s"] for e in epochs if e["phase"] == phase and e["first_of_phase"]]
    out[phase] = {"s": statistics.median(steady) if steady else first[0], "steady": bool(steady)}
  return out


def _projection(
  settings: Settings, epochs: Sequence[dict], *, paper_epochs: int, paper_warmup: int
) -> dict[str, Any] | None:
  """The paper's table (`settings.table`'s preset: methods x noise levels x seeds) at the
  measured epoch times, one run at a time on this device.

  A method with a meta batch runs `paper_warmup` epochs at the warm-up epoch's time and the
  rest at the meta epoch's; a method without one runs every epoch at the warm-up epoch's time
  (the warm-up step is plain CE). A phase not reached falls back to the other one's time
  (flagged). None before the first epoch.
  """
  if not epochs:
    return None
  phases = _phase_seconds(epochs)
  preset = presets.PRESETS[settings.table]
  warm = phases.get("warmup") or phases.get("train")
  meta = phases.get("main")
  rows, total, notes = [], 0.0, []
  for row in preset["rows"]:
    uses_meta = methods.REGISTRY[row.method].uses_meta_batch
    w = warm or meta
    m = (meta or warm) if uses_meta else w
    if uses_meta and meta is None:
      notes.append(f"{row.label}: the meta phase was not reached, its epochs at the warm-up's")
    per_run = (
      (paper_warmup * w["s"] + (paper_epochs - paper_warmup) * m["s"])
      if uses_meta
      else (paper_epochs * w["s"])
    )
    n = len(preset["noises"]) * len(preset["seeds"])
    rows.append({"method": row.label, "runs": n, "per_run_s": per_run, "all_s": n * per_run})
    total += n * per_run
  if not all(p["steady"] for p in phases.values()):
    notes.append("a phase measured on its first epoch only (with its compile): an upper bound")
  return {
    "table": settings.table,
    "noises": list(preset["noises"]),
    "seeds": list(preset["seeds"]),
    "epochs": paper_epochs,
    "warmup_epochs": paper_warmup,
    "phases": phases,
    "rows": rows,
    "total_s": total,
    "notes": notes,
  }


# ----------------------------------------------------------------------------- markdown


def markdown(data: Mapping[str, Any]) -> str:
  """report.md from report.json's content."""
  h = data["header"]
  v = h["versions"]
  lines = [
    "# GPU report",
    "",
    f"- command: `{h['command']}`",
    f"- device: {h['device']} ({h['platform']}, {h['device_count']} device(s)), "
    f"{h['host_cpus']} host CPU cores",
    "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x),
    "- environment: " + ", ".join(f"{k}={x!r}" for k, x in h["env"].items()),
    f"- compilation cache: {h['compilation_cache']}",
    f"- started {h['started']}; budget {h['total_budget_s']:.0f} s ("
    + ", ".join(f"{k} {b:.0f}" for k, b in h["settings"]["budgets"].items())
    + ")"
    + (f"; finished in {h['wall_s']:.0f} s" if h.get("finished") else "; still running or stopped"),
  ]
  if h["settings"]["tiny"]:
    lines.append("- tiny setting: sizes for checking the report, not measurements")
  for i, sec in enumerate(data["sections"], start=1):
    status = sec["status"]
    if status == "running":
      status = "unfinished: the run ended during this section"
    lines += [
      "",
      f"## {i}. {sec['title']}",
      "",
      f"{status}; started at {sec['started_s']:.0f} s, wall {sec['wall_s']:.1f} s"
      + (f" (CPU {sec['cpu_s']:.1f} s)" if "cpu_s" in sec else "")
      + f", budget {sec['budget_s']:.0f} s"
      + (f", {sec['allowed_s']:.0f} s allowed" if "allowed_s" in sec else ""),
    ]
    if sec.get("note"):
      lines += ["", sec["note"]]
    lines += _RENDER[sec["name"]](sec)
    if sec.get("traceback"):
      lines += ["", "```", sec["traceback"].strip()[-1500:], "```"]
  return "\n".join(lines) + "\n"


def _f(x: Any, fmt: str = ".1f", none: str = "–") -> str:
  return none if x is None else format(x, fmt)


def _row_status(row: Mapping[str, Any]) -> str:
  return row.get("note") or row["status"]


def _render_throughput(sec: Mapping[str, Any]) -> list[str]:
  if "rows" not in sec:
    return []
  shape = sec["shape"]
  peak = sec.get("peak_tflops")
  out = [
    "",
    f"{shape.get('size')} px, U-Net++ width {shape.get('width')}, {shape.get('channels')} "
    f"channels, float32; MFU against {_f(peak, '.0f')} TFLOP/s (TF32 dense peak)"
    if peak
    else f"{shape.get('size')} px, U-Net++ width {shape.get('width')}, "
    f"{shape.get('channels')} channels, float32; no peak known for this device: no MFU",
    "",
    "| method | batch | ms/step | images/s | compile + first step (s) | device peak memory so far "
    "(GiB) | GFLOP/step (CPU XLA) | MFU | wall (s) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in sec.get("rows", []):
    if r["status"] != "done":
      out.append(
        f"| {r['method']} | {r['batch']} | {_row_status(r)} | | | | | | {_f(r.get('wall_s'))} |"
      )
      continue
    mem = r.get("peak_bytes")
    out.append(
      f"| {r['method']} | {r['batch']} | {r['seconds'] * 1e3:.1f} | {r['images_per_s']:.1f} "
      f"| {r['compile_s']:.1f} | {_f(mem / 2**30 if mem else None, '.2f')} "
      f"| {_f(r.get('gflop'), '.3g')} | {_f(r['mfu'] * 100 if r.get('mfu') else None)}"
      f"{'%' if r.get('mfu') else ''} | {r['wall_s']:.1f} |"
    )
  for r in sec.get("torch_rows", []):
    if r["status"] != "done":
      out.append(f"| PyTorch | {r['batch']} | {_row_status(r)} | | | | | | {_f(r.get('wall_s'))} |")
      continue
    for name, key in (("PyTorch plain CE", "plain_s"), ("PyTorch L2B", "l2b_s")):
      out.append(
        f"| {name} | {r['batch']} | {r[key] * 1e3:.1f} | {r['batch'] / r[key]:.1f} | | | | | "
        f"{r['wall_s']:.1f} |"
      )
  out += [f"- no FLOPs for {k}: {e}" for k, e in sec.get("flops_errors", {}).items()]
  out += [
    "",
    "ms/step: median of the timed steps after the first (the state donated, as in training). "
    "Device peak memory: the allocator's peak since the process started (a row shows the "
    "largest of itself and the rows measured before it).",
  ]
  return out


def _render_precision(sec: Mapping[str, Any]) -> list[str]:
  shape = sec.get("shape", {})
  rows = sec.get("rows", [])
  if not rows:
    return []
  keys = [k for k in rows[0] if k != "setting"]
  out = [
    "",
    f"U-Net++ width {shape.get('width')}, {shape.get('size')} px, {shape.get('channels')} "
    f"channels, batch {shape.get('batch')}; ||v - v64|| / ||v64|| against float64 on the CPU. "
    "On an NVIDIA GPU float32 \"default\" is TF32; on a CPU it equals \"highest\".",
    "",
    "| setting | " + " | ".join(_FIELD_NAMES.get(k, k) for k in keys) + " |",
    "|---|" + "---|" * len(keys),
  ]
  out += [f"| {r['setting']} | " + " | ".join(f"{r[k]:.2e}" for k in keys) + " |" for r in rows]
  return out


def _render_trainer(sec: Mapping[str, Any]) -> list[str]:
  if "rows" not in sec:
    return []
  shape = sec["shape"]
  out = [
    "",
    f"The synthetic set at {shape.get('size')} px, {shape.get('channels')} channels, U-Net++ "
    f"width {shape.get('width')}, batch {shape.get('batch')} (`throughput.trainer_rates`).",
    "",
    "| method | epochs (images/s) | bare step (images/s) | epochs / step | whole run (images/s) "
    "| share of the run in bare steps | wall (s) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in sec.get("rows", []):
    if r["status"] != "done":
      out.append(f"| {r['method']} | {_row_status(r)} | | | | | {_f(r.get('wall_s'))} |")
      continue
    out.append(
      f"| {r['method']} | {r['epochs']:.1f} | {r['step']:.1f} | {r['epochs'] / r['step']:.0%} "
      f"| {r['run']:.1f} | {r['run_share']:.0%} | {r['wall_s']:.1f} |"
    )
  out += [
    "",
    "Epochs: the median images/s of the epochs after the first, against the bare step. Whole "
    "run: from the end of the first epoch to the end of the last, the last epoch's validation "
    "included"
    + (
      " (the trainer ran once, so with its compile; --trainer_runs=2 measures a compiled run)."
      if sec.get("runs") == 1
      else "."
    ),
  ]
  return out


def _render_kvasir(sec: Mapping[str, Any]) -> list[str]:
  st = sec.get("setting")
  if not st:
    return []
  out = [
    "",
    f"{st['dataset']}, {st['method']}, {st['size']} px, {st['channels']} channels, U-Net++ "
    f"width {st['width']}, batch {st['batch']}, noise {st['noise']}; the config's "
    f"{st['epochs']} epochs with {st['warmup_epochs']} of warm-up, here {st['warmup_epochs_run']} "
    "of warm-up so that the meta phase is reached; no diagnostics.",
  ]
  if "data_s" in sec:
    helper = sec.get("data_helper")
    out.append(
      f"Data ready {sec['data_s']:.1f} s into the section (dataset build and noisy labels, or "
      "their caches"
      + (f"; the helper building them from the run's start: {helper}" if helper else "")
      + f"); {sec['n_train']} training images, {sec['steps_per_epoch']} steps per epoch."
    )
  if sec.get("stopped"):
    out.append(sec["stopped"] + ".")
  epochs = sec.get("epochs", [])
  if epochs:
    out += [
      "",
      "| epoch | phase | wall (s) | trainer's images/s (steps only) |",
      "|---|---|---|---|",
    ]
    for e in epochs:
      first = " (with its phase's compile)" if e["first_of_phase"] else ""
      out.append(
        f"| {e['epoch']} | {e['phase']}{first} | {e['wall_s']:.1f} | {_f(e['images_per_s'])} |"
      )
  p = sec.get("projection")
  if p and p["rows"]:
    phases = ", ".join(
      f"{k} {v['s']:.1f} s{'' if v['steady'] else ' (first epoch only)'}"
      for k, v in p["phases"].items()
    )
    out += [
      "",
      f"Projected: the `{p['table']}` table, noise {', '.join(p['noises'])}, seeds "
      f"{', '.join(map(str, p['seeds']))}, {p['epochs']} epochs ({p['warmup_epochs']} of "
      f"warm-up) per run, one run at a time on this device, at the epoch times {phases} "
      "(validations, audit passes and final evaluations not included):",
      "",
      "| method | runs | per run (h) | all its runs (h) |",
      "|---|---|---|---|",
    ]
    out += [
      f"| {r['method']} | {r['runs']} | {r['per_run_s'] / 3600:.2f} | {r['all_s'] / 3600:.2f} |"
      for r in p["rows"]
    ]
    out += ["", f"**The whole table: {p['total_s'] / 3600:.2f} h.**"]
    out += [f"- {n}" for n in p["notes"]]
  return out


_RENDER = {
  "throughput": _render_throughput,
  "precision": _render_precision,
  "trainer": _render_trainer,
  "kvasir": _render_kvasir,
}
