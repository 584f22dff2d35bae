"""Two networks trained side by side: the machinery of Co-teaching, JoCoR and GSD-Net.

The state is the one-network `base.TrainState` with every per-network field a pair
`(network 1, network 2)`: `params`, `batch_stats`, `opt_state`, `ema_params`,
`ema_batch_stats`. Both networks have the same architecture and different initialisations;
each has its own optimizer state, and gradient clipping is per network (Co-teaching's two
optimizers; JoCoR's single optimizer over both differs only in that its clipping, which
JoCoR's code does not use, would be joint). Prediction fuses the two networks by the sum of
their logits (GSD-Net §4.1; also used for Co-teaching and JoCoR so that every two-network row
of a table is read the same way).

Small-loss selection (Han et al. 2018, Co-teaching §3; settings `config.coteach`): a share
`1 − τ_e` of the batch's pixels with the smallest loss is kept, with the forget rate
`τ_e = τ·min(e / (T_k − 1), 1)` at epoch e (0-based), the linear ramp of Co-teaching's and
JoCoR's code (`np.linspace(0, τ, T_k)` over the first T_k epochs); GSD-Net's
`τ·min(e/19, 1)` is T_k = 20.

References:
  Han et al., "Co-teaching: Robust Training of Deep Neural Networks with Extremely Noisy
    Labels", NeurIPS 2018.
  Wei et al., "Combating Noisy Labels by Agreement: A Joint Training Method with
    Co-Regularization" (JoCoR), CVPR 2020.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metadcseg_jax import settings
from metadcseg_jax.methods import base
from metadcseg_jax.types import Array


# A measured flip share above this would leave too few pixels to learn from; never reached by
# the L2B levels (15-25% on the synthetic set).
MAX_AUTO_FORGET_RATE = 0.5


def default_config() -> ml_collections.ConfigDict:
  """`config.coteach`: the small-loss selection of Co-teaching and JoCoR (GSD-Net's τ too)."""
  c = ml_collections.ConfigDict()
  # τ: the share of pixels dropped once the ramp is over. Co-teaching and GSD-Net set it to the
  # share of wrong labels, for masks the share of flipped training pixels: with
  # auto_forget_rate the trainer sets it to the measured value (data_info.json
  # "pixel_error_rate"; 0 on clean labels), an oracle the papers use on simulated noise.
  # Turn it off for real noise, where that share is unknown, and give forget_rate.
  c.auto_forget_rate = True
  c.forget_rate = 0.1
  c.num_gradual = 10  # T_k: epochs of the linear ramp 0 -> τ (Co-teaching, JoCoR)
  # JoCoR's λ in (1 − λ)(CE1 + CE2) + λ·symmetric KL. Its CIFAR setting 0.9 made both
  # networks agree on an empty mask at 60% noise (validation Dice 0); 0.5, chosen on the
  # validation split (BUILD_NOTES.md, "Comparison methods"), is GSD-Net's weighting too.
  c.co_lambda = 0.5
  return c


RULES: settings.Rules = (
  ("coteach.auto_forget_rate", settings.boolean),
  ("coteach.forget_rate", settings.number(0.0, 1.0, high_open=True)),
  ("coteach.num_gradual", settings.integer(1)),
  ("coteach.co_lambda", settings.number(0.0, 1.0)),
)


def forget_rate(epoch: Array, *, rate: float, num_gradual: int) -> Array:
  """`τ_e = τ·min(e / (T_k − 1), 1)` at 0-based epoch e (scalar, float32).

  Equals entry e of Co-teaching's `np.linspace(0, τ, T_k)`, then τ for every later epoch.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"forget rate must be in [0, 1), got {rate}")
  if num_gradual < 1:
    raise ValueError(f"num_gradual must be >= 1, got {num_gradual}")
  ramp = jnp.asarray(epoch, jnp.float32) / max(num_gradual - 1, 1)
  return rate * jnp.minimum(ramp, 1.0)


def small_loss_mask(loss: Array, keep: Array) -> Array:
  """The `⌊keep·N⌋` pixels of smallest loss among the N of the batch (ties by position).

  Args:
    loss: (B,H,W) per-pixel losses (any shape; the selection is over all its entries).
    keep: scalar share in [0, 1] to keep, `1 − τ_e`; may be traced.

  Returns:
    float32 array of the shape of `loss`: 1 on kept pixels, 0 elsewhere; no gradient.
  """
  flat = jax.lax.stop_gradient(loss).reshape(-1)
  n = flat.shape[0]
  num_keep = jnp.floor(jnp.asarray(keep, jnp.float32) * n).astype(jnp.int32)
  # The rank of every entry in ascending order (a stable sort keeps ties in position order).
  order = jnp.argsort(flat, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return (rank < num_keep).astype(jnp.float32).reshape(loss.shape)


def masked_mean(x: Array, mask: Array) -> Array:
  """`Σ x·mask / max(Σ mask, 1)`: the mean over selected pixels (0 if none is selected)."""
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def symmetric_kl_map(logits1: Array, logits2: Array) -> Array:
  """Per-pixel `KL(p1‖p2) + KL(p2‖p1)` of the softmaxes of two (B,H,W,L) logits: (B,H,W).

  JoCoR Eq. 4; gradients flow into both networks.
  """
  lp1 = jax.nn.log_softmax(logits1, axis=-1)
  lp2 = jax.nn.log_softmax(logits2, axis=-1)
  return jnp.sum((jnp.exp(lp1) - jnp.exp(lp2)) * (lp1 - lp2), axis=-1)


class TwoNetworkMethod(base.SingleNetworkMethod):
  """Two U-Nets of `config.model`, each with its optimizer state and EMA (see module doc)."""

  config_sections = {"coteach": default_config}
  config_rules = RULES

  def init_state(self, rng):
    rng1, rng2 = jax.random.split(rng)
    s1, s2 = super().init_state(rng1), super().init_state(rng2)
    pair = lambda a, b: (a, b)
    return s1.replace(
      params=pair(s1.params, s2.params),
      batch_stats=pair(s1.batch_stats, s2.batch_stats),
      opt_state=pair(s1.opt_state, s2.opt_state),
      ema_params=pair(s1.ema_params, s2.ema_params),
      ema_batch_stats=pair(s1.ema_batch_stats, s2.ema_batch_stats),
    )

  @classmethod
  def settings_from_data(cls, config, data_info):
    if not config.coteach.auto_forget_rate:
      return {}
    rate = float(data_info.get("noise", {}).get("pixel_error_rate", 0.0))
    return {"coteach.forget_rate": min(rate, MAX_AUTO_FORGET_RATE)}

  def epoch(self, state: base.TrainState) -> Array:
    """The 0-based epoch of the step about to be taken (traced int32)."""
    return state.step // self.steps_per_epoch

  @property
  def num_gradual(self) -> int:
    """T_k, the epochs of the forget rate's ramp (GSD-Net sets its own)."""
    return self.config.coteach.num_gradual

  def keep_share(self, state: base.TrainState) -> Array:
    """`1 − τ_e`: the share of pixels small-loss selection keeps at this step."""
    rate = forget_rate(
      self.epoch(state), rate=self.config.coteach.forget_rate, num_gradual=self.num_gradual
    )
    return 1.0 - rate

  def update_pair(self, state: base.TrainState, grads, batch_stats, *, extra=None):
    """One optimizer update of each network with its own gradients, then the EMAs.

    Args:
      state: the pair's state before the step.
      grads: (grads of network 1, grads of network 2).
      batch_stats: (statistics of network 1, of network 2) after the step's forwards.
      extra: the method's own state entries to replace, or None.
    """
    p1, o1 = self.update_params(state.params[0], state.opt_state[0], grads[0])
    p2, o2 = self.update_params(state.params[1], state.opt_state[1], grads[1])
    return self.finish_step(state, (p1, p2), (o1, o2), tuple(batch_stats), extra=extra)

  @staticmethod
  def pair_measurements(loss: Array, grads, params) -> dict[str, Array]:
    """loss, and each network's gradient and parameter norms."""
    return {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "grad_norm_1": optax.tree.norm(grads[0]),
      "grad_norm_2": optax.tree.norm(grads[1]),
      "param_norm": optax.tree.norm(params),
    }

  def pair_step(self, objective) -> base.StepFn:
    """A step of both networks on the same images, descending one joint loss.

    Args:
      objective: `(logits_1, logits_2 (B,H,W,L), noisy labels (B,H,W), keep share) ->
        (loss, aux dict of scalars)`; its gradient reaches each network through its logits.
    """

    def step(state, batch, rng):
      del rng  # both networks see the same, unperturbed batch
      x, y = batch["image"], batch["noisy_label"]
      keep = self.keep_share(state)

      def loss_fn(params):
        (l1, _), s1 = self.forward(params[0], state.batch_stats[0], x)
        (l2, _), s2 = self.forward(params[1], state.batch_stats[1], x)
        loss, aux = objective(l1, l2, y, keep)
        aux["disagree_share"] = jnp.mean(jnp.argmax(l1, -1) != jnp.argmax(l2, -1))
        return loss, ((s1, s2), aux)

      (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      new_state = self.update_pair(state, grads, stats)
      return new_state, {**self.pair_measurements(loss, grads, new_state.params), **aux}

    return step

  def logits_pair(self, state: base.TrainState, images: Array, *, variant: str = "raw"):
    """Eval-mode logits (B,H,W,L) of both networks with the `variant` parameters."""
    if variant == "ema":
      params, stats = state.ema_params, state.ema_batch_stats
    else:
      params, stats = state.params, state.batch_stats
    out = []
    for p, s in zip(params, stats):
      logits, _ = self.model.apply({"params": p, "batch_stats": s}, images, train=False)
      out.append(logits)
    return tuple(out)

  def recompute_ema_batch_stats(self, state, batches):
    stats = tuple(
      self.recomputed_batch_stats(p, s, batches())
      for p, s in zip(state.ema_params, state.ema_batch_stats)
    )
    return state.replace(ema_batch_stats=stats)

  def predict(self, state, images, *, variant="raw"):
    l1, l2 = self.logits_pair(state, images, variant=variant)
    return jax.nn.softmax(l1 + l2, axis=-1)
