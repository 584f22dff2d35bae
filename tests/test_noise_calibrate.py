"""Noise levels that mean what they say: the calibration of the L2B levels per dataset."""

import json

import numpy as np
import pytest

from metadcseg_jax.data import noise
from metadcseg_jax.data import synthetic
from metadcseg_jax.data.noise import cache as noise_cache
from metadcseg_jax.data.noise import calibrate
from metadcseg_jax.errors import ConfigError


@pytest.fixture(scope="module")
def masks():
  """Synthetic lesion masks at 64 px: small objects, which the published kernels over-corrupt."""
  return synthetic.make_split(3, "train", 160, 64, 1)[1]


@pytest.mark.parametrize("kind", ["l2b20", "l2b40", "l2b60"])
def test_each_level_reaches_its_nominal_corruption(masks, kind):
  result = calibrate.calibrate(masks, kind=kind, seed=0)
  target = calibrate.NOMINAL[kind]
  assert result["within_tolerance"] and abs(result["corruption"] - target) <= 0.03
  # The result is what corrupt_masks gives with the chosen settings, on every mask.
  noisy = noise.corrupt_masks(
    masks, kind=kind, seed=0, kernel_scale=result["kernel_scale"], strength=result["strength"]
  )
  np.testing.assert_array_equal(result["noisy"], noisy)
  measured = noise.measured_corruption(masks, noisy).mean()
  assert measured == pytest.approx(result["corruption"])
  # The published kernels at this size are far off the nominal share (why calibration exists).
  published = noise.measured_corruption(masks, noise.corrupt_masks(masks, kind=kind, seed=0))
  assert abs(published.mean() - target) > 0.05


def test_corruption_grows_with_kernel_scale_and_strength(masks):
  def c(**kw):
    return noise.measured_corruption(
      masks, noise.corrupt_masks(masks, kind="l2b40", seed=0, **kw)
    ).mean()

  by_scale = [c(kernel_scale=s) for s in (0.05, 0.2, 0.5, 1.0)]
  by_strength = [c(kernel_scale=0.2, strength=u) for u in (0.25, 1.0, 2.0)]
  assert by_scale == sorted(by_scale) and by_strength == sorted(by_strength)
  # strength 1 is the paper's noise: identical masks to leaving it out.
  np.testing.assert_array_equal(
    noise.corrupt_masks(masks[:20], kind="l2b60", seed=1, strength=1.0),
    noise.corrupt_masks(masks[:20], kind="l2b60", seed=1),
  )


def test_cache_calibrates_once_and_records_it(masks, tmp_path, monkeypatch):
  def cached():
    return noise_cache.cached_noisy_labels(
      masks,
      cache_dir=tmp_path,
      dataset_key="synthetic/64",
      kind="l2b40",
      seed=0,
      options={"calibrate": True},
    )

  noisy = cached()
  rate = noise.measured_corruption(masks, noisy).mean()
  assert abs(rate - 0.40) <= 0.03
  entry = json.loads((tmp_path / "manifest.json").read_text())["noisy_l2b40_seed0.npy"]
  assert entry["options"]["calibrate"] is True
  assert entry["calibration"]["corruption"] == pytest.approx(rate)

  # The second request is served from the cache: calibrating again would fail the test.
  def no_second_search(*args, **kwargs):
    raise AssertionError("calibrated twice")

  monkeypatch.setattr(calibrate, "calibrate", no_second_search)
  np.testing.assert_array_equal(cached(), noisy)


def test_bad_requests(masks):
  with pytest.raises(ValueError, match="only the L2B levels"):
    calibrate.calibrate(masks, kind="markov_se", seed=0)
  with pytest.raises(ConfigError, match="calibrate=True is applied to a whole dataset"):
    noise.corrupt_mask(masks[0], kind="l2b20", rng=noise.mask_rng(0, 0), calibrate=True)
  with pytest.raises(ConfigError, match="strength must be in"):
    noise.corrupt_masks(masks[:2], kind="l2b20", seed=0, strength=3.0)
