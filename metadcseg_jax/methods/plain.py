"""Plain per-pixel losses on the noisy labels: cross-entropy, GCE, symmetric CE (baselines)."""

import functools

from metadcseg_jax import losses
from metadcseg_jax.methods import base


class CE(base.SingleNetworkMethod):
  """Mean cross-entropy on the noisy labels: the baseline every method must beat."""

  name = "ce"

  def train_step(self, phase):
    del phase
    return self.plain_step(losses.ce_map)


class GCE(base.SingleNetworkMethod):
  """Generalized cross-entropy (Zhang & Sabuncu 2018), q = `config.loss.gce_q`."""

  name = "gce"

  def train_step(self, phase):
    del phase
    return self.plain_step(functools.partial(losses.gce_map, q=self.config.loss.gce_q))


class SCE(base.SingleNetworkMethod):
  """Symmetric cross-entropy (Wang et al. 2019), `config.loss.sce_alpha`, `sce_beta`."""

  name = "sce"

  def train_step(self, phase):
    del phase
    loss = self.config.loss
    return self.plain_step(
      functools.partial(losses.sce_map, alpha=loss.sce_alpha, beta=loss.sce_beta)
    )
