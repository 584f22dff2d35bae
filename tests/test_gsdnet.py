"""GSD-Net: each component against a hand-worked example or an independent computation, and one
jitted step of each phase on the tiny config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.methods import base
from metadcseg_jax.methods import gsdnet
from metadcseg_jax.methods import two_network

STEPS_PER_EPOCH = 3


def _config(**gsd):
  config = tiny.get_config()
  config.model.name = "unet"  # a fraction of the U-Net++'s compile time
  config.coteach = two_network.default_config()
  config.gsdnet = gsdnet.default_config()
  config.method = "gsdnet"
  for k, v in gsd.items():
    config.gsdnet[k] = v
  return config


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- distance weight


def test_distance_maps_of_a_square_by_hand():
  y = np.zeros((5, 5), np.int32)
  y[1:4, 1:4] = 1
  d_fg, d_bg = gsdnet.distance_maps(y, max_distance=10.0)
  # Foreground: the ring touches background (1), the centre is 2 away.
  want_fg = np.zeros((5, 5))
  want_fg[1:4, 1:4] = 1
  want_fg[2, 2] = 2
  # Background: the border of the 5x5; corners are diagonal to the square's corners.
  r2 = np.sqrt(2)
  want_bg = np.array(
    [[r2, 1, 1, 1, r2], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [r2, 1, 1, 1, r2]]
  )
  np.testing.assert_allclose(d_fg, want_fg, rtol=1e-6)
  np.testing.assert_allclose(d_bg, want_bg, rtol=1e-6)
  assert d_fg.dtype == np.float32 and d_bg.dtype == np.float32
  # W = clip(d_fg + d_bg, 1, cap): the cap bites at the centre only; truncation floors √2.
  w = np.asarray(gsdnet.distance_weight(d_fg[None], d_bg[None], 1.5))[0]
  np.testing.assert_allclose(w, np.minimum(want_fg + want_bg, 1.5), rtol=1e-6)
  w = np.asarray(gsdnet.distance_weight(d_fg[None], d_bg[None], 11.0, truncate=True))[0]
  np.testing.assert_allclose(w, np.floor(want_fg + want_bg))


def test_distance_maps_clip_at_max_distance_on_a_strip():
  y = np.zeros((1, 30), np.int32)
  y[0, :15] = 1  # boundary between columns 14 and 15
  d_fg, d_bg = gsdnet.distance_maps(y, max_distance=10.0)
  j = np.arange(30)
  np.testing.assert_allclose(d_fg[0], np.where(j < 15, np.minimum(15 - j, 10), 0))
  np.testing.assert_allclose(d_bg[0], np.where(j >= 15, np.minimum(j - 14, 10), 0))


def test_distance_maps_against_brute_force_and_empty_masks():
  rng = np.random.default_rng(0)
  y = (rng.random((9, 11)) < 0.3).astype(np.int32)
  d_fg, d_bg = gsdnet.distance_maps(y, max_distance=3.0)
  pts = np.argwhere(np.ones_like(y))
  dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))  # (N, N)
  flat = y.reshape(-1)
  to_bg = np.where(flat[None, :] == 0, dist, np.inf).min(1)
  to_fg = np.where(flat[None, :] == 1, dist, np.inf).min(1)
  np.testing.assert_allclose(d_fg.reshape(-1), np.where(flat == 1, np.minimum(to_bg, 3), 0))
  np.testing.assert_allclose(d_bg.reshape(-1), np.where(flat == 0, np.minimum(to_fg, 3), 0))
  # No boundary: the distance to the other class is unbounded, i.e. D.
  d_fg, d_bg = gsdnet.distance_maps(np.zeros((4, 4), np.int32), max_distance=7.0)
  assert np.all(d_fg == 0) and np.all(d_bg == 7)
  d_fg, d_bg = gsdnet.distance_maps(np.ones((4, 4), np.int32), max_distance=7.0)
  assert np.all(d_fg == 7) and np.all(d_bg == 0)


def test_weight_cap_is_eleven_minus_epoch_tens():
  epochs = [0, 9, 10, 19, 20, 95, 99, 100, 150]
  got = [float(gsdnet.weight_cap(e, max_distance=10.0, cap_every=10.0)) for e in epochs]
  assert got == [11, 11, 10, 10, 9, 2, 2, 1, 1]
  # A 2-epoch run scales the step to 0.2 epochs: 11, then 11 - 5.
  got = [float(gsdnet.weight_cap(e, max_distance=10.0, cap_every=0.2)) for e in (0, 1, 2)]
  assert got == [11, 6, 1]


def test_scaled_settings():
  config = _config()
  config.train.num_epochs, config.data.size = 100, 256
  assert gsdnet.scaled_settings(config) == {
    "num_gradual": 20,
    "sglr_start": 30,
    "cap_every": 10.0,
    "slic_segments": 1024,
  }
  config.train.num_epochs, config.data.size = 30, 64
  assert gsdnet.scaled_settings(config) == {
    "num_gradual": 6,
    "sglr_start": 9,
    "cap_every": 3.0,
    "slic_segments": 64,
  }
  config.gsdnet.scale_schedule = False
  config.gsdnet.scale_slic_with_size = False
  s = gsdnet.scaled_settings(config)
  assert (s["num_gradual"], s["sglr_start"], s["cap_every"], s["slic_segments"]) == (
    20,
    30,
    10,
    1024,
  )


# ----------------------------------------------------------------------------- SGLR


def test_superpixel_pseudo_labels_by_hand():
  seg0 = np.array([[0, 0, 5, 5], [0, 0, 5, 5], [7, 7, 15, 15], [7, 7, 15, 15]])
  p0 = np.array(
    [
      [0.75, 0.75, 0.25, 0.25],  # ids 0 / 5
      [0.5, 0.5, 0.5, 0.5],
      [0.25, 0.75, 1.0, 0.0],  # ids 7 / 15
      [0.5, 0.5, 0.0, 0.75],
    ]
  )
  # Means: id 0 0.625 -> 1; id 5 0.375 -> 0; id 7 exactly 0.5 -> 1 (>=); id 15 0.4375 -> 0
  # although one of its pixels is certain foreground.
  want0 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
  # A superpixel need not be connected: a checkerboard of two ids.
  seg1 = np.indices((4, 4)).sum(0) % 2
  p1 = np.where(seg1 == 0, 0.75, 0.25)
  want1 = 1 - seg1
  got = gsdnet.superpixel_pseudo_label(
    jnp.asarray(np.stack([p0, p1]), jnp.float32), jnp.asarray(np.stack([seg0, seg1]), jnp.int32)
  )
  np.testing.assert_array_equal(got, np.stack([want0, want1]))
  assert got.dtype == jnp.int32
  got = gsdnet.superpixel_pseudo_label(
    jnp.asarray(p0[None], jnp.float32), jnp.asarray(seg0[None]), threshold=0.6
  )
  np.testing.assert_array_equal(got[0], (want0 * (seg0 == 0)))


def test_superpixels_respect_a_sharp_edge():
  rng = np.random.default_rng(0)
  grey = np.where(np.arange(32)[None, :] < 16, -1.0, 1.0) * np.ones((32, 1))
  grey = grey + 0.05 * rng.standard_normal((32, 32))
  rgb = np.stack([grey, np.zeros_like(grey), -grey], -1)
  for image in (grey[..., None], rgb):
    seg = gsdnet.superpixels(image, n_segments=16, compactness=10.0, sigma=1.0)
    assert seg.shape == (32, 32) and seg.dtype == np.int32
    assert seg.min() == 0 and seg.max() < 32 * 32
    assert 4 <= len(np.unique(seg)) <= 40
    # Smoothing (sigma 1) blurs columns 15-16; no superpixel reaches across that blur, and
    # nearly every pixel lies in a superpixel on one side.
    pure = 0
    for s in np.unique(seg):
      cols = np.nonzero(seg == s)[1]
      assert cols.min() >= 14 or cols.max() <= 17, f"superpixel {s} crosses the edge"
      pure += cols.size if (cols.max() < 16 or cols.min() >= 16) else 0
    assert pure >= 0.9 * seg.size


# ----------------------------------------------------------------------------- KT


def test_knowledge_transfer_by_hand():
  y = np.array(
    [
      [[1, 1, 1], [1, 0, 0]],  # share 4/6 > 0.5: keeps its background
      [[0, 0, 0], [0, 0, 1]],  # 1/6: keeps its foreground
      [[0, 1, 1], [0, 0, 0]],  # 2/6
      [[1, 0, 1], [0, 1, 0]],  # exactly 0.5 is not above: keeps its foreground
    ]
  )
  keep = gsdnet.transfer_mask(jnp.asarray(y), share_threshold=0.5)
  want_keep = [
    [[0, 0, 0], [0, 1, 1]],
    [[0, 0, 0], [0, 0, 1]],
    [[0, 1, 1], [0, 0, 0]],
    [[1, 0, 1], [0, 1, 0]],
  ]
  np.testing.assert_array_equal(keep, want_keep)
  images = np.arange(1.0, 5.0)[:, None, None, None] * np.ones((4, 2, 3, 2))  # image i is i + 1
  weights = 10.0 * np.arange(1.0, 5.0)[:, None, None] * np.ones((4, 2, 3))
  partner = jnp.array([1, 2, 3, 0])  # rolled by one
  xm, ym, wm = gsdnet.knowledge_transfer(
    keep, partner, jnp.asarray(images), jnp.asarray(y), jnp.asarray(weights)
  )
  want_x = np.array(
    [
      [[2, 2, 2], [2, 1, 1]],
      [[3, 3, 3], [3, 3, 2]],
      [[4, 3, 3], [4, 4, 4]],
      [[4, 1, 4], [1, 4, 1]],
    ]
  )
  want_y = [
    [[0, 0, 0], [0, 0, 0]],
    [[0, 1, 1], [0, 0, 1]],
    [[1, 1, 1], [0, 1, 0]],
    [[1, 1, 1], [1, 1, 0]],
  ]
  np.testing.assert_array_equal(xm, np.repeat(want_x[..., None], 2, -1))
  np.testing.assert_array_equal(ym, want_y)
  assert ym.dtype == jnp.asarray(y).dtype
  np.testing.assert_array_equal(wm, 10 * want_x)


def test_color_jitter():
  rng = np.random.default_rng(0)
  for c in (1, 3):
    x = jnp.asarray(rng.standard_normal((3, 8, 8, c)), jnp.float32)
    same = gsdnet.color_jitter(x, jax.random.PRNGKey(0), strength=0.0)
    np.testing.assert_allclose(same, x, atol=1e-5)
    a = gsdnet.color_jitter(x, jax.random.PRNGKey(1), strength=0.5)
    b = gsdnet.color_jitter(x, jax.random.PRNGKey(1), strength=0.5)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and not np.allclose(a, x, atol=1e-2)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    assert np.all(a >= lo - 1e-6) and np.all(a <= hi + 1e-6)
  with pytest.raises(ValueError, match="jitter strength"):
    gsdnet.color_jitter(x, jax.random.PRNGKey(0), strength=2.0)


# ----------------------------------------------------------------------------- losses


def test_selection_pixel_loss_against_numpy():
  rng = np.random.default_rng(1)
  l1, l2 = rng.standard_normal((2, 2, 3, 4, 2))
  y = rng.integers(0, 2, (2, 3, 4))
  p1, p2 = _softmax(l1), _softmax(l2)
  kl = lambda p, q: np.sum(p * np.log(p / q), -1)
  ce = lambda p: -np.log(np.take_along_axis(p, y[..., None], -1)[..., 0])
  want = ce(p1) + ce(p2) + 0.5 * (kl(p1, p2) + kl(p2, p1))
  got = gsdnet.selection_pixel_loss(
    jnp.asarray(l1, jnp.float32), jnp.asarray(l2, jnp.float32), jnp.asarray(y), co_lambda=0.5
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_class_dice_loss_by_hand():
  p_fg = np.array([[[1.0, 0.5]]])  # (1,1,2)
  probs = jnp.asarray(np.stack([1 - p_fg, p_fg], -1), jnp.float32)
  y = jnp.array([[[1, 0]]])
  # Foreground: (2·1 + 1) / (1.5 + 1 + 1); background: (2·0.5 + 1) / (0.5 + 1 + 1).
  want = 1 - (3 / 3.5 + 2 / 2.5) / 2
  np.testing.assert_allclose(gsdnet.class_dice_loss(probs, y), [want], rtol=1e-6)
  perfect = jax.nn.one_hot(y, 2)
  np.testing.assert_allclose(gsdnet.class_dice_loss(perfect, y), [0.0], atol=1e-7)


def test_transfer_losses_official_bug_is_ce_of_softmax():
  rng = np.random.default_rng(2)
  l1, l2 = 3 * rng.standard_normal((2, 2, 4, 4, 2))
  y = rng.integers(0, 2, (2, 4, 4))
  w = rng.uniform(1, 5, (2, 4, 4))
  args = [jnp.asarray(a, jnp.float32) for a in (l1, l2)] + [jnp.asarray(y), jnp.asarray(w)]
  losses_fn = jax.jit(gsdnet.transfer_losses, static_argnames="official_bugs")
  paper = losses_fn(*args, official_bugs=False)
  bug = losses_fn(*args, official_bugs=True)
  pick = lambda p: np.take_along_axis(p, y[..., None], -1)[..., 0]
  for i, logits in ((1, l1), (2, l2)):
    ce_paper = -np.log(pick(_softmax(logits)))
    ce_bug = -np.log(pick(_softmax(_softmax(logits))))  # softmax fed where logits belong
    np.testing.assert_allclose(paper[f"ce_{i}"], 0.5 * np.mean(ce_paper * w), rtol=1e-5)
    np.testing.assert_allclose(bug[f"ce_{i}"], 0.5 * np.mean(ce_bug * w), rtol=1e-5)
    dice = np.asarray(gsdnet.class_dice_loss(jnp.asarray(_softmax(logits)), jnp.asarray(y)))
    np.testing.assert_allclose(paper[f"dice_{i}"], 0.5 * w.mean() * dice.mean(), rtol=1e-5)
    assert float(paper[f"dice_{i}"]) == pytest.approx(float(bug[f"dice_{i}"]), rel=1e-6)
  p1, p2 = _softmax(l1), _softmax(l2)
  sym = np.sum((p1 - p2) * (np.log(p1) - np.log(p2)), -1)
  np.testing.assert_allclose(paper["consistency"], 0.5 * np.mean(sym * w), rtol=1e-4)
  assert float(bug["consistency"]) == pytest.approx(float(paper["consistency"]), rel=1e-6)
  # The bug bounds the per-pixel CE to [log(1 + 1/e), log(1 + e)]: a confidently wrong
  # prediction costs about 1.31 instead of about 40.
  wrong = jnp.array([[[[20.0, -20.0]]]])
  ones = jnp.ones((1, 1, 1))
  y1 = jnp.ones((1, 1, 1), jnp.int32)
  got = losses_fn(wrong, wrong, y1, ones, official_bugs=True)["ce_1"]
  assert float(got) == pytest.approx(0.5 * np.log1p(np.e), rel=1e-5)
  got = losses_fn(wrong, wrong, y1, ones, official_bugs=False)["ce_1"]
  assert float(got) == pytest.approx(0.5 * 40.0, rel=1e-5)


# ----------------------------------------------------------------------------- the method


def _examples(size, n):
  rng = np.random.default_rng(3)
  out = []
  for i in range(n):
    y = np.zeros((size, size), np.int32)
    y[6 + i : 20 + i, 4 + 2 * i : 18 + 2 * i] = 1
    image = (2.0 * y + rng.standard_normal((size, size)))[..., None].astype(np.float32)
    out.append({"image": image, "noisy_label": y})
  return out


def test_config_errors_and_phases():
  config = _config()
  config.data.num_classes = 3
  with pytest.raises(ConfigError, match="binary"):
    gsdnet.GSDNet(config, steps_per_epoch=STEPS_PER_EPOCH)
  config = _config()
  config.train.batch_size = 1
  with pytest.raises(ConfigError, match="batch_size"):
    gsdnet.GSDNet(config, steps_per_epoch=STEPS_PER_EPOCH)
  method = gsdnet.GSDNet(_config(), steps_per_epoch=STEPS_PER_EPOCH)
  # tiny: 2 epochs, so SGLR starts at round(0.3 · 2) = 1.
  assert [method.phase(e) for e in range(3)] == ["select", "refine", "refine"]


def test_example_transform_and_official_segments():
  config = _config()
  method = gsdnet.GSDNet(config, steps_per_epoch=STEPS_PER_EPOCH)
  ex = _examples(config.data.size, 1)[0]
  out = method.example_transform(ex)
  assert set(out) == {"image", "noisy_label", "edt_fg", "edt_bg", "superpixels"}
  assert out["superpixels"].dtype == np.int32 and out["superpixels"].shape == (32, 32)
  np.testing.assert_array_equal(out["superpixels"], method.segments(out))
  d_fg, _ = gsdnet.distance_maps(ex["noisy_label"], max_distance=10.0)
  np.testing.assert_array_equal(out["edt_fg"], d_fg)
  # The released code's SGLR averages over bands of equal integer distance instead.
  buggy = gsdnet.GSDNet(_config(official_bugs=True), steps_per_epoch=STEPS_PER_EPOCH)
  out = buggy.example_transform(ex)
  assert "superpixels" not in out
  bands = np.asarray(buggy.segments(out))
  np.testing.assert_array_equal(bands, np.floor(out["edt_fg"] + out["edt_bg"]))
  assert set(np.unique(bands)) <= set(range(1, 11))


@pytest.fixture(scope="module")
def setup():
  config = _config()
  method = gsdnet.GSDNet(config, steps_per_epoch=STEPS_PER_EPOCH)
  examples = [method.example_transform(e) for e in _examples(32, config.train.batch_size)]
  batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
  state = method.init_state(jax.random.PRNGKey(0))
  return method, batch, state


@pytest.fixture(scope="module")
def steps(setup):
  method, batch, state = setup
  out = {}
  starts = {"select": 0, "refine": method.sglr_start * STEPS_PER_EPOCH}
  for phase, step in starts.items():
    before = state.replace(step=jnp.asarray(step, jnp.int32))
    fn = jax.jit(method.train_step(phase), compiler_options=base.RUN_ONCE_COMPILE)
    after, metrics = fn(before, batch, jax.random.PRNGKey(1))
    out[phase] = (before, after, jax.device_get(metrics))
  return out


@pytest.mark.parametrize("phase", ["select", "refine"])
def test_train_step_is_finite_and_moves_both_networks(steps, phase):
  before, after, metrics = steps[phase]
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(after.step) == int(before.step) + 1
  for i in (0, 1):
    moved = jax.tree.map(
      lambda a, b: bool(np.any(a != b)), *jax.device_get((before.params[i], after.params[i]))
    )
    assert any(jax.tree.leaves(moved)), f"network {i + 1} did not change"
    assert metrics[f"grad_norm_{i + 1}"] > 0
  has_transfer = "loss_ce_1" in metrics
  assert has_transfer == (phase == "refine")
  if phase == "select":  # epoch 0: τ_0 = 0 and the full cap
    assert metrics["keep_share"] == 1.0 and metrics["w_cap"] == 11.0
    assert metrics["loss"] == pytest.approx(metrics["loss_select"])
  else:  # epoch 1 of 2: τ = 0.1, cap 11 − ⌊1 / 0.2⌋
    assert metrics["keep_share"] == pytest.approx(0.9, abs=1e-3) and metrics["w_cap"] == 6.0
    terms = ("select", "ce_1", "ce_2", "dice_1", "dice_2", "consistency")
    assert metrics["loss"] == pytest.approx(sum(metrics[f"loss_{k}"] for k in terms), rel=1e-5)
    # SGLR relabels only unselected pixels.
    assert 0.0 <= metrics["relabel_share"] <= 1.0 - metrics["keep_share"] + 1e-6


def test_diagnostics(setup, steps):
  method, batch, _ = setup
  diag = jax.jit(method.diagnostics, compiler_options=base.RUN_ONCE_COMPILE)
  for phase, active in (("select", 0.0), ("refine", 1.0)):
    before = steps[phase][0]
    d = jax.device_get(diag(before, batch))
    assert all(np.isfinite(v) for v in d.values()), d
    for key in ("keep_share", "w_mean", "relabel_share", "disagree_share", "sym_kl"):
      assert key in d
    assert d["sglr_active"] == active
    assert 1.0 <= d["w_mean"] <= d["w_cap"]
  # At epoch 0 every pixel is selected, so nothing is relabelled.
  assert jax.device_get(diag(steps["select"][0], batch))["relabel_share"] == 0.0
