"""Shared type aliases (one place, as in optax's `_src/base.py`)."""

from typing import Any, Mapping

import chex
import numpy as np

Array = chex.Array
PRNGKey = chex.PRNGKey
Params = Any  # a pytree of parameter arrays
BatchStats = Any  # BatchNorm running statistics, a pytree
Variables = Mapping[str, Any]  # {"params": ..., "batch_stats": ...}
# A batch is a dict of arrays: "image" (B,H,W,C) float32, "label" (B,H,W) int32,
# "noisy_label" (B,H,W) int32, "index" (B,) int64; meta methods add "meta_image"
# (Bv,H,W,C) and "meta_label" (Bv,H,W).
Batch = Mapping[str, Array]
NumpyBatch = Mapping[str, np.ndarray]
