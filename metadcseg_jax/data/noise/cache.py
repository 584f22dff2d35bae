"""The on-disk cache of noisy labels: one .npy per (kind, seed) and a manifest, written atomically.

Training and `metadcseg-corrupt` both read `<data_dir>/noisy_labels/<dataset build>/`; a cache
entry is reused only when every parameter and both hashes match.
"""

import datetime
import hashlib
import io
import json
import os
import pathlib
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np

from metadcseg_jax import files
from metadcseg_jax.data import noise
from metadcseg_jax.data.noise import calibrate


def _sha256(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _read_manifest(path: pathlib.Path) -> dict[str, Any]:
  if not path.exists():
    return {}
  try:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable noise manifest %s: %s", path, e)
    return {}


def _cache_mismatch(entry: Any, want: Mapping[str, Any]) -> Optional[str]:
  if not isinstance(entry, dict):
    return "no manifest entry"
  for key, value in want.items():
    if entry.get(key) != value:
      return f"{key} differs (cached {entry.get(key)!r}, wanted {value!r})"
  return None


def cached_noisy_labels(
  labels: np.ndarray,
  *,
  cache_dir: str | os.PathLike,
  dataset_key: str,
  kind: str,
  seed: int,
  options: Optional[Mapping[str, Any]] = None,
) -> np.ndarray:
  """Noisy labels from `cache_dir`, built with `corrupt_masks` when stale.

  Files: `noisy_{kind}_seed{seed}.npy` and `manifest.json`, a dict keyed by
  the .npy name whose entries hold the parameters (kind, seed, resolved
  options, `NOISE_VERSION`, dataset_key, N, shape, sha256 of the clean labels),
  the sha256 of the noisy array, the measured corruption (Eq. 20)
  mean/std/min/max and the creation time (UTC). The cache is reused only when
  every parameter matches and the file's hash agrees; otherwise it is rebuilt
  and the reason logged. Both files are written to a temp file and renamed, so
  a crash leaves either the old cache or none. Concurrent writers of different
  kinds can at worst drop each other's manifest entry, which costs a rebuild.

  Args:
    labels: (N, H, W) uint8 (or any integer/bool) clean labels; mask i uses
      dataset index i.
    cache_dir: folder (created if missing).
    dataset_key: names the dataset and split, e.g. "kvasir/train@256".
    kind: one of `KINDS`.
    seed: non-negative integer.
    options: see `resolve_options`.

  Returns:
    (N, H, W) uint8 noisy labels.
  """
  labels = noise.check_label_array(labels, "labels", 3).astype(np.uint8)
  noise.check_seed(seed)
  opts = noise.resolve_options(kind, options)
  cache = pathlib.Path(cache_dir)
  cache.mkdir(parents=True, exist_ok=True)
  name = f"noisy_{kind}_seed{int(seed)}.npy"
  path, manifest_path = cache / name, cache / "manifest.json"
  want = json.loads(
    json.dumps(
      {
        "noise_version": noise.NOISE_VERSION,
        "dataset_key": str(dataset_key),
        "kind": kind,
        "seed": int(seed),
        "options": opts,
        "n": int(labels.shape[0]),
        "shape": list(labels.shape[1:]),
        "labels_sha256": _sha256(labels),
      }
    )
  )
  entry = _read_manifest(manifest_path).get(name)
  reason = _cache_mismatch(entry, want)
  if reason is None:
    try:
      noisy = np.load(path, allow_pickle=False)
      if noisy.dtype != np.uint8 or noisy.shape != labels.shape:
        reason = f"{name} has dtype {noisy.dtype} shape {noisy.shape}"
      elif _sha256(noisy) != entry.get("noisy_sha256"):
        reason = f"{name} does not match its manifest hash"
      else:
        logging.info("Reusing cached noisy labels %s", path)
        return noisy
    except (OSError, ValueError) as e:
      reason = f"cannot read {name}: {e}"
  logging.info("Building noisy labels %s (%s)", path, reason)
  calibration = None
  if opts.get("calibrate"):
    calibration = calibrate.calibrate(labels, kind=kind, seed=int(seed), options=opts)
    logging.info(
      "calibrated %s: kernel scale %.3f (kernels %s), corruption %.3f (target %.2f)",
      kind,
      calibration["kernel_scale"],
      calibration["kernels"],
      calibration["corruption"],
      calibration["target"],
    )
    if not calibration["within_tolerance"]:
      logging.warning(
        "%s cannot reach %.2f on these masks: the closest scale gives %.3f",
        kind,
        calibration["target"],
        calibration["corruption"],
      )
    noisy = calibration.pop("noisy")  # the search's final pass: not corrupted a second time
  else:
    noisy = noise.corrupt_masks(labels, kind=kind, seed=int(seed), **opts)
  rate = noise.measured_corruption(labels, noisy)
  buffer = io.BytesIO()
  np.save(buffer, noisy, allow_pickle=False)
  files.write_atomic(path, buffer.getvalue())
  entry = {
    **want,
    "noisy_sha256": _sha256(noisy),
    "corruption": {
      "mean": float(rate.mean()),
      "std": float(rate.std()),
      "min": float(rate.min()),
      "max": float(rate.max()),
    }
    if rate.size
    else None,
    "calibration": calibration,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  manifest = _read_manifest(manifest_path)  # re-read: keep others' entries
  manifest[name] = entry
  files.write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
  return noisy
