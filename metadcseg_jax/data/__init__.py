"""Datasets: the synthetic set, the real datasets' TFDS builders, label checks, the pipeline.

The names every module shares live here: the splits of every dataset and the one label check.
"""

import numpy as np

from metadcseg_jax.errors import DataError

SPLITS = ("train", "val", "test")


def check_labels(label: np.ndarray, num_classes: int, where: str) -> None:
  """Raises DataError naming `where` if a value of `label` (any shape) is outside [0, L).

  Args:
    label: integer class ids, any shape (H, W) or (N, H, W).
    num_classes: L.
    where: the example or file, for the message.
  """
  label = np.asarray(label)
  if label.size and (label.min() < 0 or label.max() >= num_classes):
    bad = np.unique(label[(label < 0) | (label >= num_classes)])
    raise DataError(
      f"{where}: label values {bad.tolist()[:10]} outside [0, {num_classes}); "
      f"set config.data.num_classes or fix the mask"
    )
