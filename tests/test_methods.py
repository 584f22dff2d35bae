"""The method registry and interface: every method builds, steps, predicts; docs/library.md's
"adding a method" example works as written."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from metadcseg_jax import methods
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.methods import base

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _batch(config, b=4, bv=2, seed=0):
  rng = np.random.default_rng(seed)
  s, c = config.data.size, config.data.channels
  label = (np.add.outer(np.arange(s), np.arange(s)) % 11 < 5).astype(np.int32)
  return {
    "image": jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32),
    "noisy_label": jnp.asarray(np.stack([label] * b)),
    "meta_image": jnp.asarray(rng.standard_normal((bv, s, s, c)), jnp.float32),
    "meta_label": jnp.asarray(np.stack([label] * bv)),
  }


def test_registry_names_and_unknown_method():
  assert methods.NAMES == (
    "ce",
    "gce",
    "sce",
    "coteaching",
    "jocor",
    "gsdnet",
    "dale",
    "l2b",
    "metadcseg",
  )
  assert all(methods.REGISTRY[n].name == n for n in methods.NAMES)
  config = tiny.get_config()
  config.method = "nope"
  with pytest.raises(ConfigError, match="unknown, choose one of"):
    methods.create(config, steps_per_epoch=5)


def test_phases():
  config = tiny.get_config()
  config.train.warmup_epochs = 2
  for name, phases in (("ce", ["train"] * 3), ("metadcseg", ["warmup", "warmup", "main"])):
    config.method = name
    m = methods.create(config, steps_per_epoch=5)
    assert [m.phase(e) for e in range(3)] == phases


def test_lr_schedule_counts_updates_not_steps():
  """L2B's extra clean step makes two optimizer updates per step; the learning rate still
  decays per epoch (a schedule on the update count would decay twice as fast)."""
  config = tiny.get_config()
  config.method = "l2b"
  plain = methods.create(config, steps_per_epoch=5)
  config = tiny.get_config()
  config.method = "l2b"
  config.meta.extra_clean_step = True
  extra = methods.create(config, steps_per_epoch=5)
  assert extra.updates_per_step() == 2
  for step in (0, 4, 5, 9, 10, 23):
    assert extra.learning_rate(step) == pytest.approx(plain.learning_rate(step))
    # The optimizer's own count: two updates per step.
    assert float(extra.schedule(2 * step + 1)) == pytest.approx(plain.learning_rate(step))


def test_readme_example_adds_a_method_in_one_file(monkeypatch, tmp_path):
  readme = (ROOT / "docs" / "library.md").read_text()
  block = re.search(r"```python\n(# metadcseg_jax/methods/focal\.py\n.*?)```", readme, re.S)
  assert block, "docs/library.md's 'adding a method' example is missing"
  namespace = {}
  exec(compile(block.group(1), "README focal.py", "exec"), namespace)  # pylint: disable=exec-used
  focal_cls = namespace["Focal"]
  assert issubclass(focal_cls, base.SingleNetworkMethod)
  monkeypatch.setitem(methods.REGISTRY, "focal", focal_cls)
  config = tiny.get_config()
  config.method = "focal"
  config.model.name = "unet"  # compiles in a fraction of the U-Net++'s time
  method = methods.create(config, steps_per_epoch=5)
  state = method.init_state(jax.random.PRNGKey(0))
  step = jax.jit(method.train_step(method.phase(0)))
  new_state, metrics = step(state, _batch(config), jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
  probs = method.predict(new_state, _batch(config)["image"], variant="ema")
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_ema_keeps_its_own_batchnorm_statistics():
  """MetaDCSeg §4.1: the EMA model is evaluated with an EMA of the BatchNorm statistics, not
  with the raw model's."""
  config = tiny.get_config()
  config.method, config.model.name = "ce", "unet"
  method = methods.create(config, steps_per_epoch=5)
  step = jax.jit(method.train_step("train"))
  state = method.init_state(jax.random.PRNGKey(0))
  decay = config.train.ema_decay
  for i in range(2):
    prev = state.ema_batch_stats
    state, _ = step(state, _batch(config, seed=i), jax.random.PRNGKey(i))
    want = jax.tree.map(lambda e, b: decay * e + (1 - decay) * b, prev, state.batch_stats)
    for got, exp in zip(jax.tree.leaves(state.ema_batch_stats), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-7)
  images = _batch(config)["image"]
  ema = method.predict(state, images, variant="ema")
  swapped = state.replace(ema_batch_stats=state.batch_stats)
  assert not np.allclose(ema, method.predict(swapped, images, variant="ema"))
