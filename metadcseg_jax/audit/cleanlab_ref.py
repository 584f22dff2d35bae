"""cleanlab's segmentation label-issue scores, for comparing the label audit (optional extra
`audit`: `pip install -e '.[audit]'`; not a dependency).

cleanlab only looks at a model's predicted probabilities; `audit_report.measure` feeds it the
same probabilities the meta method's audit pass stored, so the two are compared on one model.
"""

import cleanlab
from cleanlab.segmentation import filter as cl_filter
from cleanlab.segmentation import rank as cl_rank
import numpy as np

VERSION = cleanlab.__version__


def suspicion(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
  """cleanlab on labels (N,H,W) and probabilities (N,H,W,L).

  Returns:
    "image": (N,) 1 − `get_label_quality_scores` (softmin; higher = more suspicious),
    "pixel": (N,H,W) 1 − its per-pixel quality, "issues": (N,H,W) bool `find_label_issues`.
  """
  channels_first = np.moveaxis(np.asarray(probs, np.float32), -1, 1)
  channels_first /= channels_first.sum(axis=1, keepdims=True)  # float16 storage rounding
  labels = np.asarray(labels, np.int64)
  # n_jobs=1: its per-image process pool costs 50x the work on small images.
  image, pixel = cl_rank.get_label_quality_scores(labels, channels_first, n_jobs=1, verbose=False)
  issues = cl_filter.find_label_issues(labels, channels_first, n_jobs=1, verbose=False)
  return {"image": 1.0 - image, "pixel": 1.0 - pixel, "issues": np.asarray(issues, bool)}
