"""Orbax checkpoints of a run that degrade gracefully.

Each checkpoint (one per saved epoch, in `<workdir>/checkpoints/<epoch>/`) holds the training
state, the data iterators' states and the settings it was written with. On resume:

* a checkpoint that fails to restore (a truncated file, a missing `_METADATA`) is reported with
  the file orbax names, moved to `checkpoints/damaged/`, and the next older one is tried;
* a checkpoint whose arrays do not fit the current settings gets an error naming the settings
  that differ (from the settings saved with it), instead of orbax's traceback;
* when none restores, a clear error says so.
"""

import datetime
import json
import pathlib
import shutil
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from metadcseg_jax.errors import CheckpointError

DAMAGED = "damaged"


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


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {(text[0] if text else '')[:400]}"


class Checkpointer:
  """Saves and restores `(state, data iterator states)` under `directory`."""

  def __init__(self, directory: pathlib.Path, *, keep: int, config: ml_collections.ConfigDict):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(directory).resolve()  # orbax needs an absolute path
    self.settings = json.loads(config.to_json_best_effort())
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    # Handlers named up front, so a fresh process can read an item's metadata before restoring.
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, epoch: int, state: Any, data_state: dict[str, Any]) -> None:
    self.manager.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(self.settings),
      ),
    )

  def latest_epoch(self) -> int | None:
    return self.manager.latest_step()

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
    self._check_fits(epoch, abstract_state, fallback_settings)
    return self.manager.restore(
      epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )["state"]

  def _saved_settings(self, epoch: int, fallback: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
      return self.manager.restore(epoch, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"
      ]
    except Exception:  # pylint: disable=broad-except  (older or damaged: use the workdir's)
      return fallback

  def _check_fits(
    self, epoch: int, abstract_state: Any, fallback_settings: dict[str, Any] | None
  ) -> None:
    """Raises CheckpointError when the stored arrays do not fit `abstract_state`."""
    metadata = self.manager.item_metadata(epoch)["state"]
    stored = _shapes(getattr(metadata, "tree", metadata))
    wanted = _shapes(abstract_state)
    if stored == wanted or not stored or None in stored.values():
      return  # fits, or no usable metadata: the restore itself will tell
    changed = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    saved = self._saved_settings(epoch, fallback_settings)
    diff = differing_settings(saved, self.settings) if saved is not None else []
    raise CheckpointError(
      f"the checkpoint of epoch {epoch} in {self.directory} does not fit the current "
      f"settings ({len(changed)} arrays differ, e.g. {changed[0]}: "
      f"{stored.get(changed[0])} stored, {wanted.get(changed[0])} now). Settings that "
      f"differ: {'; '.join(diff) if diff else 'none recorded'}. Use the settings it was "
      f"trained with, or another --workdir"
    )

  def _move_aside(self, epoch: int) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = self.directory / DAMAGED / f"{epoch}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.directory / str(epoch)), target)
    self.manager.reload()
    return target

  def restore_latest(
    self, abstract_state: Any, *, fallback_settings: dict[str, Any] | None = None
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that restores, as `(epoch, state, data_state)`; None if none.

    Args:
      abstract_state: the state's shapes and dtypes (`jax.eval_shape` of the initial state).
      fallback_settings: the workdir's recorded settings, for checkpoints saved without theirs.

    Raises:
      CheckpointError: the newest checkpoint does not fit the settings, or checkpoints exist
        and none restores.
    """
    epochs = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for epoch in epochs:
      try:
        self._check_fits(epoch, abstract_state, fallback_settings)
        restored = self.manager.restore(
          epoch,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        target = self._move_aside(epoch)
        failures.append(f"epoch {epoch}: {_first_line(e)}")
        logging.warning(
          "the checkpoint of epoch %d does not restore (%s); moved it to %s and "
          "trying the one before",
          epoch,
          _first_line(e),
          target,
        )
        continue
      if failures:
        logging.warning("resuming from the checkpoint of epoch %d", epoch)
      return epoch, restored["state"], restored["data"]
    if failures:
      raise CheckpointError(
        f"no checkpoint in {self.directory} restores ({'; '.join(failures)}); they were moved "
        f"to {self.directory / DAMAGED}. Run again to start over, or use another --workdir"
      )
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
