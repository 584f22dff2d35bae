"""The trainer's label-audit passes: which training masks the meta-weights distrust.

The meta step (MetaDCSeg App. A.3, Eq. 23 and Eq. 24) splits each pixel's weight between the given
label y and the model's pseudo-label ŷ: ã for y, b̃ for ŷ. Where y and ŷ agree the split says
nothing; where they disagree, the share πb = b̃ / (ã + b̃) is how far the clean meta set moved
the weight away from the given label. So, per pixel and per image,

    suspicion s = [y ≠ ŷ] · πb      (πb = 1/2 where ã = b̃ = 0: neither is trusted)
    score       = Σ s / (|y| + |ŷ|)  a suspicion-weighted 1 − Dice(y, ŷ)

(`meta.suspicion_map`, `image_scores`). In the last `config.audit.epochs` epochs of a meta
method, the trainer runs one pass over the training split (in order, without augmentation, at
the epoch's parameters) and writes `<workdir>/audit/epoch_<e>.npz` before the epoch's
checkpoint: a killed run rewrites the epoch it resumes, and a finished run has one file per
audited epoch, which `metadcseg-audit` averages (`metadcseg_jax.audit`).

At (a0, b0) = (0, 0) with an update linear in the gradient (the defaults), the meta batch's part
of the weights does not depend on the training batch (`meta.MetaDirection`): a pass computes it
once per meta batch and then one training-forward JVP per training batch, about a quarter of a
meta step's cost (BUILD_NOTES.md, "Label audit").
"""

import pathlib
from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from metadcseg_jax.data import pipeline
from metadcseg_jax.methods.base import RUN_ONCE_COMPILE

AUDIT_DIR = "audit"


def image_scores(suspicion: np.ndarray, y: np.ndarray, y_pseudo: np.ndarray) -> np.ndarray:
  """(N,) Σ s / (|y| + |ŷ|) per image (foreground = any class but 0)."""
  axes = tuple(range(1, suspicion.ndim))
  size = np.sum(y > 0, axis=axes) + np.sum(y_pseudo > 0, axis=axes)
  return np.sum(suspicion, axis=axes) / np.maximum(size, 1)


class Functions(NamedTuple):
  """A method's audit functions, jitted (`functions`).

  Attributes:
    maps: `(state, feed) -> maps`, `method.audit_maps` (the feed holds its meta batch).
    direction: `(state, meta_image, meta_label) -> direction`, `method.audit_direction`, or
      None (`maps` is used).
    along: `(state, feed, direction) -> maps`, `method.audit_maps_along`, or None.
  """

  maps: Callable
  direction: Callable | None = None
  along: Callable | None = None


def functions(method) -> Functions:
  """`method`'s audit functions, jitted once for all the passes of a run. Where the audit factors
  (`method.audit_shares_direction`), a pass computes the meta batch's part once per meta batch
  (compiled for compile speed) and one training-forward JVP per training batch."""
  if not getattr(method, "audit_shares_direction", False):
    return Functions(jax.jit(method.audit_maps))
  return Functions(
    jax.jit(method.audit_maps),
    jax.jit(method.audit_direction, compiler_options=RUN_ONCE_COMPILE),
    jax.jit(method.audit_maps_along),
  )


def audit_pass(
  method,
  state,
  train: pipeline.Records,
  meta: pipeline.Records,
  *,
  batch_size: int,
  meta_batch_size: int,
  meta_images: int = 0,
  fns: Functions | None = None,
) -> dict[str, np.ndarray]:
  """One pass over `train` in order: {"index" (N,), "suspicion" (N,H,W) float16, "pseudo"
  (N,H,W) uint8, "probs" (N,H,W,L) float16 (the model's, for a comparison with cleanlab on the
  same predictions), "score" (N,), "meta_images" ()} at `state`.

  `meta_images`: 0 cycles meta batches of `meta_batch_size` through `meta`; n > 0 uses the first
  n images of `meta` (all if fewer) as the meta batch of every training batch.
  `fns`: the method's `functions` (the trainer's, compiled once per run); made here if None.

  Args:
    method: the meta method (its `audit_maps`, and `audit_direction` where the audit factors).
    state: the training state, on one device.
    train: the training split's records.
    meta: the clean meta split's records.
    batch_size: the training batch.
    meta_batch_size: the meta batch.
    meta_images: as above.
    fns: as above.
  """
  fns = fns or functions(method)
  if meta_images > 0:
    meta_batches = [next(pipeline.eval_batches(meta, min(meta_images, len(meta))))]
  else:
    meta_batches = list(pipeline.eval_batches(meta, meta_batch_size))
    meta_batches = [b for b in meta_batches if len(b["image"]) == meta_batch_size] or meta_batches
  directions = None
  if fns.direction is not None:
    directions = [fns.direction(state, mb["image"], mb["label"]) for mb in meta_batches]
  out = {"index": [], "suspicion": [], "pseudo": [], "probs": [], "noisy": []}
  for i, batch in enumerate(
    pipeline.eval_batches(train, batch_size, transform=method.example_transform)
  ):
    n = len(batch["image"])
    feed = {
      k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) if n < batch_size else v
      for k, v in batch.items()
      if k not in ("label", "index")
    }
    if directions is not None:
      maps = fns.along(state, feed, directions[i % len(directions)])
    else:
      mb = meta_batches[i % len(meta_batches)]
      feed["meta_image"], feed["meta_label"] = mb["image"], mb["label"]
      maps = fns.maps(state, feed)
    maps = jax.device_get(maps)
    out["index"].append(batch["index"])
    out["suspicion"].append(np.asarray(maps["suspicion"][:n], np.float16))
    out["pseudo"].append(np.asarray(maps["pseudo"][:n], np.uint8))
    if "probs" in maps:
      out["probs"].append(np.asarray(maps["probs"][:n], np.float16))
    out["noisy"].append(batch["noisy_label"])
  result = {k: np.concatenate(v) for k, v in out.items() if v}
  result["score"] = image_scores(
    result["suspicion"].astype(np.float32), result.pop("noisy"), result["pseudo"]
  )
  result["meta_images"] = np.asarray(len(meta_batches[0]["image"]) if meta_images > 0 else 0)
  return result


def is_due(method, config: ml_collections.ConfigDict, epoch: int) -> bool:
  """Whether the trainer writes an audit pass after epoch `epoch` (1-based): for a method with
  meta-weights (`method.audits`), in its last `config.audit.epochs` epochs."""
  return bool(method.audits) and epoch > config.train.num_epochs - config.audit.epochs


def run_pass(
  method,
  state,
  splits: pipeline.DataSplits,
  config: ml_collections.ConfigDict,
  *,
  meta_images: int | None = None,
  fns: Functions | None = None,
) -> dict[str, np.ndarray]:
  """`audit_pass` over a run's training split with its batch sizes; `meta_images` None: the
  run's `config.audit.meta_images`.

  Args:
    method: the meta method.
    state: the training state, on one device.
    splits: the run's data splits (training and meta).
    config: the run's settings (batch sizes, `config.audit`).
    meta_images: as in `audit_pass` (None: the run's).
    fns: as in `audit_pass`.
  """
  t = config.train
  if meta_images is None:
    meta_images = config.audit.meta_images
  return audit_pass(
    method,
    state,
    splits.train,
    splits.meta,
    batch_size=t.batch_size,
    meta_batch_size=t.meta_batch_size,
    meta_images=meta_images,
    fns=fns,
  )


def save_pass(workdir: pathlib.Path, epoch: int, result: dict[str, np.ndarray]) -> pathlib.Path:
  path = pathlib.Path(workdir) / AUDIT_DIR / f"epoch_{epoch:04d}.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez_compressed(tmp, **result)
  tmp.replace(path)
  return path
