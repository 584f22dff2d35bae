"""Orbax checkpoints of a run that degrade gracefully.

Each checkpoint holds the training state, the data iterators' states and the settings it was
written with. Epoch checkpoints are in `<workdir>/checkpoints/<epoch>/`; step checkpoints (taken
inside an epoch: every `config.train.checkpoint_every_steps` steps or
`checkpoint_every_minutes`, and on a stop signal) in `<workdir>/checkpoints/steps/<global
step>/`, the newest one kept, with the finished steps' metrics of their epoch. The epoch
checkpoints are what they were before step checkpoints existed, so older run folders resume
as they are. On resume the newest of the two kinds is taken (an epoch checkpoint on a tie), and:

* a checkpoint that fails to restore (a truncated file, a missing `_METADATA`) is reported with
  the file orbax names, moved to `checkpoints/damaged/`, and the next older one is tried;
* a checkpoint whose arrays do not fit the current settings gets an error naming the settings
  that differ (from the settings saved with it), instead of orbax's traceback;
* when none restores, a clear error says so.

The state is stored packed: one flat array per dtype ("state") and, beside it, the name, shape
and dtype of every array in order ("layout"). Orbax's cost is per array (about 1 ms of CPU
each), and a training state has hundreds, so packing cuts a save of the 64 px U-Net++'s state
from 0.43-0.66 s of CPU to 0.04 s (BUILD_NOTES.md, "Throughput, and the trainer against its
step"). Checkpoints written before, one array per leaf without a layout, still restore.

A save that runs out of disk space raises `DiskFullError` (one line: the folder and the free
space) and leaves no half-written checkpoint behind (orbax's temporary folder is removed; one
left by a kill is removed when the next run opens the folder); the previous checkpoints stay.
"""

import collections
import dataclasses
import datetime
import json
import logging as std_logging
import math
import pathlib
import shutil
import sys
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from metadcseg_jax import files
from metadcseg_jax.errors import CheckpointError
from metadcseg_jax.errors import DiskFullError

DAMAGED = "damaged"
STEPS = "steps"
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class _QuietFullDisk(std_logging.Filter):
  """Drops the error lines (with tracebacks, hundreds of them) that orbax, tensorstore and
  asyncio log for a full disk: the save's caller reports it as one `DiskFullError`."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    if not (record.name == "asyncio" or "orbax" in record.pathname or "asyncio" in record.pathname):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (files.is_disk_full(error) or files.is_disk_full(Exception(record.getMessage())))


_QUIET = _QuietFullDisk()


def _quiet_full_disk_logs() -> None:
  for handler in {logging.get_absl_handler(), *std_logging.getLogger().handlers}:
    if _QUIET not in handler.filters:
      handler.addFilter(_QUIET)


def _drop_closed_loop_errors() -> None:
  """After a failed save, tensorstore's writes still in flight report to orbax's event loop,
  closed by then: each prints a 6-line 'Event loop is closed' traceback through
  sys.excepthook (hundreds of them). Those, and only those, are dropped from then on."""
  previous = sys.excepthook
  if getattr(previous, "drops_closed_loop_errors", False):
    return

  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    previous(kind, value, tb)

  hook.drops_closed_loop_errors = True
  sys.excepthook = hook


@dataclasses.dataclass
class ResumePoint:
  """Where a run resumes: the newest checkpoint that restores.

  Attributes:
    epoch: epochs finished.
    state: the training state.
    data: the data iterators' states ({"train", "meta"}).
    partial: for a step checkpoint, the progress into epoch `epoch + 1`: {"step": global step,
      "offset": steps done in the epoch, "metrics": {name: {"dtype", "values": per step}}};
      None for an epoch checkpoint.
    name: "epoch 2" or "step 7", for messages.
  """

  epoch: int
  state: Any
  data: dict[str, Any]
  partial: dict[str, Any] | None
  name: str


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"model": {"width": 4}} -> {"model.width": 4}."""
  out = {}
  for key, value in settings.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def differing_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'model.width: 4 (checkpoint) vs 8 (now)' for every setting that differs."""
  a, b = flatten(saved), flatten(current)
  return [
    f"{k}: {a.get(k, '(absent)')!r} in the checkpoint, {b.get(k, '(absent)')!r} now"
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k)
  ]


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple]:
  """{"params/conv0_0/...": shape}: the same names for a dataclass state and its stored dict."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(_key_name(k) for k in path): None
    if getattr(v, "shape", ()) is None
    else tuple(getattr(v, "shape", ()))
    for path, v in leaves
  }


def _layout(tree) -> list[list[Any]]:
  """[[name, shape, dtype], ...] of `tree`'s arrays in flattening order (names as `_shapes`)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [["/".join(_key_name(k) for k in path), list(v.shape), str(v.dtype)] for path, v in leaves]


@jax.jit
def _pack(state: Any) -> dict[str, jax.Array]:
  """{dtype name: (n,) all of `state`'s arrays of that dtype, raveled, in flattening order}."""
  groups = collections.defaultdict(list)
  for leaf in jax.tree.leaves(state):
    groups[str(leaf.dtype)].append(jnp.ravel(leaf))
  return {dtype: jnp.concatenate(parts) for dtype, parts in groups.items()}


def _packed_abstract(abstract_state: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The packed arrays' shapes and dtypes for `abstract_state` (the sharding of its first
  array of each dtype: the state is replicated)."""
  sizes, sharding = collections.Counter(), {}
  for leaf in jax.tree.leaves(abstract_state):
    sizes[str(leaf.dtype)] += math.prod(leaf.shape)
    sharding.setdefault(str(leaf.dtype), getattr(leaf, "sharding", None))
  return {d: jax.ShapeDtypeStruct((n,), d, sharding=sharding[d]) for d, n in sizes.items()}


def _unpack(packed: dict[str, jax.Array], abstract_state: Any) -> Any:
  """The state `_pack` packed, with `abstract_state`'s structure, shapes and shardings."""
  leaves, treedef = jax.tree.flatten(abstract_state)
  offset, out = collections.Counter(), []
  for leaf in leaves:
    dtype, size = str(leaf.dtype), math.prod(leaf.shape)
    value = packed[dtype][offset[dtype] : offset[dtype] + size].reshape(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    out.append(value if sharding is None else jax.device_put(value, sharding))
    offset[dtype] += size
  return jax.tree.unflatten(treedef, out)


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {(text[0] if text else '')[:400]}"


def _manager(directory: pathlib.Path, keep: int, cleanup: bool) -> ocp.CheckpointManager:
  # cleanup: a temporary folder left by a kill or a full disk would otherwise stay forever.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, cleanup_tmp_directories=cleanup
  )
  # Handlers named up front, so a fresh process can read an item's metadata before restoring.
  handlers = {
    "state": ocp.StandardCheckpointHandler(),
    "layout": ocp.JsonCheckpointHandler(),
    "data": ocp.JsonCheckpointHandler(),
    "config": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class Checkpointer:
  """Saves and restores `(state, data iterator states)` under `directory`: epoch checkpoints
  (the newest `keep`) and step checkpoints in `directory/steps` (the newest one).

  `steps_per_epoch` orders the two kinds on resume (`restore_resume_point`). `writer`: the
  run that owns the folder (it holds the workdir's lock) removes the temporary folders a kill
  or a full disk left; a reader (the audit, a check) must not, as a run may be saving.
  """

  def __init__(
    self,
    directory: pathlib.Path,
    *,
    keep: int,
    config: ml_collections.ConfigDict,
    steps_per_epoch: int | None = None,
    writer: bool = False,
  ):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(directory).resolve()  # orbax needs an absolute path
    self.settings = json.loads(config.to_json_best_effort())
    self.steps_per_epoch = steps_per_epoch
    self.writer = writer
    _quiet_full_disk_logs()
    with self._full_disk_stops():
      self.manager = _manager(self.directory, keep, writer)
    self._step_manager: ocp.CheckpointManager | None = None
    self._failed = False

  @property
  def steps_dir(self) -> pathlib.Path:
    return self.directory / STEPS

  def _steps(self, create: bool = False) -> ocp.CheckpointManager | None:
    """The step checkpoints' manager; made when first needed (no empty folder otherwise)."""
    if self._step_manager is None and (create or self.steps_dir.is_dir()):
      with self._full_disk_stops():
        self._step_manager = _manager(self.steps_dir, 1, self.writer)
    return self._step_manager

  def _managers(self) -> list[ocp.CheckpointManager]:
    return [m for m in (self.manager, self._step_manager) if m is not None]

  def _full_disk_stops(self):
    return _FullDiskStops(self)

  def _remove_tmp(self) -> None:
    """Removes orbax's temporary folders (a save that failed half-way): only process 0, the
    one orbax lets write the folder's layout."""
    if jax.process_index() != 0 or not self.writer:
      return
    for folder in (self.directory, self.steps_dir):
      for tmp in folder.glob(f"*{TMP_SUFFIX}*") if folder.is_dir() else ():
        shutil.rmtree(tmp, ignore_errors=True)

  def _args(self, state: Any, data_state: dict[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(
      state=ocp.args.StandardSave(_pack(state)),
      layout=ocp.args.JsonSave(_layout(state)),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(self.settings),
    )

  @staticmethod
  def _is_packed(manager: ocp.CheckpointManager, key: int) -> bool:
    return (pathlib.Path(manager.directory) / str(key) / "layout").is_dir()

  def _restore(
    self, manager: ocp.CheckpointManager, key: int, abstract_state: Any, *, data: bool
  ) -> dict[str, Any]:
    """{"state"[, "data"]} of checkpoint `key`, packed or (older) one array per leaf."""
    packed = self._is_packed(manager, key)
    items = {
      "state": ocp.args.StandardRestore(
        _packed_abstract(abstract_state) if packed else abstract_state
      )
    }
    if data:
      items["data"] = ocp.args.JsonRestore()
    restored = dict(manager.restore(key, args=ocp.args.Composite(**items)))
    if packed:
      restored["state"] = _unpack(restored["state"], abstract_state)
    return restored

  def save(self, epoch: int, state: Any, data_state: dict[str, Any]) -> None:
    """An epoch checkpoint (written in the background).

    Raises:
      DiskFullError: this save, or an earlier one still being written, ran out of space.
    """
    with self._full_disk_stops():
      self.manager.save(epoch, args=self._args(state, data_state))

  def save_step(
    self,
    step: int,
    state: Any,
    data_state: dict[str, Any],
    partial: dict[str, Any],
    *,
    wait: bool = False,
  ) -> pathlib.Path:
    """A step checkpoint at global step `step` inside an epoch; `partial` as in `ResumePoint`.
    The step checkpoint before it is deleted once this one is complete.

    Args:
      wait: return only once it is on disk (a stop).

    Returns:
      Its folder.

    Raises:
      DiskFullError: as `save`.
    """
    with self._full_disk_stops():
      manager = self._steps(create=True)
      manager.save(step, args=self._args(state, {**data_state, "partial": partial}))
      if wait:
        for m in self._managers():
          m.wait_until_finished()
    return self.steps_dir / str(step)

  def wait(self) -> None:
    """Blocks until every save is on disk. Raises: DiskFullError as `save`."""
    with self._full_disk_stops():
      for m in self._managers():
        m.wait_until_finished()

  def latest_epoch(self) -> int | None:
    return self.manager.latest_step()

  def latest_step_checkpoint(self) -> int | None:
    """The global step of the newest step checkpoint, if any."""
    m = self._steps()
    return None if m is None else m.latest_step()

  def epochs(self) -> list[int]:
    """The kept checkpoints' epochs, oldest first."""
    return sorted(self.manager.all_steps())

  def restore_state(
    self, epoch: int, abstract_state: Any, *, fallback_settings: dict[str, Any] | None = None
  ) -> Any:
    """The state saved at `epoch` (read only: nothing is moved or deleted).

    Raises:
      CheckpointError: it does not fit `abstract_state`'s settings.
    """
    self._check_fits(self.manager, epoch, abstract_state, fallback_settings)
    return self._restore(self.manager, epoch, abstract_state, data=False)["state"]

  def _saved_settings(
    self, manager: ocp.CheckpointManager, key: int, fallback: dict[str, Any] | None
  ) -> dict[str, Any] | None:
    try:
      return manager.restore(key, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # pylint: disable=broad-except  (older or damaged: use the workdir's)
      return fallback

  def _check_fits(
    self,
    manager: ocp.CheckpointManager,
    key: int,
    abstract_state: Any,
    fallback_settings: dict[str, Any] | None,
    name: str | None = None,
  ) -> None:
    """Raises CheckpointError when the stored arrays do not fit `abstract_state`."""
    name = name or f"epoch {key}"
    if self._is_packed(manager, key):
      layout = manager.restore(key, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))
      stored = {k: tuple(shape) for k, shape, _ in layout["layout"]}
    else:
      metadata = manager.item_metadata(key)["state"]
      stored = _shapes(getattr(metadata, "tree", metadata))
    wanted = _shapes(abstract_state)
    if stored == wanted or not stored or None in stored.values():
      return  # fits, or no usable metadata: the restore itself will tell
    changed = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    saved = self._saved_settings(manager, key, fallback_settings)
    diff = differing_settings(saved, self.settings) if saved is not None else []
    raise CheckpointError(
      f"the checkpoint of {name} in {self.directory} does not fit the current "
      f"settings ({len(changed)} arrays differ, e.g. {changed[0]}: "
      f"{stored.get(changed[0])} stored, {wanted.get(changed[0])} now). Settings that "
      f"differ: {'; '.join(diff) if diff else 'none recorded'}. Use the settings it was "
      f"trained with, or another --workdir"
    )

  def _move_aside(self, manager: ocp.CheckpointManager, key: int, prefix: str = "") -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = self.directory / DAMAGED / f"{prefix}{key}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(pathlib.Path(manager.directory) / str(key)), target)
    manager.reload()
    return target

  def restore_latest(
    self, abstract_state: Any, *, fallback_settings: dict[str, Any] | None = None
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest epoch checkpoint that restores, as `(epoch, state, data_state)`; None if none.

    Args:
      abstract_state: the state's shapes and dtypes (`jax.eval_shape` of the initial state).
      fallback_settings: the workdir's recorded settings, for checkpoints saved without theirs.

    Raises:
      CheckpointError: the newest checkpoint does not fit the settings, or checkpoints exist
        and none restores.
    """
    found = self._restore_newest(abstract_state, fallback_settings, with_steps=False)
    return None if found is None else (found.epoch, found.state, found.data)

  def restore_resume_point(
    self, abstract_state: Any, *, fallback_settings: dict[str, Any] | None = None
  ) -> ResumePoint | None:
    """The newest checkpoint that restores, epoch or step (needs `steps_per_epoch`); None if
    none. Arguments and errors as `restore_latest`."""
    if self.steps_per_epoch is None:
      raise ValueError("restore_resume_point needs the Checkpointer's steps_per_epoch")
    return self._restore_newest(abstract_state, fallback_settings, with_steps=True)

  def _restore_newest(
    self, abstract_state: Any, fallback_settings: dict[str, Any] | None, *, with_steps: bool
  ) -> ResumePoint | None:
    # (global step, prefer epochs on a tie, manager, key); newest first.
    candidates = [(e * (self.steps_per_epoch or 1), 1, self.manager, e) for e in self.epochs()]
    steps = self._steps() if with_steps else None
    if steps is not None:
      candidates += [(s, 0, steps, s) for s in steps.all_steps()]
    candidates.sort(key=lambda c: c[:2], reverse=True)
    failures = []
    for _, _, manager, key in candidates:
      is_step = manager is not self.manager
      name = f"step {key}" if is_step else f"epoch {key}"
      try:
        self._check_fits(manager, key, abstract_state, fallback_settings, name)
        restored = self._restore(manager, key, abstract_state, data=True)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        target = self._move_aside(manager, key, "step-" if is_step else "")
        failures.append(f"{name}: {_first_line(e)}")
        logging.warning(
          "the checkpoint of %s does not restore (%s); moved it to %s and trying the one before",
          name,
          _first_line(e),
          target,
        )
        continue
      if failures:
        logging.warning("resuming from the checkpoint of %s", name)
      data = dict(restored["data"])
      partial = data.pop("partial", None)
      epoch = int(partial["epoch"]) if partial is not None else key
      return ResumePoint(epoch, restored["state"], data, partial, name)
    if failures:
      raise CheckpointError(
        f"no checkpoint in {self.directory} restores ({'; '.join(failures)}); they were moved "
        f"to {self.directory / DAMAGED}. Run again to start over, or use another --workdir"
      )
    return None

  def _prune_steps(self) -> None:
    """Deletes the step checkpoints that the newest epoch checkpoint supersedes (and their
    folder once empty): called with every save on disk."""
    steps, last = self._step_manager, self.latest_epoch()
    if steps is None or last is None or self.steps_per_epoch is None:
      return
    for s in steps.all_steps():
      if s <= last * self.steps_per_epoch:
        steps.delete(s)
    if not steps.all_steps() and jax.process_index() == 0:
      steps.close()
      self._step_manager = None
      shutil.rmtree(self.steps_dir, ignore_errors=True)

  def abandon(self) -> None:
    """`close` when the run is failing anyway: a pending save is finished if it can be; its
    own error is logged, not raised (the run's error is the one to show)."""
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("the last checkpoint was not written: %s", _first_line(e))

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, kind, error, tb) -> None:
    """`close`, or `abandon` when the block raised (its error is the one to report)."""
    if error is None:
      self.close()
    else:
      self.abandon()

  def close(self) -> None:
    """Waits for the saves, deletes superseded step checkpoints, closes.

    Raises:
      DiskFullError: a save ran out of space (the checkpoints before it are intact).
    """
    try:
      if not self._failed:
        self.wait()
        self._prune_steps()
    finally:
      for m in self._managers():
        try:
          m.close()
        except Exception:  # pylint: disable=broad-except  (a failed save's error, reported)
          pass


class _FullDiskStops:
  """Inside a Checkpointer call: a full disk becomes `DiskFullError` naming the checkpoint
  folder and the free space, and orbax's temporary folder of the failed save is removed."""

  def __init__(self, ckpt: Checkpointer):
    self.ckpt = ckpt

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb) -> bool:
    if error is None or not isinstance(error, Exception) or not files.is_disk_full(error):
      return False
    self.ckpt._failed = True  # pylint: disable=protected-access
    _drop_closed_loop_errors()
    self.ckpt._remove_tmp()  # pylint: disable=protected-access
    if isinstance(error, DiskFullError):
      return False
    raise files.disk_full_error(self.ckpt.directory) from error
