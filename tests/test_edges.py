"""Tests for metadcseg_jax.core.edges: Sobel (against scipy), Canny (against scikit-image), the
detector chosen by the config, and how much of each detector's edge map is object boundary."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from skimage import feature

from metadcseg_jax.core import edges as edges_lib
from metadcseg_jax.errors import ConfigError


def test_sobel_magnitude_matches_scipy():
  x = np.random.RandomState(0).rand(9, 11, 3).astype(np.float32)
  ref = sum(np.hypot(ndimage.sobel(x[..., c], 0), ndimage.sobel(x[..., c], 1)) for c in range(3))
  np.testing.assert_allclose(edges_lib.sobel_magnitude(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)


def test_sobel_edges_fraction_step_and_flat():
  edges = jax.jit(edges_lib.sobel_edges)
  rand = np.random.RandomState(1).rand(32, 32, 3).astype(np.float32)
  assert int(edges(rand).sum()) == round(0.05 * 32 * 32)  # 51, no ties
  # A vertical step between columns 15 and 16: both columns tie at the
  # threshold and are kept (64 pixels, 6.25%), nothing else.
  step = np.zeros((32, 32, 1), np.float32)
  step[:, 16:] = 1.0
  e = np.asarray(edges(step))
  assert e.sum() == 64
  assert e[:, 15].all() and e[:, 16].all()
  # Flat image: zero magnitude is never an edge.
  assert not np.asarray(edges(np.full((32, 32, 1), 0.3, np.float32))).any()
  assert not np.asarray(edges_lib.sobel_edges(rand, top_fraction=0.0)).any()
  with pytest.raises(ValueError, match="top_fraction"):
    edges_lib.sobel_edges(rand, top_fraction=1.5)


def test_canny_matches_scikit_image_on_the_channel_mean():
  rng = np.random.RandomState(3)
  image = ndimage.gaussian_filter(rng.rand(40, 40, 3), (2, 2, 0)) * 5.0
  got = edges_lib.canny_edges(image, sigma=1.5)
  want = feature.canny(
    image.mean(-1), sigma=1.5, low_threshold=0.8, high_threshold=0.9, use_quantiles=True
  )
  np.testing.assert_array_equal(got, want)
  assert not edges_lib.canny_edges(np.ones((16, 16, 1))).any()  # flat: no edges


def test_canny_marks_the_outline_not_the_texture():
  """A disc on fine texture: Canny's smoothing puts most of its edges on the outline, where the
  top 5% of the Sobel magnitude lands largely on texture."""
  rng = np.random.RandomState(0)
  yy, xx = np.mgrid[:64, :64]
  disc = np.hypot(yy - 32, xx - 32) < 14
  image = (2.0 * disc + rng.randn(64, 64))[..., None]
  outline = disc ^ ndimage.binary_erosion(disc)
  near = ndimage.distance_transform_edt(~outline) <= 2
  canny = edges_lib.canny_edges(image, sigma=2.0)
  sobel = np.asarray(edges_lib.sobel_edges(image.astype(np.float32)))
  assert near[canny].mean() > 0.8 > 0.5 > near[sobel].mean()


def _dcd_config(**kw):
  base = dict(edges="auto", pidinet_weights="", canny_sigma=2.0, edge_top_fraction=0.05)
  return ml_collections.ConfigDict({**base, **kw})


def test_detector_from_config(tmp_path):
  canny = edges_lib.make_detector(_dcd_config())
  assert canny.name == "canny" and canny.on_host
  example = {"image": np.random.RandomState(0).randn(32, 32, 1)}
  assert canny.add_edges(example)["edges"].shape == (32, 32)
  sobel = edges_lib.make_detector(_dcd_config(edges="sobel"))
  assert not sobel.on_host
  batch = {"image": np.random.RandomState(1).rand(2, 32, 32, 1).astype(np.float32)}
  assert jax.jit(sobel.edges)(batch).shape == (2, 32, 32)
  with pytest.raises(ConfigError, match="no such file"):
    edges_lib.make_detector(_dcd_config(edges="pidinet", pidinet_weights=str(tmp_path / "x")))
  with pytest.raises(ConfigError, match="choose one of"):
    edges_lib.make_detector(_dcd_config(edges="hed"))
  assert edges_lib.resolve("auto", "/some/table5_pidinet.pth") == "pidinet"


def test_pidinet_detector_from_released_weights():
  weights = (
    pathlib.Path(__file__).resolve().parents[1].parent
    / "shared"
    / "models"
    / "pidinet"
    / "table5_pidinet-tiny.pth"
  )
  if not weights.is_file():
    pytest.skip(f"{weights} not present")
  detector = edges_lib.make_detector(_dcd_config(pidinet_weights=str(weights)))
  assert detector.name == "pidinet" and not detector.on_host
  step = np.zeros((2, 32, 32, 1), np.float32)
  step[:, :, 16:] = 3.0
  e = np.asarray(jax.jit(detector.edges)({"image": step}))
  assert e.shape == (2, 32, 32) and e[:, 4:-4, 15:17].mean() > 0.5
  assert e[:, 4:-4, 4:10].mean() < 0.05
