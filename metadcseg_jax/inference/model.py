"""A trained model as a folder that travels: settings, weights, preprocessing, class names.

    model = metadcseg_jax.load_model("runs/mine")        # a run folder, or an exported model
    mask = model.predict("scan.nii.gz")                  # the file's own geometry
    mask = model.predict(image)                          # (H,W[,C]) array: (H,W) class indices

A model folder holds `model.json` (the settings the network was trained with, the
preprocessing, the class names, which weights each variant uses and the scores the run
reported) and `weights.msgpack` (flax's msgpack of the training state without its optimizer
state: the raw and EMA parameters with their BatchNorm statistics). The EMA weights carry the
BatchNorm statistics the run's results.json scored them with (`config.train.ema_batch_stats`,
recomputed ones included), so predictions reproduce its "ema" scores exactly. Opening one
needs neither the training data nor the run folder nor a config file.

Prediction runs jitted, in fixed-size batches split over every local device; images and slices
go through the run's own preprocessing (`metadcseg_jax.data.preprocess`) and the class
probabilities come back to the input's size before the argmax.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping

import flax.serialization
import jax
import ml_collections
import numpy as np

from metadcseg_jax import files
from metadcseg_jax import methods
from metadcseg_jax.data import preprocess
from metadcseg_jax.errors import CheckpointError
from metadcseg_jax.errors import UserError
from metadcseg_jax.inference import io

FORMAT = "metadcseg-model"
VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.msgpack"
# The model a training run leaves in its folder: what results.json scored.
RUN_MODEL_DIR = "model"
VARIANTS = ("raw", "ema")
# State entries prediction never reads (the optimizer's momentum doubles the file).
_NOT_SAVED = ("opt_state",)


def inference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` without what only training reads from other files: the edge detector of the DCD
  term (PiDiNet's weights file) becomes Canny, so a model opens where that file is absent."""
  config = config.copy_and_resolve_references()
  if config.dcd.edges in ("pidinet", "auto"):
    config.dcd.edges = "canny"
    config.dcd.pidinet_weights = ""
  return config


def preprocessing(
  config: ml_collections.ConfigDict, info: Mapping[str, Any]
) -> preprocess.Preprocessing:
  """A run's preprocessing (`metadcseg_jax.data.preprocess`) from its config and data info (the
  class names, and a volume dataset's modalities and per-channel files)."""
  return preprocess.for_data(
    config.data, info["class_names"], info.get("modalities"), info.get("channel_files", False)
  )


def save(
  path: str | os.PathLike,
  *,
  config: ml_collections.ConfigDict,
  state: Any,
  pre: preprocess.Preprocessing,
  ema_batch_stats: str,
  scores: Mapping[str, Any] | None = None,
  trained: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes a model folder at `path` (created; files replaced atomically).

  Args:
    path: the folder.
    config: the run's settings (with those taken from the data).
    state: the method's training state on the host, its EMA BatchNorm statistics those
      results.json scored the EMA weights with.
    pre: the run's preprocessing.
    ema_batch_stats: which statistics the EMA weights carry ("ema" or "recompute").
    scores: what the run reported (results.json's val and test summaries), for the record.
    trained: where and on what it was trained (workdir, dataset, epoch).

  Returns:
    The folder.
  """
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  state_dict = flax.serialization.to_state_dict(jax.device_get(state))
  kept = {k: v for k, v in state_dict.items() if k not in _NOT_SAVED}
  weights = flax.serialization.msgpack_serialize(kept)
  files.write_atomic(path / WEIGHTS_FILE, weights)
  meta = {
    "format": FORMAT,
    "version": VERSION,
    # model.json is written after the weights: a save cut between the two leaves a digest that
    # does not match, and opening says so instead of pairing old settings with new weights.
    "weights_sha256": hashlib.sha256(weights).hexdigest(),
    "method": config.method,
    "preprocessing": pre.to_json(),
    "class_names": list(pre.class_names),
    "default_variant": "ema",
    "ema_batch_stats": ema_batch_stats,
    "scores": dict(scores or {}),
    "trained": dict(trained or {}),
    "config": json.loads(inference_config(config).to_json()),
  }
  files.write_atomic(path / MODEL_FILE, json.dumps(meta, indent=1))
  return path


def model_dir(path: str | os.PathLike) -> pathlib.Path:
  """The model folder `path` names: itself, or a run folder's `model/`.

  Raises:
    UserError: neither (naming what is missing and how to make it).
  """
  path = pathlib.Path(path).expanduser()
  if (path / MODEL_FILE).is_file():
    return path
  if (path / RUN_MODEL_DIR / MODEL_FILE).is_file():
    return path / RUN_MODEL_DIR
  if (path / "config.json").is_file():
    raise UserError(
      f"{path} is a run folder without {RUN_MODEL_DIR}/ (unfinished, or trained before runs "
      f"saved their model): metadcseg-export --workdir={path} --output={path / RUN_MODEL_DIR}"
    )
  raise UserError(f"{path}: not a model folder ({MODEL_FILE}) nor a run folder")


class Model:
  """A trained network with its preprocessing (`load_model`).

  Attributes:
    config: the settings it was trained with.
    method: the method (its `predict` gives class probabilities).
    state: the weights (training state without the optimizer's).
    preprocessing: how inputs are prepared (`metadcseg_jax.data.preprocess`).
    info: the rest of model.json (scores, where it was trained, the default variant).
    batch_size: images per prediction call (a multiple of the local devices).
  """

  def __init__(self, config, method, state, pre, info, *, batch_size: int = 8):
    self.config, self.method, self.state, self.preprocessing = config, method, state, pre
    self.info = dict(info)
    devices = jax.local_devices()
    self.batch_size = -(-max(batch_size, 1) // len(devices)) * len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    P = jax.sharding.PartitionSpec
    self._batch_sharding = jax.sharding.NamedSharding(mesh, P("data"))
    self._replicated = jax.sharding.NamedSharding(mesh, P())
    self._state = jax.device_put(state, self._replicated)
    self._jitted: dict[str, Callable] = {}

  @property
  def default_variant(self) -> str:
    return self.info.get("default_variant", "ema")

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.preprocessing.class_names

  def _fn(self, variant: str) -> Callable:
    if variant not in VARIANTS:
      raise UserError(f"variant {variant!r}: choose one of {VARIANTS}")
    if variant not in self._jitted:
      self._jitted[variant] = jax.jit(
        lambda state, x: self.method.predict(state, x, variant=variant),
        in_shardings=(self._replicated, self._batch_sharding),
        out_shardings=self._batch_sharding,
      )
    return self._jitted[variant]

  def probabilities(self, x: np.ndarray, *, variant: str | None = None) -> np.ndarray:
    """Class probabilities (N,size,size,L) float32 of network inputs x (N,size,size,C), in
    batches of `batch_size` (the last one padded)."""
    fn = self._fn(variant or self.default_variant)
    return np.concatenate(list(self._batched(fn, x))) if len(x) else np.zeros((0,), np.float32)

  def _batched(self, fn: Callable, x: np.ndarray) -> Iterator[np.ndarray]:
    b = self.batch_size
    for start in range(0, len(x), b):
      chunk = x[start : start + b]
      padded = np.zeros((b,) + chunk.shape[1:], np.float32)
      padded[: len(chunk)] = chunk
      out = fn(self._state, jax.device_put(padded, self._batch_sharding))
      yield np.asarray(out, np.float32)[: len(chunk)]

  def predict(
    self, x, *, variant: str | None = None, probabilities: bool = False
  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The mask of one image or volume, in its own geometry.

    Args:
      x: a file path (2D image, NIfTI, MHA/MHD) or an array: for a 2D model (H,W) or (H,W,C)
        (uint8 0-255, or float in [0, 1]); for a volume model (X,Y,Z) or (X,Y,Z,M) in
        nibabel's axis order, slices along the last spatial axis.
      variant: "raw" or "ema" (default: the weights the run's results.json reports, "ema").
      probabilities: also return the class probabilities.

    Returns:
      The class indices (int32) in the input's shape without channels ((H,W) or (X,Y,Z)) and,
      with `probabilities`, the (…, L) float32 probabilities.
    """
    item = io.read_input(x, self.preprocessing)
    probs = self.predict_item(item, variant=variant)
    mask = np.argmax(probs, axis=-1).astype(np.int32)
    return (mask, probs) if probabilities else mask

  def predict_item(self, item: io.Item, *, variant: str | None = None) -> np.ndarray:
    """Class probabilities (…, L) float32 of a read input in its own geometry: (H,W,L) for an
    image, (X,Y,Z,L) (the file's axis order) for a volume."""
    probs = self.probabilities(item.x, variant=variant)
    return item.to_file_layout(self.preprocessing.restore(probs, item.shape))


def load_model(path: str | os.PathLike, *, batch_size: int = 8) -> Model:
  """Opens a model folder, or the model a run folder saved (`RUN_MODEL_DIR`).

  Raises:
    UserError: not a model or run folder. CheckpointError: the weights do not fit the settings.
  """
  folder = model_dir(path)
  try:
    info = json.loads((folder / MODEL_FILE).read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {folder / MODEL_FILE}: {e}") from e
  if info.get("format") != FORMAT:
    raise UserError(f"{folder / MODEL_FILE} is not a {FORMAT} file")
  if int(info.get("version", 0)) > VERSION:
    raise UserError(
      f"{folder} was written by a newer metadcseg-jax (model format {info['version']}): upgrade"
    )
  try:
    config = ml_collections.ConfigDict(info.pop("config"))
    pre = preprocess.Preprocessing.from_json(info.pop("preprocessing"))
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{folder / MODEL_FILE} is damaged (no settings or preprocessing): {e}") from e
  method = methods.create(config, steps_per_epoch=1)
  state = _restore(folder / WEIGHTS_FILE, method, config, sha256=info.get("weights_sha256"))
  return Model(config, method, state, pre, info, batch_size=batch_size)


def _restore(path: pathlib.Path, method, config, *, sha256: str | None = None) -> Any:
  """The state saved at `path`, in the structure `method` builds (the optimizer state, not
  saved, as at initialisation: prediction never reads it); `sha256`, model.json's digest of
  the weights file, checked when given."""
  abstract = jax.eval_shape(lambda: method.init_state(jax.random.PRNGKey(int(config.seed))))
  template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  full = flax.serialization.to_state_dict(template)
  try:
    data = path.read_bytes()
    saved = flax.serialization.msgpack_restore(data)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from e
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise CheckpointError(
      f"{path} is not the weights its model.json describes (a save cut short?): export again"
    )
  unknown = sorted(set(saved) - set(full))
  if unknown:
    raise CheckpointError(f"{path}: entries {unknown} do not belong to a {config.method} state")
  missing = sorted(set(full) - set(saved) - set(_NOT_SAVED))
  if missing:
    raise CheckpointError(f"{path} lacks the entries {missing} of a {config.method} state")
  full.update(saved)
  try:
    state = flax.serialization.from_state_dict(template, full)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} does not fit the settings in its model.json: {e}") from e
  mismatched = [
    jax.tree_util.keystr(k)
    for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(template), jax.tree.leaves(state))
    if np.shape(a) != np.shape(b)
  ]
  if mismatched:
    raise CheckpointError(f"{path}: shapes differ from the settings' network at {mismatched[:3]}")
  return state
