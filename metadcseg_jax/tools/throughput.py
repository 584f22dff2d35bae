"""A train step's speed, memory and FLOPs, measured as the trainer runs it.

    config = throughput.config_for("metadcseg", size=256, width=32, channels=3, batch=8)
    r = throughput.time_step(config, repeats=10)   # seconds, images/s, peak device memory
    flops = throughput.cpu_flops(config)           # XLA's cost analysis (nothing runs)

The step is the method's `train_step` of the phase a long run spends its time in, jitted with
the state donated, on `methods.example_feed`'s synthetic batch. The model FLOPs utilisation is
MFU = FLOPs / time / peak FLOP/s of the device (`peak_tflops`). `metadcseg-speed` prints these
as tables.
"""

import json
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

from metadcseg_jax import configs
from metadcseg_jax import methods
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import train

# Dense peak TFLOP/s by device kind and the precision the step's convolutions run at (XLA's
# GPU default for float32 is TF32; config.meta.precision="highest" makes the meta path FP32).
PEAK_TFLOPS = {
  "NVIDIA H100 80GB HBM3": {"tf32": 494.0, "bf16": 989.0, "fp32": 67.0},
  "NVIDIA H100": {"tf32": 494.0, "bf16": 989.0, "fp32": 67.0},
  "NVIDIA H200": {"tf32": 494.0, "bf16": 989.0, "fp32": 67.0},
  "NVIDIA A100-SXM4-80GB": {"tf32": 156.0, "bf16": 312.0, "fp32": 19.5},
}


def config_for(
  method: str,
  size: int,
  width: int,
  channels: int,
  batch: int,
  dtype: str = "float32",
  *,
  route: str = "jvp",
) -> ml_collections.ConfigDict:
  """The default config with `method` at this image size, network width, channels, batch (the
  training and the meta batch), network dtype and meta route.

  Args:
    method: config.method.
    size, width, channels: image size, U-Net++ width and input channels.
    batch: the training and the meta batch.
    dtype: config.model.dtype.
    route: config.meta.route.
  """
  config = configs.default_config()
  config.method = method
  config.meta.route = route
  config.data.size, config.data.channels = size, channels
  config.model.width, config.model.dtype = width, dtype
  config.train.batch_size = config.train.meta_batch_size = batch
  return config


def step_and_inputs(config: ml_collections.ConfigDict, phase: str | None = None):
  """(method, its unjitted train step of `phase` (default: the last epoch's), a synthetic
  batch)."""
  m = methods.create(config, steps_per_epoch=100)
  if phase is None:
    phase = m.phase(config.train.num_epochs - 1)  # the step a long run spends its time in
  feed = methods.example_feed(
    m, size=config.data.size, channels=config.data.channels, batch=config.train.batch_size
  )
  return m, m.train_step(phase), feed


def cpu_flops(config: ml_collections.ConfigDict) -> float | None:
  """FLOPs of one step from XLA's cost analysis of its CPU compilation (nothing runs; a GPU's
  cost analysis leaves out cuDNN convolutions)."""
  m, step, feed = step_and_inputs(config)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  state = jax.eval_shape(lambda: m.init_state(jax.random.PRNGKey(0)))
  abstract = lambda t: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), t
  )
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=cpu)
  compiled = jax.jit(step).lower(abstract(state), abstract(feed), rng).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


def time_step(
  config: ml_collections.ConfigDict, repeats: int, phase: str | None = None
) -> dict[str, float | None]:
  """Median seconds per step of `phase` (`step_and_inputs`; state donated, as in training)
  after the first call (compile and warm-up, `compile_s`), images/s, the device's peak memory
  (bytes, or None) and the median CPU seconds of this process per step (`cpu_seconds`: on a
  CPU shared with other work it moves far less than the wall time, so two revisions can be
  compared on a busy machine)."""
  m, step, feed = step_and_inputs(config, phase)
  step = jax.jit(step, donate_argnums=(0,))
  state = m.init_state(jax.random.PRNGKey(0))
  feed = jax.device_put(feed)
  t0 = time.perf_counter()
  state, out = step(state, feed, jax.random.PRNGKey(0))
  jax.block_until_ready((state, out))
  compile_s = time.perf_counter() - t0
  times, cpu = [], []
  for i in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    state, out = step(state, feed, jax.random.PRNGKey(i))
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  seconds = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "seconds": seconds,
    "compile_s": compile_s,
    "images_per_s": config.train.batch_size / seconds,
    "peak_bytes": stats.get("peak_bytes_in_use"),
    "cpu_seconds": statistics.median(cpu),
  }


def time_audit(config: ml_collections.ConfigDict, repeats: int) -> dict[str, float]:
  """Median seconds per call of the label audit's functions (`audit_passes.functions`) on the step's
  batch: "maps" (the whole meta step, as a pass makes it for every training batch where the
  audit does not factor), and where it does, "direction" (once per meta batch of a pass) and
  "along" (every training batch). A method without the audit gets {}."""
  m, _, feed = step_and_inputs(config)
  if not m.audits:
    return {}
  state = m.init_state(jax.random.PRNGKey(0))
  feed = jax.device_put(feed)
  fns = audit_passes.functions(m)
  calls = {"maps": (fns.maps, (state, feed))}
  if fns.direction is not None:
    direction = fns.direction(state, feed["meta_image"], feed["meta_label"])
    calls["direction"] = (fns.direction, (state, feed["meta_image"], feed["meta_label"]))
    calls["along"] = (fns.along, (state, feed, direction))
  out = {}
  for name, (fn, args) in calls.items():
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
  return out


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is the device running out of memory (XLA's RESOURCE_EXHAUSTED, or an
  allocator's "out of memory").

  >>> is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"))
  True
  >>> is_out_of_memory(ValueError("shapes differ"))
  False
  """
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def fits(config: ml_collections.ConfigDict) -> bool:
  """Whether one step of `config` runs in the device's memory."""
  try:
    time_step(config, repeats=1)
    return True
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError RESOURCE_EXHAUSTED)
    if is_out_of_memory(e):
      return False
    raise


def max_batch(method: str, size, width, channels, dtype, start: int = 8, limit: int = 4096) -> int:
  """The largest batch whose step runs (doubling from `start`, then bisection).

  Args:
    method, size, width, channels, dtype: as in `config_for`.
    start: the first batch tried.
    limit: the largest batch tried.
  """
  ok, batch = 0, start
  while batch <= limit and fits(config_for(method, size, width, channels, batch, dtype)):
    ok, batch = batch, batch * 2
  lo, hi = ok, min(batch, limit + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(config_for(method, size, width, channels, mid, dtype)):
      lo = mid
    else:
      hi = mid
  return lo


def trainer_config(
  config: ml_collections.ConfigDict, steps: int, data_dir: str, epochs: int = 4
) -> ml_collections.ConfigDict:
  """A copy of `config` for `trainer_rates`: the synthetic set with `steps` steps per
  epoch, `epochs` epochs, no warm-up, no evaluation before the end: the steps and what runs
  beside them, without a preset's validations and audit passes.

  Args:
    config: the config measured (left unchanged).
    steps: the steps per epoch.
    data_dir: the synthetic set's data folder.
    epochs: the epochs.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.name = "synthetic"
  config.data.data_dir = data_dir
  config.data.n_train = (steps + 1) * config.train.batch_size  # + the meta split
  config.data.n_val, config.data.n_test = 8, 8
  config.train.num_epochs, config.train.warmup_epochs = epochs, 0
  config.train.eval_every_epochs = 100
  config.train.log_every_steps = max(steps // 4, 1)
  return config


def trainer_rates(
  config: ml_collections.ConfigDict, repeats: int, runs: int = 1
) -> dict[str, float]:
  """The trainer against its bare step on `config`: a `trainer_config`, or a preset as it is
  (its data, epochs, validations and audit passes). Needs two epochs or more.

  With `runs` > 1 the trainer runs that many times in this process and the last run is
  measured: it finds every function compiled, as each run of a benchmark after the first finds
  them in the compilation cache (the first run's "run" rate includes compiling the phases and
  passes that begin after its first epoch).

  Returns:
    {"epochs": the median images/s of the epochs after the first (which compiles): their
       steps, the feeder, the diagnostics and the progress lines, overlapping the previous
       epoch's checkpoint as they do in training;
     "run": images/s from the end of epoch 1 to the end of the last epoch, everything between
       included (validations, audit passes, checkpoints, and the compiles of what is first
       called there); not the final evaluation;
     "step": the bare step's images/s in the last epoch's phase (`time_step`, the faster of
       its times just before and just after the measured run);
     "run_share": the share of that stretch of the run its steps would take at the bare
       steps' rates, each epoch at its own phase's step.}
  """
  if runs < 1:
    raise ValueError(f"trainer_rates needs a run or more, got runs={runs}")
  ends: dict[int, float] = {}
  mark = lambda epoch: ends.__setitem__(epoch, time.perf_counter())
  m = methods.create(config, steps_per_epoch=100)
  phases = sorted({m.phase(epoch) for epoch in range(config.train.num_epochs)})
  bare = lambda: {phase: time_step(config, repeats, phase=phase)["seconds"] for phase in phases}
  for i in range(runs):
    if i == runs - 1:
      before = bare()
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(config, workdir, after_epoch=mark)
      lines = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]
  # A small (virtual) CPU's speed drifts by 10-20% over minutes: the bare steps are timed just
  # before and just after the measured run, and the faster of the two is its reference (a slow
  # reading never flatters the trainer).
  after = bare()
  step_s = {phase: min(before[phase], after[phase]) for phase in phases}
  epochs = [r for r in lines if r["split"] == "train"]
  if len(epochs) < 2:
    raise ValueError(f"trainer_rates needs 2 epochs or more, got {len(epochs)}")
  run_s = ends[epochs[-1]["epoch"]] - ends[epochs[0]["epoch"]]
  pairs = list(zip(epochs, epochs[1:]))
  steps = sum(b["step"] - a["step"] for a, b in pairs)
  bare_s = sum((b["step"] - a["step"]) * step_s[b["phase"]] for a, b in pairs)
  return {
    "epochs": statistics.median(r["images_per_s"] for r in epochs[1:]),
    "run": steps * config.train.batch_size / run_s,
    "step": config.train.batch_size / step_s[epochs[-1]["phase"]],
    "run_share": bare_s / run_s,
  }


def peak_tflops(dtype: str, given: float = 0.0) -> float | None:
  """The device's dense peak TFLOP/s at the precision of `dtype` (`given` if not 0; None for a
  device not in `PEAK_TFLOPS`)."""
  if given:
    return given
  table = PEAK_TFLOPS.get(jax.devices()[0].device_kind)
  if not table:
    return None
  return table["bf16" if dtype == "bfloat16" else "tf32"]
