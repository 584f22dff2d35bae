"""JoCoR for segmentation: joint training with co-regularisation on small-loss pixels.

Wei et al., "Combating Noisy Labels by Agreement: A Joint Training Method with
Co-Regularization", CVPR 2020 (Eq. 3, Eq. 4, Eq. 5), per pixel: the joint loss
`ℓ = (1 − λ)(CE(p1, ỹ) + CE(p2, ỹ)) + λ·(KL(p1‖p2) + KL(p2‖p1))`, the `1 − τ_e` share of
the batch's pixels with the smallest ℓ is kept, and both networks descend the mean of ℓ over
them (one loss, gradients into both). Settings: `config.coteach` (λ is `co_lambda`).
"""

import jax.numpy as jnp

from metadcseg_jax.core import losses
from metadcseg_jax.methods import two_network
from metadcseg_jax.types import Array


def jocor_pixel_loss(logits1: Array, logits2: Array, labels: Array, *, co_lambda: float) -> Array:
  """JoCoR's per-pixel loss (Eq. 5) of two (B,H,W,L) logits and (B,H,W) labels: (B,H,W).

  Args:
    logits1, logits2: (B,H,W,L) the two networks' logits.
    labels: (B,H,W) the noisy labels.
    co_lambda: λ, the weight of the agreement (symmetric KL) term.
  """
  ce = losses.ce_map(logits1, labels) + losses.ce_map(logits2, labels)
  return (1.0 - co_lambda) * ce + co_lambda * two_network.symmetric_kl_map(logits1, logits2)


class JoCoR(two_network.TwoNetworkMethod):
  """Small-loss selection on the joint loss; both networks trained on the same pixels."""

  name = "jocor"

  def train_step(self, phase):
    del phase
    co_lambda = self.config.coteach.co_lambda

    def objective(logits1, logits2, labels, keep):
      pixel = jocor_pixel_loss(logits1, logits2, labels, co_lambda=co_lambda)
      pick = two_network.small_loss_mask(pixel, keep)
      aux = {
        "keep_share": jnp.mean(pick),
        "sym_kl": jnp.mean(two_network.symmetric_kl_map(logits1, logits2)),
      }
      return two_network.masked_mean(pixel, pick), aux

    return self.pair_step(objective)
