"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

The update is a jitted pure function `(state, batch, rng) -> (state, metrics)` with the state
donated (big_vision style). Methods (config.method):
  ce, gce, sce   plain per-pixel losses on the noisy labels;
  l2b            SPEC §1 meta-weighted bootstrapping (no DCD, no Dice);
  metadcseg      SPEC §1-3: the meta step plus the Dynamic Center Distance boundary term and Dice.
Meta methods train on plain CE for `train.warmup_epochs` first (a second compiled step).

Outputs in `workdir`: checkpoints/ (orbax, every epoch: state + data iterator states),
metrics.jsonl (one line per evaluation and per epoch of training), results.json (final),
panel.png (test and training images with labels, noisy labels and predictions), data_info.json.
"""

import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from metadcseg_jax import losses
from metadcseg_jax import meta as meta_lib
from metadcseg_jax import metrics as metrics_lib
from metadcseg_jax import models
from metadcseg_jax import objective
from metadcseg_jax import optim
from metadcseg_jax import plots
from metadcseg_jax.data import pipeline

PLAIN_METHODS = ("ce", "gce", "sce")
META_METHODS = ("l2b", "metadcseg")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a checkpoint holds exactly this (plus data state)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  dcd_centers: jax.Array  # (3, D) fallback centers (Eq. 47), EMA of batch centers
  rng: jax.Array


class NonFiniteLossError(FloatingPointError):
  """Raised when a training loss is NaN or Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- set-up


def check_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for config values that would otherwise fail deep inside jit."""
  methods = PLAIN_METHODS + META_METHODS
  if config.method not in methods:
    raise ValueError(f"config.method={config.method!r}: unknown, choose one of {methods}")
  if config.meta.route not in ("jvp", "reverse"):
    raise ValueError(f"config.meta.route={config.meta.route!r}: choose 'jvp' or 'reverse'")
  if config.meta.normalizer not in ("image", "batch"):
    raise ValueError(f"config.meta.normalizer={config.meta.normalizer!r}: 'image' or 'batch'")
  if config.data.size % 16:
    raise ValueError(f"config.data.size={config.data.size}: must be divisible by 16 (4 "
                     f"poolings)")
  if config.train.warmup_epochs > config.train.num_epochs:
    raise ValueError("config.train.warmup_epochs exceeds config.train.num_epochs")


def build_model(config: ml_collections.ConfigDict):
  return models.build_model(config.model.name, num_classes=config.data.num_classes,
                            width=config.model.width,
                            deep_supervision=config.model.deep_supervision,
                            dtype=jnp.dtype(config.model.dtype))


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  t = config.train
  schedule = optim.lr_schedule(t.lr, steps_per_epoch)
  return optim.make_optimizer(name=t.optimizer, learning_rate=schedule, momentum=t.momentum,
                              weight_decay=t.weight_decay, grad_clip=t.grad_clip or None)


@functools.lru_cache(maxsize=8)
def _jitted_init(model):
  return jax.jit(functools.partial(model.init, train=False))


def init_state(config, model, optimizer, rng: jax.Array) -> TrainState:
  rng_init, rng_loop = jax.random.split(rng)
  x = jnp.zeros((1, config.data.size, config.data.size, config.data.channels), jnp.float32)
  # Partitionable threefry (jax's default) made XLA take ~40 s to compile the ~60 parameter
  # draws of a U-Net++ on a 2-core CPU; the classic threefry takes ~8 s and is just as
  # deterministic across machines.
  with jax.threefry_partitionable(False):
    variables = _jitted_init(model)(rng_init, x)
  params = variables["params"]
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=optimizer.tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      dcd_centers=objective.dcd.init_default_centers(config.model.width),
      rng=rng_loop,
  )
  # Committed like a restored checkpoint, so a resumed run hits the same jit cache entries.
  return jax.device_put(state, jax.devices()[0])


# ----------------------------------------------------------------------------- the step


def _plain_pixel_loss(config, logits, labels):
  if config.method == "gce":
    return losses.gce_map(logits, labels, q=config.loss.gce_q)
  if config.method == "sce":
    return losses.sce_map(logits, labels, alpha=config.loss.sce_alpha, beta=config.loss.sce_beta)
  return losses.ce_map(logits, labels)


def objective_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`objective.metadcseg_loss` options from the config (l2b: DCD and Dice off)."""
  dcd_cfg = config.dcd
  return dict(
      lambda_bd=dcd_cfg.lambda_bd, lambda_dice=dcd_cfg.lambda_dice, tau=dcd_cfg.tau,
      tau_dcd=dcd_cfg.tau_dcd, use_dcd=config.method == "metadcseg" and dcd_cfg.use,
      use_dice=config.method == "metadcseg" and dcd_cfg.use_dice,
      detach_weights=dcd_cfg.detach_weights, normalizer=config.meta.normalizer,
      center_momentum=dcd_cfg.center_momentum,
      edge_fn=functools.partial(objective.dcd.sobel_edges,
                                top_fraction=dcd_cfg.edge_top_fraction))


def make_train_step(config: ml_collections.ConfigDict, model, optimizer, *,
                    warmup: bool) -> Callable:
  """Returns the pure step `(state, batch, rng) -> (state, metrics)` (not yet jitted).

  Args:
    config: the full config.
    model: the flax module.
    optimizer: `optim.Optimizer` (tx with clipping, base without: the virtual step's update).
    warmup: plain mean CE on the noisy labels (meta methods' warm-up epochs, SPEC §1).

  Batch: "image" (B,H,W,C), "noisy_label" (B,H,W); meta methods also "meta_image" (Bv,H,W,C)
  and "meta_label" (Bv,H,W). Nothing in the body depends on the device layout, so sharding the
  batch over a mesh only changes the jit's shardings.
  """
  method = config.method
  use_meta_step = method in META_METHODS and not warmup and config.meta.use
  loss_kwargs = objective_kwargs(config)

  def step(state: TrainState, batch, rng):
    del rng  # no stochastic layers; kept so the signature is stable (dropout, sharding)
    x, y = batch["image"], batch["noisy_label"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    aux = {}
    if use_meta_step:
      def loss_from_outputs(logits, features, mo):
        return objective.metadcseg_loss(
            logits, features, x, y, a_hat=mo.a_hat, b_hat=mo.b_hat, gamma=mo.gamma,
            pi_a=mo.pi_a, pi_b=mo.pi_b, y_pseudo=mo.y_pseudo,
            default_centers=state.dcd_centers, **loss_kwargs)

      grads, new_bs, loss, mo, aux = meta_lib.meta_step_grads(
          model.apply, variables, state.opt_state, optimizer, x, y, batch["meta_image"],
          batch["meta_label"], loss_from_outputs, a0b0=(config.meta.a0, config.meta.b0),
          eta=config.meta.eta, normalizer=config.meta.normalizer, route=config.meta.route)
      meta_metrics = {
          "meta_loss": mo.meta_loss,
          "alpha_share": jnp.sum(mo.a_hat) / jnp.maximum(jnp.sum(mo.a_hat + mo.b_hat), 1e-12),
          "weight_zero_frac": jnp.mean(mo.gamma <= 0),
      }
    else:
      def loss_fn(params):
        (logits, features), new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"])
        if method == "metadcseg" and not warmup:
          # Ablation "meta off" (paper Table 5): plain-CE weights, DCD and Dice as configured.
          w = objective.meta_off_weights(y.shape, normalizer=config.meta.normalizer)
          loss, loss_aux = objective.metadcseg_loss(
              logits, features, x, y, y_pseudo=jnp.argmax(logits, -1), **w,
              default_centers=state.dcd_centers, **loss_kwargs)
        elif method in META_METHODS:  # warm-up, or l2b with meta off
          loss, loss_aux = losses.mean_ce(logits, y), {}
        else:
          loss, loss_aux = jnp.mean(_plain_pixel_loss(config, logits, y)), {}
        return loss, (new_vars["batch_stats"], loss_aux)

      (loss, (new_bs, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      meta_metrics = {}

    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if use_meta_step and config.meta.extra_clean_step:
      # L2B's code: one more real step on the clean meta batch (default off).
      def clean_loss(p):
        (logits, _), new_vars = model.apply({"params": p, "batch_stats": new_bs},
                                            batch["meta_image"], train=True,
                                            mutable=["batch_stats"])
        return losses.mean_ce(logits, batch["meta_label"]), new_vars["batch_stats"]
      (_, new_bs), g2 = jax.value_and_grad(clean_loss, has_aux=True)(params)
      upd2, opt_state = optimizer.tx.update(g2, opt_state, params)
      params = optax.apply_updates(params, upd2)
    ema = optax.incremental_update(params, state.ema_params, 1.0 - config.train.ema_decay)
    centers = aux.get("new_default_centers", state.dcd_centers)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state, ema_params=ema, dcd_centers=centers)
    measurements = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        **meta_metrics,
    }
    for k in ("ce_term", "bd_term", "dice_term"):
      if k in aux:
        measurements[k] = aux[k]
    return new_state, measurements

  return step


def make_eval_fn(model) -> Callable:
  """(params, batch_stats, x (B,H,W,C)) -> (pred (B,H,W) int32, fg_prob (B,H,W))."""

  def eval_fn(params, batch_stats, x):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return jnp.argmax(logits, -1).astype(jnp.int32), losses.foreground_prob(logits)

  return jax.jit(eval_fn)


# ----------------------------------------------------------------------------- evaluation


def predict(eval_fn, params, batch_stats, records: pipeline.Records, batch_size: int):
  """Predictions over a split in order: dict of numpy arrays image, label, noisy_label, pred
  (N,H,W) and prob (N,H,W). The last batch is padded to `batch_size`: one compiled shape."""
  out = {"image": [], "label": [], "noisy_label": [], "pred": [], "prob": []}
  for batch in pipeline.eval_batches(records, batch_size):
    n = len(batch["image"])
    x = np.zeros((batch_size,) + batch["image"].shape[1:], np.float32)
    x[:n] = batch["image"]
    pred, prob = eval_fn(params, batch_stats, jnp.asarray(x))
    for k in ("image", "label", "noisy_label"):
      out[k].append(batch[k])
    out["pred"].append(np.asarray(pred)[:n])
    out["prob"].append(np.asarray(prob)[:n])
  return {k: np.concatenate(v) for k, v in out.items()}


def evaluate(eval_fn, state: TrainState, records: pipeline.Records, *, batch_size: int,
             num_classes: int, spacing=None) -> dict[str, dict[str, float]]:
  """SPEC §7 metrics on a split for the raw and the EMA parameters.

  3D datasets (several slices per case id) are scored per volume, 2D ones per image, in
  pixels unless `spacing` ({case id: (slice, row, col) mm}) is given for the volumes.
  """
  case_ids = [records.case_id(i) for i in range(len(records))]
  per_volume = len(set(case_ids)) < len(case_ids)
  results = {}
  for name, params in (("raw", state.params), ("ema", state.ema_params)):
    out = predict(eval_fn, params, state.batch_stats, records, batch_size)
    if per_volume:
      slice_idx = [int(np.asarray(records.source[int(i)]["slice_index"]))
                   for i in records.indices]
      cases = list(metrics_lib.volume_metrics(
          out["pred"], out["label"], np.asarray(case_ids), slice_indices=np.asarray(slice_idx),
          num_classes=num_classes, spacing=spacing).values())
    else:
      cases = metrics_lib.batch_case_metrics(out["pred"], out["label"],
                                             num_classes=num_classes)
    results[name] = metrics_lib.summarize(cases)
  return results


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Checkpointer:
  """Orbax manager over (TrainState, data iterator states); paths made absolute."""
  manager: ocp.CheckpointManager

  @classmethod
  def create(cls, directory: pathlib.Path, keep: int) -> "_Checkpointer":
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return cls(ocp.CheckpointManager(directory.resolve(), options=options))

  def save(self, epoch: int, state: TrainState, data_state: dict) -> None:
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore_latest(self, abstract_state: TrainState):
    epoch = self.manager.latest_step()
    if epoch is None:
      return None
    restored = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return epoch, restored["state"], restored["data"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_log(path: pathlib.Path, epoch: int) -> None:
  """Drops log lines past the checkpoint we resume from (a killed run may have written them)."""
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines()
           if l.strip() and json.loads(l)["epoch"] <= epoch]
  path.write_text("".join(l + "\n" for l in lines))


def _first_bad_step(losses_: list[np.ndarray], first_step: int) -> int | None:
  arr = np.asarray(losses_)
  bad = np.flatnonzero(~np.isfinite(arr))
  return None if bad.size == 0 else first_step + int(bad[0])


@functools.lru_cache(maxsize=16)
def _compiled_steps(config_json: str, steps_per_epoch: int):
  """Jitted (warm-up step, main step, eval fn), cached per config so reruns don't recompile."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = build_model(config)
  optimizer = build_optimizer(config, steps_per_epoch)
  warm = jax.jit(make_train_step(config, model, optimizer, warmup=True), donate_argnums=(0,))
  main = jax.jit(make_train_step(config, model, optimizer, warmup=False), donate_argnums=(0,))
  return model, optimizer, warm, main, make_eval_fn(model)


def _step_cache_key(config: ml_collections.ConfigDict) -> str:
  # Only what the compiled step depends on (the data dir or epochs must not force a recompile).
  keep = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
          for k in ("method", "model", "meta", "dcd", "loss")}
  keep["train"] = {k: config.train[k] for k in ("optimizer", "lr", "momentum", "weight_decay",
                                                 "grad_clip", "ema_decay")}
  keep["data"] = {k: config.data[k] for k in ("size", "channels", "num_classes")}
  return json.dumps(keep, sort_keys=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.method` and evaluates it; resumes from `workdir`'s last checkpoint.

  Returns:
    The final results (also written to workdir/results.json).
  """
  check_config(config)
  workdir_path = pathlib.Path(workdir).expanduser().resolve()
  workdir_path.mkdir(parents=True, exist_ok=True)
  t = config.train
  splits = pipeline.prepare_data(config.data, meta_batch_size=t.meta_batch_size)
  pipeline.save_info(splits, workdir_path / "data_info.json")
  (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=1))
  steps_per_epoch = len(splits.train) // t.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(splits.train)} training examples, fewer than one batch of "
                     f"{t.batch_size}")
  logging.info("data: %s", {k: v for k, v in splits.info.items() if k != "meta_indices"})

  model, optimizer, warm_step, main_step, eval_fn = _compiled_steps(
      _step_cache_key(config), steps_per_epoch)
  schedule = optim.lr_schedule(t.lr, steps_per_epoch)
  state = init_state(config, model, optimizer, jax.random.PRNGKey(config.seed))
  train_ds = pipeline.train_dataset(splits.train, batch_size=t.batch_size, seed=config.seed,
                                    augment=config.data.augment)
  meta_ds = pipeline.train_dataset(splits.meta, batch_size=t.meta_batch_size,
                                   seed=config.seed + 7, augment=config.data.augment)
  train_it, meta_it = iter(train_ds), iter(meta_ds)
  needs_meta = config.method in META_METHODS

  ckpt = _Checkpointer.create(workdir_path / "checkpoints", t.keep_checkpoints)
  start_epoch = 0
  restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
  if restored is not None:
    start_epoch, state, data_state = restored
    train_it.set_state(data_state["train"])
    meta_it.set_state(data_state["meta"])
    logging.info("resumed from %s at epoch %d", workdir_path / "checkpoints", start_epoch)
  metrics_path = workdir_path / "metrics.jsonl"
  _truncate_log(metrics_path, start_epoch)
  results: dict[str, Any] = {}

  try:
    for epoch in range(start_epoch, t.num_epochs):
      step_fn = warm_step if (needs_meta and epoch < t.warmup_epochs) else main_step
      first_step = int(state.step)
      t0 = time.perf_counter()
      step_metrics = []
      bar = tqdm.tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.num_epochs}",
                      leave=False, disable=not sys.stderr.isatty(), unit="step")
      for i in range(steps_per_epoch):
        batch = next(train_it)
        feed = {"image": batch["image"], "noisy_label": batch["noisy_label"]}
        if needs_meta:
          mb = next(meta_it)
          feed["meta_image"], feed["meta_label"] = mb["image"], mb["label"]
        rng = jax.random.fold_in(state.rng, first_step + i)
        state, m = step_fn(state, feed, rng)
        step_metrics.append(m)
        bar.update()
        if t.log_every_steps and (i + 1) % t.log_every_steps == 0:
          loss = float(m["loss"])
          bar.set_postfix(loss=f"{loss:.4f}")
          logging.info("epoch %d step %d/%d loss %.4f", epoch + 1, i + 1, steps_per_epoch, loss)
          if not np.isfinite(loss):
            break  # stop now; the scan below names the first bad step
      bar.close()
      stacked = jax.device_get(jax.tree.map(lambda *xs: np.stack(xs), *step_metrics))
      bad = _first_bad_step(stacked["loss"], first_step)
      if bad is not None:
        last = ckpt.manager.latest_step()
        where = (f"the last good checkpoint (epoch {last}) is kept in "
                 f"{workdir_path / 'checkpoints'}" if last is not None else
                 "no checkpoint had been written yet")
        raise NonFiniteLossError(f"non-finite training loss at step {bad} (epoch {epoch + 1}); "
                                 f"stopped without saving: {where}")
      dt = time.perf_counter() - t0
      record = {"epoch": epoch + 1, "step": int(state.step), "split": "train",
                "lr": float(schedule(first_step)),
                "images_per_s": steps_per_epoch * t.batch_size / dt,
                **{k: float(np.mean(v)) for k, v in stacked.items()}}
      logging.info("epoch %d/%d  loss %.4f  lr %.4g  %.1f img/s%s", epoch + 1, t.num_epochs,
                   record["loss"], record["lr"], record["images_per_s"],
                   "  (warm-up)" if step_fn is warm_step and needs_meta else "")
      _append_jsonl(metrics_path, record)
      if (epoch + 1) % t.eval_every_epochs == 0 or epoch + 1 == t.num_epochs:
        ev = evaluate(eval_fn, state, splits.test, batch_size=t.eval_batch_size,
                      num_classes=config.data.num_classes, spacing=splits.info["spacing"] or None)
        for name, summary in ev.items():
          _append_jsonl(metrics_path, {"epoch": epoch + 1, "step": int(state.step),
                                       "split": "test", "params": name, **summary})
        logging.info("epoch %d test dice raw %.4f ema %.4f", epoch + 1, ev["raw"]["dice"],
                     ev["ema"]["dice"])
        results = {"epoch": epoch + 1, "test": ev}
      if (epoch + 1) % t.checkpoint_every_epochs == 0 or epoch + 1 == t.num_epochs:
        ckpt.save(epoch + 1, state, {"train": train_it.get_state(), "meta": meta_it.get_state()})
  finally:
    ckpt.close()

  if not results:  # resumed after the last epoch: evaluate the restored state
    ev = evaluate(eval_fn, state, splits.test, batch_size=t.eval_batch_size,
                  num_classes=config.data.num_classes, spacing=splits.info["spacing"] or None)
    results = {"epoch": t.num_epochs, "test": ev}
  results.update({"method": config.method, "dataset": splits.info["dataset_key"],
                  "noise": splits.info["noise"], "workdir": str(workdir_path)})
  (workdir_path / "results.json").write_text(json.dumps(results, indent=1))
  try:
    from metadcseg_jax import viz  # pylint: disable=g-import-not-at-top
    viz.write_panel(workdir_path / "panel.png", eval_fn, state, splits,
                    n=t.num_panel_images, batch_size=t.eval_batch_size)
    plots.plot_curves(metrics_path, workdir_path / "curves.png")
    if config.method == "metadcseg":
      _write_dcd_figure(workdir_path / "dcd.png", model, optimizer, state, splits, config)
  except Exception as e:  # a figure must never cost the results
    logging.warning("could not write a figure: %s", e)
  return results


def _write_dcd_figure(path, model, optimizer, state, splits, config) -> None:
  """γ and DCD weights of the first training batch at the final state (paper Fig. 3)."""
  from metadcseg_jax import viz  # pylint: disable=g-import-not-at-top
  n, nv = config.train.batch_size, config.train.meta_batch_size
  batch = next(pipeline.eval_batches(splits.train, n))
  meta_batch = next(pipeline.eval_batches(splits.meta, nv))
  maps = viz.dcd_maps(model, optimizer, state, config.meta, objective_kwargs(config),
                      jnp.asarray(batch["image"]),
                      jnp.asarray(batch["noisy_label"]), jnp.asarray(meta_batch["image"]),
                      jnp.asarray(meta_batch["label"]))
  viz.write_dcd_figure(path, batch["image"], batch["noisy_label"], batch["label"], maps)
