"""Co-teaching for segmentation: two networks teach each other on their small-loss pixels.

Han et al., "Co-teaching: Robust Training of Deep Neural Networks with Extremely Noisy Labels",
NeurIPS 2018 (Algorithm 1), at pixel level as GSD-Net's baselines use it: each network ranks
the batch's pixels by its own cross-entropy on the noisy labels, keeps the `1 − τ_e` share of
smallest loss (`two_network.small_loss_mask`), and its partner trains on exactly those pixels.
Settings: `config.coteach`.
"""

import jax.numpy as jnp

from metadcseg_jax.core import losses
from metadcseg_jax.methods import two_network


def cross_update_loss(logits1, logits2, labels, keep):
  """Algorithm 1, steps 4-6: `(loss_1 + loss_2, aux)`, each network's mean CE over the pixels
  its partner selected; logits (B,H,W,L), labels (B,H,W), keep the share `1 − τ_e`.

  Args:
    logits1, logits2: (B,H,W,L) the two networks' logits.
    labels: (B,H,W) the noisy labels.
    keep: the share of pixels each network selects for its partner, 1 − τ_e.
  """
  ce1, ce2 = losses.ce_map(logits1, labels), losses.ce_map(logits2, labels)
  pick1 = two_network.small_loss_mask(ce1, keep)  # what network 1 trusts
  pick2 = two_network.small_loss_mask(ce2, keep)
  loss1 = two_network.masked_mean(ce1, pick2)
  loss2 = two_network.masked_mean(ce2, pick1)
  aux = {
    "loss_1": loss1,
    "loss_2": loss2,
    "keep_share": jnp.mean(pick1),
    # Overlap of the two selections: Co-teaching's premise is that it stays below 1.
    "selection_overlap": jnp.sum(pick1 * pick2) / jnp.maximum(jnp.sum(pick1), 1.0),
  }
  return loss1 + loss2, aux


class CoTeaching(two_network.TwoNetworkMethod):
  """Cross-update on the partner's small-loss pixels."""

  name = "coteaching"

  def train_step(self, phase):
    del phase
    return self.pair_step(cross_update_loss)
