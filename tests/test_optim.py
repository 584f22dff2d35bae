"""Tests for metadcseg_jax.core.optim: the schedule, PyTorch-SGD semantics, clipping, shared
state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metadcseg_jax.core import optim

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def _params():
  return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.25, -0.75])}


def _grads(step):
  rng = np.random.default_rng(step)
  return {
    "w": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
  }


def _torch_sgd(params, grads_seq, lrs, *, momentum, weight_decay, nesterov=False):
  """torch.optim.SGD.step (dampening 0), written out in numpy; returns params and buffers."""
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  bufs = {k: None for k in params}
  for grads, lr in zip(grads_seq, lrs):
    for k in params:
      d = np.array(grads[k], np.float64) + weight_decay * params[k]
      bufs[k] = d.copy() if bufs[k] is None else momentum * bufs[k] + d
      step = d + momentum * bufs[k] if nesterov else bufs[k]
      params[k] = params[k] - lr * step
  return params, bufs


def test_lr_schedule_epoch_boundaries():
  sched = optim.lr_schedule(0.01, steps_per_epoch=10)
  for step, epoch in ((0, 0), (9, 0), (10, 1), (19, 1), (20, 2), (200, 20), (395, 39)):
    np.testing.assert_allclose(sched(step), 0.01 * 20 / (epoch + 20), rtol=1e-6)
  # jit-compatible on a traced step count, as inside optax.
  np.testing.assert_allclose(jax.jit(sched)(jnp.int32(30)), 0.01 * 20 / 23, rtol=1e-6)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.lr_schedule(0.01, 0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_base_update_matches_pytorch_sgd(nesterov):
  # steps_per_epoch=1 makes the lr change every step, so the schedule's count is checked too.
  sched = optim.lr_schedule(LR, steps_per_epoch=1)
  opt = optim.make_optimizer(
    learning_rate=sched, momentum=MOMENTUM, weight_decay=WD, nesterov=nesterov
  )
  params = _params()
  state = opt.base.init(params)
  grads_seq = [_grads(s) for s in range(3)]
  for grads in grads_seq:
    updates, state = opt.base.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want, bufs = _torch_sgd(
    _params(),
    grads_seq,
    [sched(s) for s in range(3)],
    momentum=MOMENTUM,
    weight_decay=WD,
    nesterov=nesterov,
  )
  for k in want:
    np.testing.assert_allclose(params[k], want[k], rtol=1e-6, atol=1e-7)
  trace = state[1][0].trace  # chain(add_decayed_weights, sgd=chain(trace, scale))
  for k in bufs:
    np.testing.assert_allclose(trace[k], bufs[k], rtol=1e-6, atol=1e-7)


def test_first_step_buffer_is_the_gradient():
  # PyTorch creates the buffer as d on the first step; optax's zero-initialised trace must
  # give the same update -lr * (g + wd * θ).
  opt = optim.make_optimizer(learning_rate=LR, weight_decay=WD)
  params, grads = _params(), _grads(0)
  updates, _ = opt.base.update(grads, opt.base.init(params), params)
  for k in params:
    np.testing.assert_allclose(updates[k], -LR * (grads[k] + WD * params[k]), rtol=1e-6)


def test_clipping_only_in_tx():
  clip = 0.5
  opt = optim.make_optimizer(learning_rate=LR, weight_decay=WD, grad_clip=clip)
  params = _params()
  grads = jax.tree.map(lambda g: 10.0 * g, _grads(1))
  norm = float(optax.tree.norm(grads))
  assert norm > clip
  state = opt.tx.init(params)
  tx_updates, _ = opt.tx.update(grads, state, params)
  base_updates, _ = opt.base.update(grads, opt.base_state(state), params)
  for k in params:
    np.testing.assert_allclose(
      tx_updates[k], -LR * (grads[k] * clip / norm + WD * params[k]), rtol=1e-5
    )
    np.testing.assert_allclose(base_updates[k], -LR * (grads[k] + WD * params[k]), rtol=1e-5)
  # No clipping configured: tx is the base itself.
  plain = optim.make_optimizer(learning_rate=LR)
  assert plain.tx is plain.base
  s = plain.tx.init(params)
  assert plain.base_state(s) is s


def test_base_state_shares_momentum_buffer():
  opt = optim.make_optimizer(learning_rate=LR, weight_decay=WD, grad_clip=100.0)
  params = _params()
  state = opt.tx.init(params)
  grads_seq = [_grads(s) for s in range(3)]
  for grads in grads_seq:  # the clip threshold is never reached: tx == base here
    updates, state = opt.tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  base_state = opt.base_state(state)
  assert base_state is state[1]
  _, bufs = _torch_sgd(_params(), grads_seq, [LR] * 3, momentum=MOMENTUM, weight_decay=WD)
  for k in bufs:
    np.testing.assert_allclose(base_state[1][0].trace[k], bufs[k], rtol=1e-6, atol=1e-7)
  # The virtual step with the extracted state is the real (unclipped) next step.
  g = _grads(7)
  virtual, _ = opt.base.update(g, base_state, params)
  real, _ = opt.tx.update(g, state, params)
  for k in params:
    np.testing.assert_allclose(virtual[k], real[k], rtol=1e-6)
    want = -LR * (MOMENTUM * bufs[k] + np.asarray(g[k]) + WD * np.asarray(params[k]))
    np.testing.assert_allclose(virtual[k], want, rtol=1e-5, atol=1e-7)


def test_linear_in_grad_flags_and_adam():
  assert optim.make_optimizer(learning_rate=LR).linear_in_grad
  for name in ("adam", "adamw"):
    opt = optim.make_optimizer(name=name, learning_rate=1e-3, grad_clip=1.0)
    assert not opt.linear_in_grad and opt.name == name
    params = _params()
    state = opt.tx.init(params)
    updates, state = opt.tx.update(_grads(0), state, params)
    # Adam's first step is ~ -lr * sign(g) (plus the decay term): not linear in g.
    u2, _ = opt.base.update(
      jax.tree.map(lambda g: 2 * g, _grads(0)), opt.base_state(opt.tx.init(params)), params
    )
    assert not np.allclose(u2["w"], 2 * updates["w"], rtol=1e-2)


def test_bad_arguments():
  with pytest.raises(ValueError, match="name"):
    optim.make_optimizer(name="rmsprop", learning_rate=LR)
  with pytest.raises(ValueError, match="grad_clip"):
    optim.make_optimizer(learning_rate=LR, grad_clip=0.0)
  with pytest.raises(ValueError, match="momentum"):
    optim.make_optimizer(learning_rate=LR, momentum=1.5)
