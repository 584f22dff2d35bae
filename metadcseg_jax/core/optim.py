"""Optimizers: the real training update and its clip-free base for the virtual step.

The meta step (MetaDCSeg App. A.3, Eq. 21) replays the *real* update on a virtual gradient,
momentum buffer
and weight decay included, but without gradient clipping. `make_optimizer` therefore returns
both the real transformation `tx` and the clip-free `base` it is built from, plus a way to pull
the base's state out of the real state, so the two always share one momentum buffer.

Example: the virtual step's update (`base`: no clipping, the real momentum buffer) of a gradient
0.5 at θ = 1, learning rate 0.01 × 20/20 at step 0, weight decay 5e-4:

  >>> import jax.numpy as jnp
  >>> opt = make_optimizer(learning_rate=lr_schedule(0.01, 100), grad_clip=0.2)
  >>> params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
  >>> opt_state = opt.tx.init(params)
  >>> updates, _ = opt.base.update(grads, opt.base_state(opt_state), params)
  >>> [round(u, 6) for u in updates["w"].tolist()]  # −0.01 · (0.5 + 5e-4 · 1)
  [-0.005005, -0.005005, -0.005005]
"""

import dataclasses
from typing import Callable, Optional, Union

import jax.numpy as jnp
import optax

# Optimizers `make_optimizer` builds (config.train.optimizer).
NAMES = ("sgd", "adam", "adamw")


def lr_schedule(base_lr: float, steps_per_epoch: int) -> optax.Schedule:
  """The paper's per-epoch decay `lr · 20 / (epoch + 20)` (PyTorch LambdaLR, §4.1).

  Args:
    base_lr: learning rate of epoch 0.
    steps_per_epoch: optimizer steps per epoch; `epoch = step // steps_per_epoch`.

  Returns:
    An optax schedule `step -> lr`.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
  if base_lr <= 0:
    raise ValueError(f"base_lr must be > 0, got {base_lr}")

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return base_lr * 20.0 / (epoch + 20.0)

  return schedule


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A real optimizer and the clip-free update the virtual meta step replays.

  Attributes:
    tx: the real update: `chain(clip_by_global_norm(grad_clip), base)`, or `base` alone when no
      clipping is set. Use `tx.init` / `tx.update` in the training loop.
    base: the same update without clipping (used by the virtual step, MetaDCSeg App. A.3, Eq. 21).
    base_state: maps a state of `tx` to the state of `base` inside it (the same arrays: the
      real momentum buffer and step count).
    linear_in_grad: whether `base.update` is affine in the gradient, `U(g) = U(0) + L g`
      (True for SGD with momentum and weight decay); the forward-over-reverse meta route
      needs this.
    name: the optimizer's name ("sgd", "adam" or "adamw").
  """

  tx: optax.GradientTransformation
  base: optax.GradientTransformation
  base_state: Callable[[optax.OptState], optax.OptState]
  linear_in_grad: bool
  name: str


def _chain_base_state(opt_state):
  return opt_state[1]


def _identity_state(opt_state):
  return opt_state


def make_optimizer(
  *,
  name: str = "sgd",
  learning_rate: Union[float, optax.Schedule],
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  grad_clip: Optional[float] = None,
  nesterov: bool = False,
  eps_root: float = 0.0,
) -> Optimizer:
  """Builds the real optimizer and its clip-free base.

  "sgd" has PyTorch `torch.optim.SGD` semantics (dampening 0): `d = g + wd·θ`,
  `buf = μ·buf + d` (the first step gives `buf = d`, as PyTorch's lazily created buffer),
  `θ ← θ − lr·buf` (or `θ − lr·(d + μ·buf)` with Nesterov).
  "adam" is PyTorch Adam (L2 penalty added to the gradient before Adam); "adamw" is decoupled
  weight decay. Both exist so the reverse meta route can be tested on a non-linear update;
  `momentum` and `nesterov` apply to SGD only.

  Args:
    name: "sgd", "adam" or "adamw".
    learning_rate: a float or an optax schedule of the step count.
    momentum: SGD momentum μ (0 disables the buffer).
    weight_decay: L2 weight decay.
    grad_clip: global-norm clipping threshold of the real step (paper Table 8 "Grad Thresh");
      None disables it. Never applied in the virtual step.
    nesterov: Nesterov momentum for SGD.
    eps_root: Adam's ε inside the square root (optax); > 0 keeps a meta-gradient through the
      Adam update finite where a parameter's gradient history is exactly 0.

  Returns:
    An `Optimizer`.
  """
  if name not in NAMES:
    raise ValueError(f"name must be one of {NAMES}, got {name!r}")
  if grad_clip is not None and grad_clip <= 0:
    raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if name == "sgd":
    base = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )
  elif name == "adam":
    base = optax.chain(
      optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, eps_root=eps_root)
    )
  else:
    base = optax.adamw(learning_rate, weight_decay=weight_decay, eps_root=eps_root)
  if grad_clip is None:
    tx, base_state = base, _identity_state
  else:
    tx, base_state = optax.chain(optax.clip_by_global_norm(grad_clip), base), _chain_base_state
  return Optimizer(
    tx=tx, base=base, base_state=base_state, linear_in_grad=(name == "sgd"), name=name
  )
