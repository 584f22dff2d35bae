"""The training loop: `train_and_evaluate(config, workdir)`.

Data, steps, evaluation calls, checkpoints, logs; nothing of any method's insides (those are
behind `metadcseg_jax.methods`). Each method phase's step is a jitted pure function
`(state, batch, rng) -> (state, metrics)` with the state donated, compiled the first time an
epoch needs it; compiled programs also go to JAX's persistent cache under the data folder, so
a second run of the same config starts in seconds.

Evaluation during training reads the validation split only; the test split is read once, at the
end (`results.json` has both), so settings can be chosen on validation data.

Outputs in `workdir`: `checkpoints/` (orbax: state, data iterator states, settings), a line per
epoch, per validation and per diagnostics point in `metrics.jsonl`, `results.json` (final
metrics on val and test), `panel.png`, `curves.png`,
the method's own figure (MetaDCSeg: `dcd.png`), `data_info.json`, `config.json` and
`config_history.jsonl`, `cases.json` (every val and test case's Dice, IoU and HD95, for paired
statistics across runs); for a meta method, `audit/epoch_<e>.npz` in its last `config.audit.epochs`
epochs (`metadcseg-audit`). Rerunning the same command resumes from the last checkpoint.

Stopping: a stop signal (SIGTERM, SIGINT, SIGUSR1) during training finishes the step in
progress, writes a step checkpoint and raises `Preempted`; a full disk raises `DiskFullError`
with the checkpoints before it intact (`metadcseg_jax.training.preemption`). A run resumed inside an
epoch logs that epoch's line as if it had not stopped: its metrics are the mean over all the
epoch's steps (those before the stop come with the checkpoint); only images_per_s and the
duration count the steps of the last invocation alone.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metadcseg_jax import check_settings
from metadcseg_jax import files
from metadcseg_jax import methods
from metadcseg_jax import metrics as metrics_lib
from metadcseg_jax import parallel
from metadcseg_jax import progress
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.errors import Preempted
from metadcseg_jax.errors import RunStopped
from metadcseg_jax.inference import model as model_lib
from metadcseg_jax.inference import original_size
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import checkpoint
from metadcseg_jax.training import evaluate
from metadcseg_jax.training import figures
from metadcseg_jax.training import preemption
from metadcseg_jax.training import runs
from metadcseg_jax.training import workdir as workdir_lib

COMPILE_CACHE = "jax_compilation_cache"


def enable_compilation_cache(data_dir: str) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache in `<data_dir>/jax_compilation_cache`.

  A process keeps the first folder it sets (or the one in $JAX_COMPILATION_CACHE_DIR).
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return pathlib.Path(current)
  path = pathlib.Path(data_dir).expanduser().resolve() / COMPILE_CACHE
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  # Cache every program: the small ones (evaluation, 1 s) add up too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


class Compiled:
  """A method and its jitted functions on a mesh, compiled lazily and kept for the process.

  The state is replicated and every batch is split over the mesh's `data` axis
  (`metadcseg_jax.parallel`); on one device this is plain `jax.jit`.
  """

  def __init__(
    self, config: ml_collections.ConfigDict, steps_per_epoch: int, par: parallel.Parallel
  ):
    self.method = methods.create(config, steps_per_epoch=steps_per_epoch)
    self.parallel = par
    self.predictor = evaluate.Predictor(self.method)
    self._steps: dict[str, Callable] = {}

  @functools.cached_property
  def diagnostics(self) -> Callable:
    p = self.parallel
    return jax.jit(
      self.method.diagnostics,
      in_shardings=(p.replicated, p.batch_sharding),
      out_shardings=p.replicated,
    )

  @functools.cached_property
  def audit(self) -> audit_passes.Functions:
    # One process, a local copy of the state.
    return audit_passes.functions(self.method)

  def step(self, phase: str) -> Callable:
    if phase not in self._steps:
      p = self.parallel
      self._steps[phase] = jax.jit(
        self.method.train_step(phase),
        donate_argnums=(0,),
        in_shardings=(p.replicated, p.batch_sharding, p.replicated),
        out_shardings=(p.replicated, p.replicated),
      )
    return self._steps[phase]


@functools.lru_cache(maxsize=8)
def _compiled(config_json: str, steps_per_epoch: int, par: parallel.Parallel) -> Compiled:
  return Compiled(ml_collections.ConfigDict(json.loads(config_json)), steps_per_epoch, par)


def compiled_for(
  config: ml_collections.ConfigDict, steps_per_epoch: int, par: parallel.Parallel | None = None
) -> Compiled:
  """The `Compiled` of this exact config and mesh (keyed on all of the config: no stale step is
  reused). `par` None: one device."""
  par = par or parallel.make_parallel(ml_collections.ConfigDict({"data": 1}))
  settings = json.loads(config.to_json(sort_keys=True))
  for key in NOT_COMPILED:  # runs differing only in these share their compiled functions
    settings.get("train", {}).pop(key, None)
  return _compiled(json.dumps(settings, sort_keys=True), steps_per_epoch, par)


# Settings of `config.train` that no compiled function reads.
NOT_COMPILED = ("checkpoint_every_steps", "checkpoint_every_minutes")


class Progress:
  """One log line every `every` steps: epoch, step, loss, images/s and the time left.

  The time left extrapolates the step rate measured since the first logged step of this
  invocation (compilation excluded) to the remaining steps.
  """

  def __init__(
    self, *, total_steps: int, steps_per_epoch: int, batch_size: int, every: int, num_epochs: int
  ):
    self.total, self.per_epoch, self.batch = total_steps, steps_per_epoch, batch_size
    self.every, self.num_epochs = every, num_epochs
    self._mark = None  # (time, global step) of the first measured point
    self._last = None

  def update(self, step: int, loss: float) -> None:
    """Called after global step `step` (1-based) with that step's loss."""
    now = time.perf_counter()
    epoch, in_epoch = divmod(step - 1, self.per_epoch)
    where = f"epoch {epoch + 1}/{self.num_epochs} step {in_epoch + 1}/{self.per_epoch}"
    if self._mark is None:  # the steps so far include compilation: no rate yet
      self._mark = self._last = (now, step)
      logging.info("%s  loss %.4f  (speed and time left from the next line on)", where, loss)
      return
    (t0, s0), (t1, s1) = self._mark, self._last
    rate = (step - s0) / max(now - t0, 1e-9)
    images_per_s = (step - s1) * self.batch / max(now - t1, 1e-9)
    self._last = (now, step)
    logging.info(
      "%s  loss %.4f  %.1f img/s  %s left",
      where,
      loss,
      images_per_s,
      progress.duration((self.total - step) / max(rate, 1e-9)),
    )

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0


def _first_bad_step(losses: np.ndarray, first_step: int) -> int | None:
  bad = np.flatnonzero(~np.isfinite(losses))
  return None if bad.size == 0 else first_step + int(bad[0])


def _epoch_metrics(par, done: dict[str, np.ndarray] | None, step_metrics) -> dict[str, np.ndarray]:
  """The epoch's step metrics so far, {name: (steps, ...)}: those restored from a step
  checkpoint (`done`) first, then this invocation's."""
  new = par.fetch(jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics)) if step_metrics else {}
  if not done:
    return new
  return {k: np.concatenate([done[k], new[k]]) if k in new else done[k] for k in done}


def check_finite(losses: np.ndarray, first_step: int, epoch: int, ckpt) -> None:
  """The NaN policy: a non-finite loss stops the run before anything of its epoch is saved.

  Args:
    losses: (steps,) the epoch's step losses so far, the first after global step `first_step`.
    first_step: the global step before the epoch's first step.
    epoch: the epoch (0-based).
    ckpt: the run's `checkpoint.Checkpointer` (named in the message: where the last good
      checkpoint is kept, epoch or step, whichever is newer).

  Raises:
    NonFiniteLossError: a loss is NaN or Inf (names the first such global step).
  """
  bad = _first_bad_step(losses, first_step)
  if bad is None:
    return
  last, last_step = ckpt.latest_epoch(), ckpt.latest_step_checkpoint()
  where = (
    f"the last good checkpoint (epoch {last}) is kept in {ckpt.directory}"
    if last is not None
    else "no checkpoint had been written yet"
  )
  if last_step is not None and last_step > (last or 0) * ckpt.steps_per_epoch:
    where = f"the last good checkpoint (step {last_step}) is kept in {ckpt.steps_dir}"
  raise NonFiniteLossError(
    f"non-finite training loss at step {bad} (epoch {epoch + 1}); stopped without saving: {where}"
  )


# Batch keys a train step never sees: the clean label (only the meta batch is clean) and the
# examples' indices.
HIDDEN_KEYS = ("label", "index")


def _feed(batch: dict[str, np.ndarray], meta_batch: dict[str, np.ndarray] | None):
  """What a step sees: the batch without the clean label, plus the clean meta batch."""
  feed = {k: v for k, v in batch.items() if k not in HIDDEN_KEYS}
  if meta_batch is not None:
    feed["meta_image"], feed["meta_label"] = meta_batch["image"], meta_batch["label"]
  return feed


class _Feeder:
  """The steps' inputs, prepared `ahead` steps ahead in a thread: the next batches are read,
  split into this process's rows and sent to the devices while the current step runs.

  Each item carries the iterators' states after its batches, so a checkpoint records what
  was consumed, not what was prefetched.
  """

  def __init__(self, train_it, meta_it, par: parallel.Parallel, *, ahead: int = 2):
    self._train_it, self._meta_it, self._par = train_it, meta_it, par
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._queue: collections.deque = collections.deque()
    self._ahead = ahead
    self.data_state = self._states()

  def _states(self) -> dict[str, Any]:
    states = {"train": self._train_it.get_state()}
    if self._meta_it is not None:
      states["meta"] = self._meta_it.get_state()
    return states

  def _produce(self):
    meta_batch = next(self._meta_it) if self._meta_it is not None else None
    feed = _feed(next(self._train_it), meta_batch)
    return self._par.global_batch(feed), self._states()

  def next(self) -> dict[str, jax.Array]:
    while len(self._queue) < self._ahead:
      self._queue.append(self._pool.submit(self._produce))
    feed, self.data_state = self._queue.popleft().result()
    return feed

  def close(self) -> None:
    """Stops reading ahead (the batch being read is finished, the queued ones are dropped)."""
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> "_Feeder":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  after_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
  """Trains `config.method` and evaluates it; resumes from `workdir`'s last checkpoint.

  `after_epoch(epoch)` (1-based), when given, is called once each epoch is done: its
  validation, audit pass and checkpoint included (the throughput measurements time it).

  On several processes (`config.distributed`), every process calls this with the same
  config; process 0 holds the workdir's lock and writes its logs, results and figures, all
  write the checkpoints together.

  Returns:
    The final results (also written to workdir/results.json); on processes other than 0,
    only {"process_index", "workdir"}.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: user errors, raised before training
      where possible. NonFiniteLossError: the loss became NaN or Inf (the last good checkpoint
      is kept). Preempted: a stop signal during training (the step it came in is finished and
      checkpointed). DiskFullError: a write ran out of space (the checkpoints before it are
      intact). Rerunning resumes after the last two.
  """
  check_settings.check_config(config)
  parallel.initialize_distributed(config.distributed)
  wd = workdir_lib.Workdir(workdir)
  try:
    if not parallel.is_main_process():
      return _train(config, wd, after_epoch)
    with wd.locked():
      return _train(config, wd, after_epoch)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless a full disk)
    if isinstance(e, RunStopped) or not files.is_disk_full(e):
      raise
    raise files.disk_full_error(getattr(e, "filename", None) or wd.path) from e


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What the run is: fixed before its inputs and checkpoints open (`_prepare`).

  Attributes:
    run: the run's folder, settings (with those from the data), data and steps per epoch.
    par: the device mesh.
    compiled: the method and its jitted functions on `par`.
    main: whether this is process 0 (logs, evaluation, audit, results, figures).
  """

  run: runs.Run
  par: parallel.Parallel
  compiled: Compiled
  main: bool

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.run.config

  @property
  def method(self) -> methods.base.Method:
    return self.compiled.method

  def log(self, record: dict[str, Any]) -> None:
    """A line of metrics.jsonl (process 0 only)."""
    if self.main:
      self.run.workdir.metrics.append(record)


@dataclasses.dataclass(frozen=True)
class _Loop(_Setup):
  """The run and what is open while its epochs train (`_open`, closed by `_train`'s exit stack).

  Attributes:
    ckpt: the run's checkpoints (written by this process).
    feeder: the steps' inputs, read ahead in a thread.
    stop: the stop signals, recorded while the epochs run.
    schedule: when a step checkpoint is written.
    progress: the progress lines.
  """

  ckpt: checkpoint.Checkpointer
  feeder: "_Feeder"
  stop: preemption.StopSignals
  schedule: preemption.Schedule
  progress: Progress


class _Start(NamedTuple):
  """Where this invocation starts (`_open`).

  Attributes:
    state: the replicated training state: the initial one, or the restored one.
    epoch: the first epoch to train (0-based).
    partial: a step checkpoint's progress into `epoch` (consumed by that epoch), or None.
  """

  state: Any
  epoch: int
  partial: dict[str, Any] | None


@dataclasses.dataclass
class _Epoch:
  """One epoch in progress.

  Attributes:
    index: the epoch (0-based).
    phase: the method's phase in it (`method.phase`).
    first_step: the global step before its first step.
    begin: the first step this invocation runs (after those a step checkpoint restored).
    done_metrics: the restored steps' metrics, {name: (begin, ...)}, or None.
    checkpoint: whether an epoch checkpoint follows it.
    started: `time.perf_counter()` at its first step in this invocation.
    step_metrics: this invocation's steps' metrics (device arrays), in order.
  """

  index: int
  phase: str
  first_step: int
  begin: int
  done_metrics: dict[str, np.ndarray] | None
  checkpoint: bool
  started: float
  step_metrics: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)


def _train(
  config: ml_collections.ConfigDict,
  wd: workdir_lib.Workdir,
  after_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
  """The run in `wd` (locked by the caller on process 0), in this order: the settings, data and
  method (`_prepare`); the checkpoints, the inputs and the stop signals opened and the newest
  checkpoint restored (`_open`); the epochs (`_one_epoch`, `_end_epoch`, then `after_epoch`);
  the stop signals, the inputs and the checkpoints closed, in that order; then, unless a stop
  signal came, the final evaluation (`_finish`).

  An error in the epochs leaves the checkpoints as they were before it (a pending save is
  finished if it can be, `Checkpointer.__exit__`); the error raised is the run's own.
  """
  setup = _prepare(config, wd)
  with contextlib.ExitStack() as stack:
    loop, start = _open(setup, stack)
    state, partial = start.state, start.partial
    for epoch in range(start.epoch, loop.config.train.num_epochs):
      state, ep = _one_epoch(loop, state, epoch, partial)
      partial = None
      _end_epoch(loop, state, ep)
      if after_epoch is not None:
        after_epoch(epoch + 1)
  if parallel.any_process([loop.stop.received is not None])[0]:
    # Came after the last step (during its evaluation or checkpoint): training is saved.
    raise Preempted(
      f"stopped by {loop.stop.name} after the last training step, before the final evaluation: "
      "rerun the same command to evaluate"
    )
  return _finish(setup, state)


def _prepare(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir) -> _Setup:
  """The mesh's checks, the settings recorded, the data (`runs.prepare`) and the method
  compiled for them (lazily: each function compiles at its first call)."""
  t = config.train
  main = parallel.is_main_process()
  par = parallel.make_parallel(config.mesh)
  par.check_batch("config.train.batch_size", t.batch_size)
  if methods.REGISTRY[config.method].uses_meta_batch:
    par.check_batch("config.train.meta_batch_size", t.meta_batch_size)
  if main:
    wd.record_config(config)
    _announce_noise(config)
  enable_compilation_cache(config.data.data_dir)
  run = runs.prepare(config, wd, write_info=True)
  logging.info("data: %s", {k: v for k, v in run.splits.info.items() if k not in LONG_DATA_INFO})
  if (
    methods.REGISTRY[config.method].uses_meta_batch and run.splits.info["reference"] == "untrusted"
  ):
    # check_settings stops this from the folder's names; a split file can still hand the meta
    # set masks no one verified.
    raise ConfigError(
      f"config.method={config.method!r} learns from a clean meta set, and the meta split of "
      f"{config.data.manual_dir} holds masks no one verified: name verified masks with "
      "trusted/ or config.data.trusted_list"
    )
  if main:
    _announce_reference(run.splits.info)
  if run.data_settings:
    logging.info("settings from the data: %s", run.data_settings)
  if par.num_devices > 1:
    logging.info(
      "data parallel over %d devices (%d processes): %d images per device",
      par.num_devices,
      jax.process_count(),
      t.batch_size // par.num_devices,
    )
  compiled = compiled_for(run.config, run.steps_per_epoch, par)
  return _Setup(run=run, par=par, compiled=compiled, main=main)


# Entries of the data info too long for the log (data_info.json has them).
LONG_DATA_INFO = ("meta_indices", "case_files", "split")


def _announce_noise(config: ml_collections.ConfigDict) -> None:
  """The log's first word on the labels: whether noise is injected into them."""
  kind = config.data.noise.kind
  if kind not in ("none", "", None):
    logging.warning(
      "label noise: %s is injected into the training masks (config.data.noise.kind; the meta "
      "split, trusted masks, validation and test stay as given); none: train on the masks as "
      "they are",
      kind,
    )


def _announce_reference(info: Mapping[str, Any]) -> None:
  """What validation and test are scored against, in one line when it is not trustworthy."""
  split = info.get("split")
  if split:
    logging.info(
      "split: %s (%s), %d trusted masks (%s)",
      split["counts"],
      "made and written to " + split["split_file"]
      if split["split_generated"]
      else "read from " + split["split_file"],
      split["n_trusted"],
      split["trusted_source"] or "none",
    )
  agreement = info.get("given_vs_trusted")
  if agreement:
    logging.info(
      "your masks against their trusted versions (%d images): 1 - Dice %.3f ± %.3f",
      agreement["n"],
      agreement["one_minus_dice_mean"],
      agreement["one_minus_dice_std"],
    )
  if info.get("reference") == "untrusted":
    logging.warning(
      "validation and test are scored against masks no one verified: the scores measure "
      "agreement with them (name verified masks with trusted/ or config.data.trusted_list)"
    )


def _inputs(loop: _Setup) -> tuple[Any, Any]:
  """The training and meta batch iterators (the meta one None for a method without meta
  batches), each reading this process's rows of every global batch."""
  config, t = loop.config, loop.config.train
  shard = loop.par.input_shard(t.batch_size)
  train_it = iter(
    pipeline.train_dataset(
      loop.run.splits.train,
      batch_size=t.batch_size,
      seed=config.seed,
      augment=config.data.augment,
      transform=loop.method.example_transform,
      num_workers=config.data.num_workers,
      **shard,
    )
  )
  if not loop.method.uses_meta_batch:
    return train_it, None
  meta_it = iter(
    pipeline.train_dataset(
      loop.run.splits.meta,
      batch_size=t.meta_batch_size,
      seed=config.seed + 7,
      augment=config.data.augment,
      **shard,
    )
  )
  return train_it, meta_it


def _open(setup: _Setup, stack: contextlib.ExitStack) -> tuple[_Loop, _Start]:
  """The checkpoints, the inputs and the stop signals, each entered into `stack` as it opens
  (closed in the reverse order), and where this invocation starts: the initial state, or the
  newest checkpoint that restores (epoch or step: state, iterator states, the epoch's
  progress)."""
  t, par, wd = setup.config.train, setup.par, setup.run.workdir
  state = par.replicate(setup.method.init_state(jax.random.PRNGKey(setup.config.seed)))
  train_it, meta_it = _inputs(setup)
  ckpt = stack.enter_context(setup.run.checkpointer(writer=True))
  restored = ckpt.restore_resume_point(par.abstract(state), fallback_settings=wd.first_config())
  start = _Start(state, 0, None)
  if restored is not None:
    start = _Start(restored.state, restored.epoch, restored.partial)
    train_it.set_state(restored.data["train"])
    if meta_it is not None and "meta" in restored.data:
      meta_it.set_state(restored.data["meta"])
    logging.info("resumed from %s at %s", wd.checkpoints, restored.name)
  if setup.main:
    wd.metrics.truncate_after(
      start.epoch,
      diagnostics_before=start.partial["step"] if start.partial is not None else None,
    )
  progress_lines = Progress(
    total_steps=t.num_epochs * setup.run.steps_per_epoch,
    steps_per_epoch=setup.run.steps_per_epoch,
    batch_size=t.batch_size,
    every=t.log_every_steps,
    num_epochs=t.num_epochs,
  )
  feeder = stack.enter_context(_Feeder(train_it, meta_it, par))
  stop = stack.enter_context(preemption.StopSignals())
  schedule = preemption.Schedule(t.checkpoint_every_steps, t.checkpoint_every_minutes, stop)
  fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(_Setup)}
  loop = _Loop(
    **fields, ckpt=ckpt, feeder=feeder, stop=stop, schedule=schedule, progress=progress_lines
  )
  return loop, start


def _one_epoch(loop: _Loop, state, epoch: int, partial: dict[str, Any] | None):
  """The steps of epoch `epoch` (0-based; from `partial`'s offset when a step checkpoint inside
  it was restored), with the diagnostics, the progress lines and the step checkpoints between
  them. A non-finite loss in a progress line ends the epoch early (`_end_epoch` names its first
  step).

  Returns:
    (the state after its last step, the `_Epoch`).
  """
  t, par, steps = loop.config.train, loop.par, loop.run.steps_per_epoch
  phase = loop.method.phase(epoch)
  step_fn = loop.compiled.step(phase)
  first_step = int(par.fetch(state.step))
  begin, done_metrics = 0, None
  if partial is not None:  # resumed from a step checkpoint inside this epoch
    begin = partial["offset"]
    done_metrics = preemption.metrics_from_json(partial["metrics"])
    first_step -= begin
  ep = _Epoch(
    index=epoch,
    phase=phase,
    first_step=first_step,
    begin=begin,
    done_metrics=done_metrics,
    checkpoint=(epoch + 1) % t.checkpoint_every_epochs == 0 or epoch + 1 == t.num_epochs,
    started=time.perf_counter(),
  )
  for i in range(begin, steps):
    feed = loop.feeder.next()
    step = first_step + i  # global steps before this one
    if t.diagnostics_every_steps and step % t.diagnostics_every_steps == 0:
      _diagnostics(loop, state, feed, epoch, step)
    state, m = step_fn(state, feed, jax.random.fold_in(state.rng, step))
    ep.step_metrics.append(m)
    if loop.progress.due(step + 1):
      loss = float(par.fetch(m["loss"]))  # the only host sync inside an epoch
      loop.progress.update(step + 1, loss)
      if not np.isfinite(loss):
        break  # the scan at the end of the epoch names the first bad step
    save, stopping = loop.schedule.check(step + 1)
    # The epoch's own checkpoint follows its last step (unless stopping there).
    if save and (stopping or i + 1 < steps or not ep.checkpoint):
      _step_checkpoint(loop, state, ep, i + 1, stopping)
  return state, ep


def _diagnostics(loop: _Loop, state, feed, epoch: int, step: int) -> None:
  """Logs the diagnostics of the batch step `step + 1` is about to train on, computed by a
  separately compiled function: the step itself stays as lean as without diagnostics."""
  diag = loop.par.fetch(loop.compiled.diagnostics(state, feed))
  if diag:
    loop.log(
      {
        "epoch": epoch + 1,
        "step": step,
        "split": "diagnostics",
        **{k: float(v) for k, v in diag.items()},
      }
    )


def _step_checkpoint(loop: _Loop, state, ep: _Epoch, done: int, stopping: bool) -> None:
  """A step checkpoint after `done` steps of epoch `ep` (with the epoch's metrics so far, so
  that a resumed epoch logs the mean over all its steps).

  Raises:
    NonFiniteLossError: a loss so far is not finite (nothing is saved).
    Preempted: `stopping` (a stop signal came): after the checkpoint is on disk.
  """
  stacked = _epoch_metrics(loop.par, ep.done_metrics, ep.step_metrics)
  check_finite(stacked["loss"], ep.first_step, ep.index, loop.ckpt)
  step = ep.first_step + done
  partial = {
    "epoch": ep.index,
    "offset": done,
    "step": step,
    "metrics": preemption.metrics_to_json(stacked),
  }
  path = loop.ckpt.save_step(step, state, loop.feeder.data_state, partial, wait=stopping)
  loop.schedule.reset()
  if stopping:
    raise Preempted(
      f"stopped by {loop.stop.name} after step {step} (epoch {ep.index + 1}, "
      f"step {done}/{loop.run.steps_per_epoch}), checkpoint {path}: rerun the same command to "
      "resume"
    )


def _end_epoch(loop: _Loop, state, ep: _Epoch) -> None:
  """After an epoch's steps: the NaN policy (`check_finite`), its line in metrics.jsonl, the
  validation when due, the audit hook (`audit_hook`), then the epoch checkpoint."""
  t, epoch = loop.config.train, ep.index + 1
  stacked = _epoch_metrics(loop.par, ep.done_metrics, ep.step_metrics)
  check_finite(stacked["loss"], ep.first_step, ep.index, loop.ckpt)
  dt = time.perf_counter() - ep.started  # with the wait for the last step (the fetch above)
  step_now = ep.first_step + loop.run.steps_per_epoch  # a NaN break has raised above
  record = {
    "epoch": epoch,
    "step": step_now,
    "split": "train",
    "phase": ep.phase,
    "lr": loop.method.learning_rate(ep.first_step),
    "images_per_s": (loop.run.steps_per_epoch - ep.begin) * t.batch_size / max(dt, 1e-9),
    **{k: float(np.mean(v)) for k, v in stacked.items()},
  }
  logging.info(
    "epoch %d/%d  loss %.4f  %.1f img/s  (%s, %s)",
    epoch,
    t.num_epochs,
    record["loss"],
    record["images_per_s"],
    ep.phase,
    progress.duration(dt),
  )
  loop.log(record)
  if loop.main and (epoch % t.eval_every_epochs == 0 or epoch == t.num_epochs):
    _validate(loop, state, epoch, step_now)
  if loop.main:
    # Before the checkpoint: a run killed in between redoes this epoch and rewrites it.
    audit_hook(loop.compiled, loop.par.local(state), loop.run, epoch)
  if ep.checkpoint:
    loop.ckpt.save(epoch, state, loop.feeder.data_state)
    loop.schedule.reset()


def _validate(loop: _Loop, state, epoch: int, step: int) -> None:
  """Validation scores of the raw and EMA parameters into metrics.jsonl. Validation only: the
  test split is read once, after training. Process 0 evaluates a local copy of the
  (replicated) state: no other process waits on it."""
  state = loop.par.local(state)
  ev = _evaluate(loop.compiled, state, loop.run.splits.val, loop.run.splits, loop.config)
  for variant, summary in ev.items():
    loop.log({"epoch": epoch, "step": step, "split": "val", "params": variant, **summary})
  logging.info("epoch %d val dice raw %.4f ema %.4f", epoch, ev["raw"]["dice"], ev["ema"]["dice"])


def audit_hook(compiled: Compiled, state, run: runs.Run, epoch: int) -> pathlib.Path | None:
  """The trainer's audit pass after epoch `epoch` (1-based), when due (`audit.is_due`: a meta
  method in its last `config.audit.epochs` epochs), into `<workdir>/audit/epoch_<epoch>.npz`.

  Args:
    compiled: the run's method and its jitted `audit` function.
    state: the training state, on one device.
    run: the run (its workdir, settings and training and meta splits).
    epoch: the epoch just trained (1-based).

  Returns:
    The file written, or None when no pass is due.

  Raises:
    DiskFullError: the disk filled while writing it.
  """
  if not audit_passes.is_due(compiled.method, run.config, epoch):
    return None
  result = audit_passes.run_pass(compiled.method, state, run.splits, run.config, fns=compiled.audit)
  with files.full_disk_stops(run.workdir.path / audit_passes.AUDIT_DIR):
    return audit_passes.save_pass(run.workdir.path, epoch, result)


def _finish(setup: _Setup, state) -> dict[str, Any]:
  """After the last epoch, its inputs and checkpoints closed: on process 0 the final evaluation
  on val and test, results.json, cases.json and the figures."""
  run, config = setup.run, setup.config
  if not setup.main:
    return {"process_index": jax.process_index(), "workdir": str(run.workdir.path)}
  local_state = setup.par.local(state)
  scores, cases, chosen_state = _final_evaluation(setup.compiled, local_state, run.splits, config)
  info = run.splits.info
  results = {"epoch": int(local_state.step) // run.steps_per_epoch, **scores}
  model = _save_model(run, setup.method, chosen_state, scores)
  if original_size.available(info):
    scores_orig, cases_orig = _original_size_evaluation(model, run)
    results["test_original"], cases["test_original"] = scores_orig, cases_orig
  results.update(
    {
      "method": config.method,
      "dataset": info["dataset_key"],
      "noise": info["noise"],
      "noise_injected": info["noise"]["kind"] != "none",
      "reference": info["reference"],
      "reference_trusted": info["reference"] != "untrusted",
      "class_names": info["class_names"],
      "workdir": str(run.workdir.path),
      "model": str(run.workdir.path / model_lib.RUN_MODEL_DIR),
      "settings_from_data": run.data_settings,
    }
  )
  if "split" in info:
    results["split"] = info["split"]
  if "given_vs_trusted" in info:
    results["given_vs_trusted"] = info["given_vs_trusted"]
  files.write_atomic(run.workdir.path / CASES_FILE, json.dumps(cases))
  files.write_atomic(run.workdir.path / "results.json", json.dumps(results, indent=1))
  if run.workdir.summaries is not None:
    # The test split is scored once, here; TensorBoard gets it at the last step so that the
    # runs of a benchmark can be compared on one chart (not in metrics.jsonl: the training
    # curves there stay free of test data).
    for params in ("raw", "ema"):
      test = {
        k: v for k, v in scores["test"][params].items() if k in ("dice", "iou", "hd95", "per_class")
      }
      run.workdir.summaries.write_record(
        {"step": int(local_state.step), "split": "test", "params": params, **test}
      )
  _write_figures(setup.compiled, local_state, run.splits, config, run.workdir)
  return results


def _save_model(run: runs.Run, method, state, scores: Mapping[str, Any]) -> model_lib.Model:
  """`<workdir>/model/`: the weights results.json scored (the EMA weights with the BatchNorm
  statistics chosen), the settings and the preprocessing; returned opened."""
  pre = model_lib.preprocessing(run.config, run.splits.info)
  path = run.workdir.path / model_lib.RUN_MODEL_DIR
  with files.full_disk_stops(path):
    model_lib.save(
      path,
      config=run.config,
      state=state,
      pre=pre,
      ema_batch_stats=scores["ema_batch_stats"],
      scores={k: scores[k] for k in ("val", "test")},
      trained={
        "workdir": str(run.workdir.path),
        "dataset": run.splits.info["dataset_key"],
        "epoch": int(state.step) // run.steps_per_epoch,
      },
    )
  return model_lib.Model(
    model_lib.inference_config(run.config),
    method,
    state,
    pre,
    {"default_variant": "ema"},
    batch_size=run.config.train.eval_batch_size,
  )


def _original_size_evaluation(model: model_lib.Model, run: runs.Run):
  """The test split scored at each case's own size (`inference.original_size`): ({"raw",
  "ema": summary}, {"raw", "ema": case scores})."""
  summaries, per_case = {}, {}
  for variant in methods.base.VARIANTS:
    ids, cases = original_size.score_split(
      model, run.splits.test, run.splits.info, run.config.data, variant=variant
    )
    names = foreground_names(run.splits.info)
    summaries[variant] = metrics_lib.summarize(cases, class_names=names)
    per_case[variant] = evaluate.case_scores(ids, cases, class_names=names)
  return summaries, per_case


def summary(results: dict[str, Any]) -> str:
  """The lines a finished run prints: final test metrics and where its outputs are."""
  raw, ema = results["test"]["raw"], results["test"]["ema"]
  wd = pathlib.Path(results["workdir"])
  figs = sorted(p.name for p in wd.glob("*.png"))
  return (
    f"\nfinal test Dice: raw {raw['dice']:.4f}, EMA {ema['dice']:.4f} "
    f"(EMA IoU {ema['iou']:.4f}, HD95 {ema['hd95']:.2f})\n"
    f"results: {wd / 'results.json'}\nmetrics: {wd / 'metrics.jsonl'}\n"
    f"figures: {', '.join(figs) or '(none)'} in {wd}"
  )


def _evaluate(compiled: Compiled, state, records, splits: pipeline.DataSplits, config):
  """{"raw", "ema": summary} of a split, the EMA weights with `config.train.ema_batch_stats`
  (with "best_val", the EMA of the statistics: the choice is made once, after training)."""
  if config.train.ema_batch_stats == "recompute":
    state = recompute_ema_stats(compiled, state, splits, config)
  return evaluate.evaluate(
    compiled.predictor,
    state,
    records,
    batch_size=config.train.eval_batch_size,
    num_classes=config.data.num_classes,
    spacing=splits.info["spacing"] or None,
    class_names=foreground_names(splits.info),
  )


def foreground_names(info: Mapping[str, Any]) -> list[str] | None:
  """The names of classes 1..L-1 of a run's data info (None: the default names)."""
  names = info.get("class_names")
  return list(names[1:]) if names else None


# Per-case scores of the final evaluation, beside results.json.
CASES_FILE = "cases.json"
# The EMA weights' two kinds of BatchNorm statistics, and the choice between them per run on
# its validation Dice (`config.train.ema_batch_stats`, BUILD_NOTES.md, "The EMA weights'
# BatchNorm statistics").
EMA_BATCH_STATS = ("ema", "recompute")
BEST_ON_VAL = "best_val"


def chosen_ema_stats(val_ema_bn: Mapping[str, Mapping[str, Any]] | None, choice: str) -> str:
  """The statistics (one of `EMA_BATCH_STATS`) a run's "ema" scores use under `choice`.

  Args:
    val_ema_bn: the run's validation summaries {statistics: {"dice": mean Dice, ...}}, or
      None where the run did not score both (then "best_val" keeps "ema").
    choice: `config.train.ema_batch_stats`; "best_val" picks the statistics with the higher mean
      validation Dice (a tie, or no Dice, keeps "ema"). The test split never takes part.
  """
  if choice != BEST_ON_VAL:
    return choice
  if not val_ema_bn or any(bn not in val_ema_bn for bn in EMA_BATCH_STATS):
    return "ema"
  return "recompute" if val_ema_bn["recompute"]["dice"] > val_ema_bn["ema"]["dice"] else "ema"


def recompute_ema_stats(compiled: Compiled, state, splits: pipeline.DataSplits, config):
  """`state` with its EMA weights' BatchNorm statistics recomputed on the training images (in
  order, unaugmented, whole batches of eval_batch_size; a smaller split as one batch).

  Args:
    compiled: the run's method and its compiled functions.
    state: the training state, on one device.
    splits: the run's data splits (the training images are read).
    config: the run's settings (`config.train.eval_batch_size`).
  """
  size = min(config.train.eval_batch_size, len(splits.train))

  def batches():
    for batch in pipeline.eval_batches(splits.train, size):
      if len(batch["image"]) == size:
        yield jnp.asarray(batch["image"], jnp.float32)

  return compiled.method.recompute_ema_batch_stats(state, batches)


def _final_evaluation(compiled: Compiled, state, splits: pipeline.DataSplits, config):
  """The end-of-run scores on val and test: raw, EMA with the configured BatchNorm statistics
  (`chosen_ema_stats`, "best_val" deciding on the validation scores), and the EMA weights with
  each choice of statistics ("ema_bn"), so that the choice can be revisited without retraining.

  Returns:
    ({split: {"raw", "ema": summary, "ema_bn": {choice: summary}}, "ema_batch_stats": chosen},
     {split: {"raw", "ema": case scores, "ema_bn": {choice: case scores}}}, the state whose EMA
    weights carry the chosen statistics) for the results, `CASES_FILE` and the saved model.
  """
  states = {"ema": state, "recompute": recompute_ema_stats(compiled, state, splits, config)}
  scores, cases = {}, {}
  for name, records in (("val", splits.val), ("test", splits.test)):
    kw = dict(
      batch_size=config.train.eval_batch_size,
      num_classes=config.data.num_classes,
      spacing=splits.info["spacing"] or None,
    )
    evaluate_one = lambda s, variant: evaluate.evaluate_cases(
      compiled.predictor, s, records, variants=(variant,), **kw
    )[variant]
    per = {"raw": evaluate_one(state, "raw")}
    per.update({bn: evaluate_one(s, "ema") for bn, s in states.items()})
    names = foreground_names(splits.info)
    summaries = {k: metrics_lib.summarize(c, class_names=names) for k, (_, c) in per.items()}
    per_case = {k: evaluate.case_scores(ids, c, class_names=names) for k, (ids, c) in per.items()}
    scores[name] = {"raw": summaries["raw"], "ema_bn": {bn: summaries[bn] for bn in states}}
    cases[name] = {"raw": per_case["raw"], "ema_bn": {bn: per_case[bn] for bn in states}}
  chosen = chosen_ema_stats(scores["val"]["ema_bn"], config.train.ema_batch_stats)
  for out in (*scores.values(), *cases.values()):  # "ema" between "raw" and "ema_bn"
    out["ema"] = out["ema_bn"][chosen]
    out["ema_bn"] = out.pop("ema_bn")
  scores["ema_batch_stats"] = chosen
  return scores, cases, states[chosen]


def _write_figures(compiled: Compiled, state, splits, config, wd: workdir_lib.Workdir) -> None:
  """panel.png, curves.png and the method's figure; a failing figure never costs the results."""
  t = config.train
  method = compiled.method
  current = wd.path / "panel.png"  # the figure being written
  try:
    figures.write_panel(
      current,
      compiled.predictor,
      state,
      splits,
      n=t.num_panel_images,
      batch_size=t.eval_batch_size,
    )
    current = wd.path / "curves.png"
    figures.plot_curves(wd.metrics.path, current)
    if method.figure_name:
      current = wd.path / method.figure_name
      batch = next(
        pipeline.eval_batches(splits.train, t.batch_size, transform=method.example_transform)
      )
      feed = _feed(
        batch,
        next(pipeline.eval_batches(splits.meta, t.meta_batch_size))
        if method.uses_meta_batch
        else None,
      )
      maps = method.explain(state, jax.tree.map(jnp.asarray, feed))
      if maps:
        figures.write_maps_figure(wd.path / method.figure_name, batch, maps)
  except Exception as e:  # pylint: disable=broad-except
    if files.is_disk_full(e):  # a rerun redoes the figures: stop rather than leave half of one
      current.unlink(missing_ok=True)
      raise files.disk_full_error(current) from e
    logging.warning("could not write a figure: %s", e)
  # TensorBoard shows the figures beside the curves (a figure not written is skipped).
  wd.summaries.write_images(
    [wd.path / "panel.png", *([wd.path / method.figure_name] if method.figure_name else [])],
    step=int(state.step),
  )
