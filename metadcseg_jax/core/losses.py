"""Per-pixel segmentation losses on logits (B,H,W,L) and integer labels (B,H,W).

Pure functions, no reduction unless the name says so: the meta step (MetaDCSeg §3.2)
weights every pixel's loss itself. `ce_map` is the `f`/`g` of MetaDCSeg
Eq. 13, `soft_dice_loss` its Dice term; `gce_map` and `sce_map` are the
plain noise-robust baselines of the seed papers' comparisons.

Example:
  >>> logits = jnp.zeros((2, 4, 4, 2)); labels = jnp.zeros((2, 4, 4), int)
  >>> ce_map(logits, labels).shape
  (2, 4, 4)
"""

import jax
import jax.numpy as jnp
import optax

from metadcseg_jax.types import Array


def check_logits_labels(logits: Array, labels: Array) -> None:
  """Raises ValueError unless `labels.shape == logits.shape[:-1]` and labels are integers."""
  if logits.ndim < 2:
    raise ValueError(f"logits must be (B,...,L) with at least 2 dims, got shape {logits.shape}")
  if tuple(labels.shape) != tuple(logits.shape[:-1]):
    raise ValueError(
      f"labels shape {tuple(labels.shape)} must equal logits shape "
      f"{tuple(logits.shape)} without its class axis, i.e. "
      f"{tuple(logits.shape[:-1])}"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")


def _check_classes(logits: Array) -> None:
  if logits.shape[-1] < 2:
    raise ValueError(
      "logits need a background and at least one foreground class "
      f"(L >= 2), got shape {logits.shape}"
    )


def ce_map(logits: Array, labels: Array) -> Array:
  """Per-pixel softmax cross-entropy `-log softmax(logits)[y]`.

  Args:
    logits: (B,H,W,L).
    labels: (B,H,W) integers in [0, L).

  Returns:
    (B,H,W) losses, dtype of `logits`.
  """
  check_logits_labels(logits, labels)
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


def mean_ce(logits: Array, labels: Array) -> Array:
  """Mean of `ce_map` over all pixels of the batch; scalar."""
  return jnp.mean(ce_map(logits, labels))


def foreground_prob(logits: Array) -> Array:
  """Predicted foreground probability `M̂ = 1 - softmax(logits)[..., 0]`.

  For L > 2 this is the probability of any non-background class
  (MetaDCSeg §3.3). Computed as `-expm1(log_softmax[..., 0])`, which equals
  `1 - p_0` but keeps precision where the foreground is unlikely.

  Args:
    logits: (B,H,W,L), L >= 2.

  Returns:
    (B,H,W) in [0, 1], dtype of `logits`.
  """
  _check_classes(logits)
  return -jnp.expm1(jax.nn.log_softmax(logits, axis=-1)[..., 0])


def soft_dice_loss(logits: Array, labels: Array, *, smooth: float = 1.0) -> Array:
  """Per-image soft Dice loss on the foreground (the Dice term of Eq. 13).

  With `p = foreground_prob(logits)` and `t = [labels > 0]`, per image:

    Dice = 1 - (2 Σ p·t + smooth) / (Σ p + Σ t + smooth)

  (sums over all pixels of the image). Not optax's `dice_loss`: that one
  puts `smooth` as `(I + s) / (0.5 P + 0.5 T + s)`, i.e. `2s` in this form.

  Args:
    logits: (B,H,W,L), L >= 2.
    labels: (B,H,W) integers; every class > 0 counts as foreground.
    smooth: additive smoothing, > 0 keeps empty-and-empty images at loss 0.

  Returns:
    (B,) losses in [0, 1).

  References:
    Milletari et al., "V-Net", 3DV 2016.
  """
  check_logits_labels(logits, labels)
  p = foreground_prob(logits)
  t = (labels > 0).astype(p.dtype)
  axes = tuple(range(1, p.ndim))
  inter = jnp.sum(p * t, axis=axes)
  denom = jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes)
  return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def gce_map(logits: Array, labels: Array, *, q: float = 0.7) -> Array:
  """Per-pixel generalized cross-entropy `(1 - p_y^q) / q`.

  Tends to CE as q -> 0 and equals the MAE-like `1 - p_y` at q = 1.
  Computed as `-expm1(-q · CE) / q`, exact for small q.

  Args:
    logits: (B,H,W,L).
    labels: (B,H,W) integers.
    q: exponent in (0, 1].

  Returns:
    (B,H,W) losses.

  References:
    Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep
    Neural Networks with Noisy Labels", NeurIPS 2018, Eq. 6.
  """
  if not 0.0 < q <= 1.0:
    raise ValueError(f"q must be in (0, 1], got {q}")
  return -jnp.expm1(-q * ce_map(logits, labels)) / q


def sce_map(
  logits: Array, labels: Array, *, alpha: float = 0.1, beta: float = 1.0, log_clip: float = -4.0
) -> Array:
  """Per-pixel symmetric cross-entropy `alpha · CE + beta · RCE`.

  The reverse CE `RCE = -Σ_k p_k log q_k` with the one-hot label `q` and
  `log 0` clipped to `A = log_clip` reduces to `-A · (1 - p_y)`.

  Args:
    logits: (B,H,W,L).
    labels: (B,H,W) integers.
    alpha: weight of CE.
    beta: weight of RCE.
    log_clip: A < 0, the value that replaces log 0 (the paper's A = -4;
      the authors' code clamps the one-hot at 1e-4, i.e. A ≈ -9.21).

  Returns:
    (B,H,W) losses.

  References:
    Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy
    Labels", ICCV 2019, Eq. 5, Eq. 6, Eq. 7.
  """
  if not log_clip < 0.0:
    raise ValueError(f"log_clip must be negative (it stands for log 0), got {log_clip}")
  ce = ce_map(logits, labels)
  rce = -log_clip * -jnp.expm1(-ce)  # 1 - p_y, exact where p_y ~ 1
  return alpha * ce + beta * rce
