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
with the checkpoints before it intact (`metadcseg_jax.preemption`). A run resumed inside an
epoch logs that epoch's line as if it had not stopped: its metrics are the mean over all the
epoch's steps (those before the stop come with the checkpoint); only images_per_s and the
duration count the steps of the last invocation alone.
"""

import collections
import concurrent.futures
import functools
import json
import pathlib
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metadcseg_jax import audit as audit_lib
from metadcseg_jax import check_settings
from metadcseg_jax import checkpoint
from metadcseg_jax import evaluate
from metadcseg_jax import figures
from metadcseg_jax import files
from metadcseg_jax import methods
from metadcseg_jax import metrics as metrics_lib
from metadcseg_jax import parallel
from metadcseg_jax import preemption
from metadcseg_jax import workdir as workdir_lib
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import NonFiniteLossError
from metadcseg_jax.errors import Preempted
from metadcseg_jax.errors import RunStopped

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
  def audit(self) -> Callable:
    # One process, a local copy of the state; a few calls per run: compiled for compile speed.
    return jax.jit(self.method.audit_maps, compiler_options=methods.base.RUN_ONCE_COMPILE)

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


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


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
      _duration((self.total - step) / max(rate, 1e-9)),
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


def _raise_if_not_finite(stacked, first_step: int, epoch: int, ckpt, wd) -> None:
  bad = _first_bad_step(stacked["loss"], first_step)
  if bad is None:
    return
  last, last_step = ckpt.latest_epoch(), ckpt.latest_step_checkpoint()
  where = (
    f"the last good checkpoint (epoch {last}) is kept in {wd.checkpoints}"
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
    self._pool.shutdown(wait=True, cancel_futures=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.method` and evaluates it; resumes from `workdir`'s last checkpoint.

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
  parallel.initialize_distributed(config.get("distributed"))
  wd = workdir_lib.Workdir(workdir)
  try:
    if not parallel.is_main_process():
      return _train(config, wd)
    with wd.locked():
      return _train(config, wd)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless a full disk)
    if isinstance(e, RunStopped) or not files.is_disk_full(e):
      raise
    raise files.disk_full_error(getattr(e, "filename", None) or wd.path) from e


def _train(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir) -> dict[str, Any]:
  t = config.train
  main = parallel.is_main_process()
  par = parallel.make_parallel(config.get("mesh"))
  par.check_batch("config.train.batch_size", t.batch_size)
  method_cls = methods.REGISTRY[config.method]
  if method_cls.uses_meta_batch:
    par.check_batch("config.train.meta_batch_size", t.meta_batch_size)
  log = wd.metrics.append if main else (lambda record: None)
  if main:
    wd.record_config(config)
  enable_compilation_cache(config.data.data_dir)
  # Process 0 builds the dataset and the noisy labels; the others then read its caches.
  if not main:
    parallel.sync("data: built by process 0")
  splits = pipeline.prepare_data(config.data, meta_batch_size=t.meta_batch_size)
  if main:
    pipeline.save_info(splits, wd.path / "data_info.json")
    parallel.sync("data: built by process 0")
  steps_per_epoch = len(splits.train) // t.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
      f"config.train.batch_size={t.batch_size} exceeds the {len(splits.train)} training examples"
    )
  logging.info("data: %s", {k: v for k, v in splits.info.items() if k != "meta_indices"})
  config, data_settings = methods.with_data_settings(config, splits.info)
  if data_settings:
    logging.info("settings from the data: %s", data_settings)
  if par.num_devices > 1:
    logging.info(
      "data parallel over %d devices (%d processes): %d images per device",
      par.num_devices,
      jax.process_count(),
      t.batch_size // par.num_devices,
    )

  compiled = compiled_for(config, steps_per_epoch, par)
  method = compiled.method
  state = par.replicate(method.init_state(jax.random.PRNGKey(config.seed)))
  shard = par.input_shard(t.batch_size)
  workers = config.data.get("num_workers", 0)
  train_it = iter(
    pipeline.train_dataset(
      splits.train,
      batch_size=t.batch_size,
      seed=config.seed,
      augment=config.data.augment,
      transform=method.example_transform,
      num_workers=workers,
      **shard,
    )
  )
  meta_it = (
    iter(
      pipeline.train_dataset(
        splits.meta,
        batch_size=t.meta_batch_size,
        seed=config.seed + 7,
        augment=config.data.augment,
        **shard,
      )
    )
    if method.uses_meta_batch
    else None
  )

  ckpt = checkpoint.Checkpointer(
    wd.checkpoints,
    keep=t.keep_checkpoints,
    config=config,
    steps_per_epoch=steps_per_epoch,
    writer=True,
  )
  start_epoch, partial = 0, None
  restored = ckpt.restore_resume_point(par.abstract(state), fallback_settings=wd.first_config())
  if restored is not None:
    start_epoch, state, data_state = restored.epoch, restored.state, restored.data
    partial = restored.partial
    train_it.set_state(data_state["train"])
    if meta_it is not None and "meta" in data_state:
      meta_it.set_state(data_state["meta"])
    logging.info("resumed from %s at %s", wd.checkpoints, restored.name)
  if main:
    wd.metrics.truncate_after(
      start_epoch, diagnostics_before=partial["step"] if partial is not None else None
    )
  progress = Progress(
    total_steps=t.num_epochs * steps_per_epoch,
    steps_per_epoch=steps_per_epoch,
    batch_size=t.batch_size,
    every=t.log_every_steps,
    num_epochs=t.num_epochs,
  )
  feeder = _Feeder(train_it, meta_it, par)
  audit_settings = config.get("audit", {})  # absent from configs older than the audit
  stop = preemption.StopSignals()
  schedule = preemption.Schedule(
    t.get("checkpoint_every_steps", 0), t.get("checkpoint_every_minutes", 0.0), stop
  )
  try:
    stop.__enter__()
    for epoch in range(start_epoch, t.num_epochs):
      phase = method.phase(epoch)
      step_fn = compiled.step(phase)
      first_step = int(par.fetch(state.step))
      begin, done_metrics = 0, None
      if partial is not None:  # resumed from a step checkpoint inside this epoch
        begin, done_metrics = partial["offset"], preemption.metrics_from_json(partial["metrics"])
        first_step -= begin
        partial = None
      epoch_checkpoint = (epoch + 1) % t.checkpoint_every_epochs == 0 or epoch + 1 == t.num_epochs
      t0 = time.perf_counter()
      step_metrics = []
      for i in range(begin, steps_per_epoch):
        feed = feeder.next()
        if t.diagnostics_every_steps and (first_step + i) % t.diagnostics_every_steps == 0:
          # On the batch the step is about to train on, by a separately compiled function: the
          # step itself stays as lean as without diagnostics.
          diag = par.fetch(compiled.diagnostics(state, feed))
          if diag:
            log(
              {
                "epoch": epoch + 1,
                "step": first_step + i,
                "split": "diagnostics",
                **{k: float(v) for k, v in diag.items()},
              }
            )
        state, m = step_fn(state, feed, jax.random.fold_in(state.rng, first_step + i))
        step_metrics.append(m)
        if progress.due(first_step + i + 1):
          loss = float(par.fetch(m["loss"]))  # the only host sync inside an epoch
          progress.update(first_step + i + 1, loss)
          if not np.isfinite(loss):
            break  # the scan below names the first bad step
        save, stopping = schedule.check(first_step + i + 1)
        # The epoch's own checkpoint follows its last step (unless stopping there).
        if save and (stopping or i + 1 < steps_per_epoch or not epoch_checkpoint):
          stacked = _epoch_metrics(par, done_metrics, step_metrics)
          _raise_if_not_finite(stacked, first_step, epoch, ckpt, wd)
          partial = {
            "epoch": epoch,
            "offset": i + 1,
            "step": first_step + i + 1,
            "metrics": preemption.metrics_to_json(stacked),
          }
          path = ckpt.save_step(
            first_step + i + 1, state, feeder.data_state, partial, wait=stopping
          )
          partial = None
          schedule.reset()
          if stopping:
            raise Preempted(
              f"stopped by {stop.name} after step {first_step + i + 1} (epoch {epoch + 1}, "
              f"step {i + 1}/{steps_per_epoch}), checkpoint {path}: rerun the same command to "
              "resume"
            )
      stacked = _epoch_metrics(par, done_metrics, step_metrics)
      _raise_if_not_finite(stacked, first_step, epoch, ckpt, wd)
      dt = time.perf_counter() - t0
      step_now = first_step + steps_per_epoch  # a NaN break has raised above
      record = {
        "epoch": epoch + 1,
        "step": step_now,
        "split": "train",
        "phase": phase,
        "lr": method.learning_rate(first_step),
        "images_per_s": (steps_per_epoch - begin) * t.batch_size / max(dt, 1e-9),
        **{k: float(np.mean(v)) for k, v in stacked.items()},
      }
      logging.info(
        "epoch %d/%d  loss %.4f  %.1f img/s  (%s, %s)",
        epoch + 1,
        t.num_epochs,
        record["loss"],
        record["images_per_s"],
        phase,
        _duration(dt),
      )
      log(record)
      if main and ((epoch + 1) % t.eval_every_epochs == 0 or epoch + 1 == t.num_epochs):
        # Validation only: the test split is read once, after training. Process 0 evaluates a
        # local copy of the (replicated) state: no other process waits on it.
        ev = _evaluate(compiled, par.local(state), splits.val, splits, config)
        for variant, summary in ev.items():
          log({"epoch": epoch + 1, "step": step_now, "split": "val", "params": variant, **summary})
        logging.info(
          "epoch %d val dice raw %.4f ema %.4f", epoch + 1, ev["raw"]["dice"], ev["ema"]["dice"]
        )
      if main and method.audits and epoch + 1 > t.num_epochs - audit_settings.get("epochs", 0):
        # Before the checkpoint: a run killed in between redoes this epoch and rewrites it.
        result = audit_lib.audit_pass(
          method,
          par.local(state),
          splits.train,
          splits.meta,
          batch_size=t.batch_size,
          meta_batch_size=t.meta_batch_size,
          meta_images=audit_settings.get("meta_images", 0),
          audit_fn=compiled.audit,
        )
        with files.full_disk_stops(wd.path / audit_lib.AUDIT_DIR):
          audit_lib.save_pass(wd.path, epoch + 1, result)
      if epoch_checkpoint:
        ckpt.save(epoch + 1, state, feeder.data_state)
        schedule.reset()
  except BaseException:
    stop.__exit__()
    feeder.close()
    ckpt.abandon()  # the run's error is the one to report
    raise
  stop.__exit__()
  feeder.close()
  ckpt.close()
  if parallel.any_process([stop.received is not None])[0]:
    # Came after the last step (during its evaluation or checkpoint): training is saved.
    raise Preempted(
      f"stopped by {stop.name} after the last training step, before the final evaluation: "
      "rerun the same command to evaluate"
    )

  if not main:
    return {"process_index": jax.process_index(), "workdir": str(wd.path)}
  local_state = par.local(state)
  scores, cases = _final_evaluation(compiled, local_state, splits, config)
  results = {"epoch": int(local_state.step) // steps_per_epoch, **scores}
  results.update(
    {
      "method": config.method,
      "dataset": splits.info["dataset_key"],
      "noise": splits.info["noise"],
      "workdir": str(wd.path),
      "settings_from_data": data_settings,
    }
  )
  files.write_atomic(wd.path / CASES_FILE, json.dumps(cases))
  files.write_atomic(wd.path / "results.json", json.dumps(results, indent=1))
  _write_figures(compiled, local_state, splits, config, wd)
  return results


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
  """{"raw", "ema": summary} of a split, the EMA weights with `config.train.ema_batch_stats`."""
  if ema_batch_stats(config) == "recompute":
    state = _recompute_ema_stats(compiled, state, splits, config)
  return evaluate.evaluate(
    compiled.predictor,
    state,
    records,
    batch_size=config.train.eval_batch_size,
    num_classes=config.data.num_classes,
    spacing=splits.info["spacing"] or None,
  )


# Per-case scores of the final evaluation, beside results.json.
CASES_FILE = "cases.json"
EMA_BATCH_STATS = ("ema", "recompute")


def ema_batch_stats(config: ml_collections.ConfigDict) -> str:
  """Which BatchNorm statistics the EMA weights are evaluated with (configs older than the
  option: the EMA of the running statistics, as they were trained)."""
  return config.train.get("ema_batch_stats", "ema")


def _recompute_ema_stats(compiled: Compiled, state, splits: pipeline.DataSplits, config):
  """`state` with its EMA weights' BatchNorm statistics recomputed on the training images (in
  order, unaugmented, whole batches of eval_batch_size; a smaller split as one batch)."""
  size = min(config.train.eval_batch_size, len(splits.train))

  def batches():
    for batch in pipeline.eval_batches(splits.train, size):
      if len(batch["image"]) == size:
        yield jnp.asarray(batch["image"], jnp.float32)

  return compiled.method.recompute_ema_batch_stats(state, batches)


def _final_evaluation(compiled: Compiled, state, splits: pipeline.DataSplits, config):
  """The end-of-run scores on val and test: raw, EMA with the configured BatchNorm statistics,
  and the EMA weights with each choice of statistics ("ema_bn"), so that the choice can be
  made on validation without retraining.

  Returns:
    ({split: {"raw", "ema": summary, "ema_bn": {choice: summary}}},
     {split: {"raw", "ema": case scores, "ema_bn": {choice: case scores}}}) for the results
    and `CASES_FILE`.
  """
  states = {"ema": state, "recompute": _recompute_ema_stats(compiled, state, splits, config)}
  chosen = ema_batch_stats(config)
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
    summaries = {k: metrics_lib.summarize(c) for k, (_, c) in per.items()}
    per_case = {k: evaluate.case_scores(ids, c) for k, (ids, c) in per.items()}
    scores[name] = {
      "raw": summaries["raw"],
      "ema": summaries[chosen],
      "ema_bn": {bn: summaries[bn] for bn in EMA_BATCH_STATS},
    }
    cases[name] = {
      "raw": per_case["raw"],
      "ema": per_case[chosen],
      "ema_bn": {bn: per_case[bn] for bn in EMA_BATCH_STATS},
    }
  return scores, cases


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
