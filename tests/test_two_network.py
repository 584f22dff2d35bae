"""Co-teaching and JoCoR: the forget-rate ramp, small-loss selection, the symmetric KL and the
joint loss against plain numpy; each step against an independent route (two CE steps where the
selection keeps every pixel, explicit masks where it does not)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import tiny
from metadcseg_jax import methods
from metadcseg_jax.core import losses
from metadcseg_jax.methods import jocor
from metadcseg_jax.methods import two_network

STEPS_PER_EPOCH = 5


def test_forget_rate_is_coteachings_linspace_then_flat():
  rate, tk = 0.3, 10
  want = list(np.linspace(0, rate, tk)) + [rate] * 5
  got = [float(two_network.forget_rate(e, rate=rate, num_gradual=tk)) for e in range(tk + 5)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # GSD-Net's τ·min(e/19, 1) is T_k = 20.
  assert float(two_network.forget_rate(19, rate=0.2, num_gradual=20)) == pytest.approx(0.2)
  assert float(two_network.forget_rate(5, rate=0.2, num_gradual=20)) == pytest.approx(0.2 * 5 / 19)
  with pytest.raises(ValueError, match="forget rate"):
    two_network.forget_rate(0, rate=1.0, num_gradual=10)


def test_small_loss_mask_keeps_the_smallest_share_ties_by_position():
  loss = jnp.array([[[0.5, 0.1], [0.3, 0.1]], [[0.9, 0.2], [0.1, 0.7]]])  # (2,2,2), N = 8
  # keep 0.5 -> 4 pixels: the three 0.1s (positions 1, 3, 6) and 0.2 (position 5).
  got = np.asarray(two_network.small_loss_mask(loss, 0.5)).reshape(-1)
  np.testing.assert_array_equal(got, [0, 1, 0, 1, 0, 1, 1, 0])
  # keep 0.3 -> floor(2.4) = 2: the first two 0.1s in position order.
  got = np.asarray(two_network.small_loss_mask(loss, 0.3)).reshape(-1)
  np.testing.assert_array_equal(got, [0, 1, 0, 1, 0, 0, 0, 0])
  assert float(jnp.sum(two_network.small_loss_mask(loss, 1.0))) == 8
  assert float(jnp.sum(two_network.small_loss_mask(loss, 0.0))) == 0
  # Random losses: the kept set is exactly numpy's stable argsort prefix.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 7, 5)).astype(np.float32)
  got = np.asarray(jax.jit(two_network.small_loss_mask)(x, 0.37)).reshape(-1)
  want = np.zeros(x.size)
  want[np.argsort(x.reshape(-1), kind="stable")[: int(np.floor(np.float32(0.37) * x.size))]] = 1
  np.testing.assert_array_equal(got, want)


def test_symmetric_kl_and_jocor_loss_against_numpy():
  rng = np.random.default_rng(1)
  l1 = rng.standard_normal((2, 3, 4, 3))
  l2 = rng.standard_normal((2, 3, 4, 3))
  y = rng.integers(0, 3, (2, 3, 4))

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p1, p2 = softmax(l1), softmax(l2)
  kl = lambda p, q: np.sum(p * np.log(p / q), -1)
  sym = kl(p1, p2) + kl(p2, p1)
  got = two_network.symmetric_kl_map(jnp.asarray(l1, jnp.float32), jnp.asarray(l2, jnp.float32))
  np.testing.assert_allclose(got, sym, rtol=1e-4, atol=1e-6)
  pick = lambda p: -np.log(np.take_along_axis(p, y[..., None], -1)[..., 0])
  lam = 0.7
  want = (1 - lam) * (pick(p1) + pick(p2)) + lam * sym
  got = jocor.jocor_pixel_loss(
    jnp.asarray(l1, jnp.float32), jnp.asarray(l2, jnp.float32), jnp.asarray(y), co_lambda=lam
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_forget_rate_from_the_data():
  config = tiny.get_config()
  config.method = "jocor"
  info = {"noise": {"kind": "l2b40", "pixel_error_rate": 0.154}}
  resolved, settings = methods.with_data_settings(config, info)
  assert settings == {"coteach.forget_rate": 0.154} and resolved.coteach.forget_rate == 0.154
  assert config.coteach.forget_rate == 0.1  # the caller's config is left alone
  # Clean labels: nothing to forget; above the cap: capped.
  assert methods.with_data_settings(config, {"noise": {"kind": "none"}})[1] == {
    "coteach.forget_rate": 0.0
  }
  info["noise"]["pixel_error_rate"] = 0.9
  assert methods.with_data_settings(config, info)[0].coteach.forget_rate == 0.5
  config.coteach.auto_forget_rate = False
  assert methods.with_data_settings(config, info) == (config, {})
  config.method = "ce"  # methods without data settings: the config unchanged
  assert methods.with_data_settings(config, info) == (config, {})


def _config(name, **coteach):
  config = tiny.get_config()
  config.method = name
  config.model.name = "unet"  # a fraction of the U-Net++'s compile time
  config.train.grad_clip = 0.0  # clipping would hide a wrong gradient scale
  config.coteach.auto_forget_rate = False
  for k, v in coteach.items():
    config.coteach[k] = v
  return config


def _batch(config, b=4, seed=0):
  rng = np.random.default_rng(seed)
  s = config.data.size
  label = (np.add.outer(np.arange(s), np.arange(s)) % 11 < 5).astype(np.int32)
  flip = rng.random((b, s, s)) < 0.2
  return {
    "image": jnp.asarray(rng.standard_normal((b, s, s, 1)), jnp.float32),
    "noisy_label": jnp.asarray(np.where(flip, 1 - label, label)),
  }


@pytest.fixture(scope="module")
def trained():
  """Each method, its initial state, its jitted step and one step's outputs at epoch 0 and
  at an epoch past the ramp (where a share τ of the pixels is dropped)."""
  out = {}
  for name in ("coteaching", "jocor"):
    config = _config(name, forget_rate=0.3, num_gradual=3, co_lambda=0.6)
    m = methods.create(config, steps_per_epoch=STEPS_PER_EPOCH)
    state = m.init_state(jax.random.PRNGKey(0))
    step = jax.jit(m.train_step("train"))
    batch = _batch(config)
    late = state.replace(step=jnp.asarray(4 * STEPS_PER_EPOCH, jnp.int32))  # epoch 4 > T_k
    out[name] = (m, state, step, batch, step(state, batch, None), step(late, batch, None))
  return out


def _ce_grads(m, params, stats, batch, mask=None):
  def loss(p):
    (logits, _), _ = m.forward(p, stats, batch["image"])
    ce = losses.ce_map(logits, batch["noisy_label"])
    return jnp.mean(ce) if mask is None else jnp.sum(ce * mask) / jnp.sum(mask)

  return jax.grad(loss)(params)


def _ce_map(m, params, stats, batch):
  (logits, _), _ = m.forward(params, stats, batch["image"])
  return losses.ce_map(logits, batch["noisy_label"]), logits


def _assert_tree_close(a, b, rtol=2e-4, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _sgd_update(m, params, opt_state, grads):
  updates, _ = m.optimizer.tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", ["coteaching", "jocor"])
def test_every_pixel_kept_at_epoch_0(trained, name):
  """τ_0 = 0: Co-teaching is two independent CE steps; JoCoR's gradient for network 1 is
  that of (1 − λ)·mean CE1 + λ·mean symmetric KL."""
  m, state, _, batch, (new, metrics), _ = trained[name]
  assert float(metrics["keep_share"]) == 1.0
  for i in (0, 1):
    params, stats = state.params[i], state.batch_stats[i]
    if name == "coteaching":
      grads = _ce_grads(m, params, stats, batch)
    else:
      other = jax.lax.stop_gradient(
        _ce_map(m, state.params[1 - i], state.batch_stats[1 - i], batch)[1]
      )

      def loss(p):
        ce, logits = _ce_map(m, p, stats, batch)
        sym = two_network.symmetric_kl_map(logits, other)
        return jnp.mean(0.4 * ce + 0.6 * sym)

      grads = jax.grad(loss)(params)
    _assert_tree_close(new.params[i], _sgd_update(m, params, state.opt_state[i], grads))
    assert not np.allclose(jax.tree.leaves(new.params[i])[0], jax.tree.leaves(params)[0]), (
      "parameters did not move"
    )


def test_coteaching_learns_from_the_partners_small_loss_pixels(trained):
  m, state, _, batch, _, (new, metrics) = trained["coteaching"]
  assert float(metrics["keep_share"]) == pytest.approx(0.7, abs=1e-3)
  assert np.isfinite(float(metrics["loss"]))
  late = state.replace(step=jnp.asarray(4 * STEPS_PER_EPOCH, jnp.int32))
  ce = [_ce_map(m, late.params[i], late.batch_stats[i], batch)[0] for i in (0, 1)]
  picks = [two_network.small_loss_mask(c, 0.7) for c in ce]
  for i in (0, 1):
    grads = _ce_grads(m, late.params[i], late.batch_stats[i], batch, mask=picks[1 - i])
    want = _sgd_update(m, late.params[i], late.opt_state[i], grads)
    _assert_tree_close(new.params[i], want)
  # The partners disagree on some pixels (else the cross update would be plain self-selection).
  assert 0.5 < float(metrics["selection_overlap"]) < 1.0


def test_jocor_drops_the_largest_joint_losses(trained):
  m, state, _, batch, _, (new, metrics) = trained["jocor"]
  assert float(metrics["keep_share"]) == pytest.approx(0.7, abs=1e-3)
  late = state.replace(step=jnp.asarray(4 * STEPS_PER_EPOCH, jnp.int32))

  def joint(params):
    out = [_ce_map(m, params[i], late.batch_stats[i], batch)[1] for i in (0, 1)]
    return jocor.jocor_pixel_loss(*out, batch["noisy_label"], co_lambda=0.6)

  pick = two_network.small_loss_mask(joint(late.params), 0.7)
  grads = jax.grad(lambda p: jnp.sum(joint(p) * pick) / jnp.sum(pick))(late.params)
  for i in (0, 1):
    _assert_tree_close(new.params[i], _sgd_update(m, late.params[i], late.opt_state[i], grads[i]))


@pytest.mark.parametrize("name", ["coteaching", "jocor"])
def test_prediction_fuses_both_networks_by_their_logits(trained, name):
  m, state, *_ = trained[name]
  x = _batch(m.config)["image"]
  l1, l2 = m.logits_pair(state, x)
  np.testing.assert_allclose(m.predict(state, x), jax.nn.softmax(l1 + l2, -1), rtol=1e-5, atol=1e-6)
  assert not np.allclose(l1, l2)  # two different initialisations
  e1, _ = m.logits_pair(state, x, variant="ema")
  np.testing.assert_allclose(e1, l1, rtol=1e-5, atol=1e-5)  # the EMA starts at the parameters
