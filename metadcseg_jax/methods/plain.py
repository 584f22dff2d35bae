"""Plain per-pixel losses on the noisy labels: cross-entropy, GCE, symmetric CE (baselines)."""

import functools

import ml_collections

from metadcseg_jax import settings
from metadcseg_jax.core import losses
from metadcseg_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  """`config.loss`: the robust losses' parameters (gce, sce)."""
  c = ml_collections.ConfigDict()
  c.gce_q = 0.7
  c.sce_alpha = 0.1
  c.sce_beta = 1.0
  return c


RULES: settings.Rules = (
  ("loss.gce_q", settings.number(0.0, 1.0, low_open=True)),
  ("loss.sce_alpha", settings.number(0.0)),
  ("loss.sce_beta", settings.number(0.0)),
)


class CE(base.SingleNetworkMethod):
  """Mean cross-entropy on the noisy labels: the baseline every method must beat."""

  name = "ce"

  def train_step(self, phase):
    del phase
    return self.plain_step(losses.ce_map)


class GCE(base.SingleNetworkMethod):
  """Generalized cross-entropy (Zhang & Sabuncu 2018), q = `config.loss.gce_q`."""

  name = "gce"
  config_sections = {"loss": default_config}
  config_rules = RULES

  def train_step(self, phase):
    del phase
    return self.plain_step(functools.partial(losses.gce_map, q=self.config.loss.gce_q))


class SCE(base.SingleNetworkMethod):
  """Symmetric cross-entropy (Wang et al. 2019), `config.loss.sce_alpha`, `sce_beta`."""

  name = "sce"
  config_sections = {"loss": default_config}
  config_rules = RULES

  def train_step(self, phase):
    del phase
    loss = self.config.loss
    return self.plain_step(
      functools.partial(losses.sce_map, alpha=loss.sce_alpha, beta=loss.sce_beta)
    )
