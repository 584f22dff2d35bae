"""Shared type aliases (one place, as in optax's `_src/base.py`)."""

from typing import Any, Mapping

import chex

Array = chex.Array
Params = Any  # a pytree of parameter arrays
Variables = Mapping[str, Any]  # {"params": ..., "batch_stats": ...}
