"""PiDiNet port: the torch-zip reader, the PDC -> vanilla kernel conversion, the whole network
against a numpy forward pass written from the pixel-difference definitions, and the released
weights on images (skipped when shared/models/pidinet beside the checkout is absent)."""

import pathlib
import struct
import zipfile

import jax
import numpy as np
import pytest

from metadcseg_jax.core.edges import pidinet

WEIGHTS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "models" / "pidinet"
TINY = WEIGHTS / "table5_pidinet-tiny.pth"
FULL = WEIGHTS / "table5_pidinet.pth"


def _need(path: pathlib.Path) -> pathlib.Path:
  if not path.is_file():
    pytest.skip(f"{path} not present")
  return path


@pytest.fixture(scope="module")
def tiny():
  return pidinet.load_pidinet(_need(TINY))


@pytest.fixture(scope="module")
def full():
  return pidinet.load_pidinet(_need(FULL))


@pytest.fixture(scope="module")
def prob_fn():
  # One jitted function for every test: compiled once per (module, shape).
  return jax.jit(pidinet.edge_probability, static_argnums=0)


@pytest.fixture(scope="module")
def edges_fn():
  return jax.jit(pidinet.pidinet_edges, static_argnums=0)


# ------------------------------------------------------------------------------------------
# A torch.save zip written by hand: the pickle opcodes torch emits for tensors.
# ------------------------------------------------------------------------------------------


class _TorchPickle:
  """Pickle (protocol 2) bytes laid out as torch.save lays out a dict of tensors."""

  def __init__(self):
    self.out = bytearray(b"\x80\x02")  # PROTO 2

  def string(self, s: str):
    b = s.encode()
    self.out += b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE

  def integer(self, n: int):
    self.out += b"J" + struct.pack("<i", n)  # BININT

  def ints(self, values):
    self.out += b"("  # MARK
    for v in values:
      self.integer(v)
    self.out += b"t"  # TUPLE

  def global_(self, module: str, name: str):
    self.out += b"c" + f"{module}\n{name}\n".encode()  # GLOBAL

  def tensor(self, storage: str, key: str, numel: int, offset: int, size, stride):
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.out += b"("  # the call's argument tuple
    self.out += b"("  # persistent id ('storage', class, key, location, numel)
    self.string("storage")
    self.global_("torch", storage)
    self.string(key)
    self.string("cpu")
    self.integer(numel)
    self.out += b"tQ"  # TUPLE, BINPERSID
    self.integer(offset)
    self.ints(size)
    self.ints(stride)
    self.out += b"\x89"  # requires_grad False
    self.global_("collections", "OrderedDict")
    self.out += b")R"  # backward_hooks = OrderedDict()
    self.out += b"tR"  # TUPLE, REDUCE

  def state_dict_checkpoint(self, tensors):
    """{"epoch": 7, "state_dict": OrderedDict(name -> tensor)}; tensors: (name, tensor args)."""
    self.out += b"}("  # EMPTY_DICT, MARK
    self.string("epoch")
    self.integer(7)
    self.string("state_dict")
    self.global_("collections", "OrderedDict")
    self.out += b")R("  # OrderedDict(), MARK
    for name, args in tensors:
      self.string(name)
      self.tensor(*args)
    self.out += b"uu."  # SETITEMS (state dict), SETITEMS (outer), STOP
    return bytes(self.out)


def _write_checkpoint(path, arrays: dict[str, np.ndarray]):
  """A torch-format zip of contiguous float32 tensors (one storage each)."""
  writer = _TorchPickle()
  tensors = []
  with zipfile.ZipFile(path, "w") as z:
    for i, (name, a) in enumerate(arrays.items()):
      a = np.ascontiguousarray(a, "<f4")
      strides = [s // 4 for s in a.strides]
      tensors.append((name, ("FloatStorage", str(i), a.size, 0, a.shape, strides)))
      z.writestr(f"ckpt/data/{i}", a.tobytes())
    z.writestr("ckpt/data.pkl", writer.state_dict_checkpoint(tensors))


def test_reader_on_a_hand_made_torch_zip(tmp_path):
  storage0 = np.arange(6, dtype="<f4") * 1.5
  storage1 = np.arange(10, dtype="<f4") - 4.0
  storage2 = np.array([3, -2, 2**40], "<i8")
  writer = _TorchPickle()
  data = writer.state_dict_checkpoint(
    [
      ("module.a.weight", ("FloatStorage", "0", 6, 0, (2, 3), (3, 1))),
      # A non-contiguous view with an offset: b[i, j] = storage1[1 + i + 3 j].
      ("module.b", ("FloatStorage", "1", 10, 1, (3, 2), (1, 3))),
      ("module.c", ("LongStorage", "2", 3, 0, (3,), (1,))),
    ]
  )
  path = tmp_path / "hand.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", data)
    z.writestr("archive/data/0", storage0.tobytes())
    z.writestr("archive/data/1", storage1.tobytes())
    z.writestr("archive/data/2", storage2.tobytes())

  obj = pidinet.read_torch_zip(path)
  assert obj["epoch"] == 7
  assert list(obj["state_dict"]) == ["module.a.weight", "module.b", "module.c"]
  sd = pidinet.load_state_dict(path)
  assert sorted(sd) == ["a.weight", "b", "c"]
  np.testing.assert_array_equal(sd["a.weight"], storage0.reshape(2, 3))
  assert sd["a.weight"].dtype == np.float32
  expected_b = np.array([[storage1[1 + i + 3 * j] for j in range(2)] for i in range(3)])
  np.testing.assert_array_equal(sd["b"], expected_b)
  np.testing.assert_array_equal(sd["c"], storage2)
  assert sd["c"].dtype == np.int64


def test_reader_errors_name_the_file(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not a zip")
  with pytest.raises(ValueError, match="notes.pth.*not a torch zip"):
    pidinet.read_torch_zip(text)
  with pytest.raises(ValueError, match="absent.pth.*no such"):
    pidinet.load_pidinet(tmp_path / "absent.pth")
  # A pickle naming any other global (here os.system) is refused, not executed.
  evil = tmp_path / "evil.pth"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
  with pytest.raises(ValueError, match="evil.pth.*unsupported global os.system"):
    pidinet.read_torch_zip(evil)
  # A readable checkpoint that is not a PiDiNet.
  other = tmp_path / "other.pth"
  _write_checkpoint(other, {"module.fc.weight": np.ones((2, 2))})
  with pytest.raises(ValueError, match="other.pth.*not a PiDiNet"):
    pidinet.load_pidinet(other)


def test_real_checkpoint_reads(tiny):
  sd = pidinet.load_state_dict(TINY)
  assert len(sd) == 83
  assert sd["init_block.weight"].shape == (20, 3, 3, 3)
  assert sd["dilations.3.conv1.weight"].shape == (8, 80, 1, 1)
  assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in sd.values())
  module, _ = tiny
  assert (module.width, module.dil, module.sa) == (20, 8, True)


def test_state_dict_with_a_missing_entry_is_rejected(tmp_path):
  sd = pidinet.load_state_dict(_need(TINY))
  del sd["classifier.bias"]
  path = tmp_path / "cut.pth"
  _write_checkpoint(path, {f"module.{k}": v for k, v in sd.items()})
  with pytest.raises(ValueError, match="cut.pth.*missing classifier/bias"):
    pidinet.load_pidinet(path)


# ------------------------------------------------------------------------------------------
# Pixel-difference convolutions from their definitions (paper §3.2).
# ------------------------------------------------------------------------------------------

_RASTER = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # 3x3 offsets, flat index order
# The eight neighbours clockwise (y down) from the top-left corner.
_RING = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]


def _terms(op):
  """(weight index, offset added, offset subtracted or None) of each term of a PDC."""
  if op == "cv":
    return [(k, d, None) for k, d in enumerate(_RASTER)]
  if op == "cd":  # x_i - x_centre
    return [(k, d, (0, 0)) for k, d in enumerate(_RASTER)]
  if op == "ad":  # x_i - x_(clockwise neighbour of i); the centre term vanishes
    return [(k, d, _RING[(_RING.index(d) + 1) % 8]) for k, d in enumerate(_RASTER) if d != (0, 0)]
  # rd: outer minus inner pixel along the 8 directions, weighted by the kernel's entries 1..8.
  directions = [d for d in _RASTER if d != (0, 0)]
  return [(k + 1, (2 * dy, 2 * dx), (dy, dx)) for k, (dy, dx) in enumerate(directions)]


def _pdc_loop(op, w, x):
  """Plain loops: w (O, I, 3, 3), x (I, H, W) zero padded -> (O, H, W)."""
  out_ch, in_ch = w.shape[:2]
  height, width = x.shape[1:]

  def pixel(c, i, j):
    return x[c, i, j] if 0 <= i < height and 0 <= j < width else 0.0

  y = np.zeros((out_ch, height, width))
  for o in range(out_ch):
    for c in range(in_ch):
      wf = w[o, c].reshape(9)
      for i in range(height):
        for j in range(width):
          for k, (ay, ax), minus in _terms(op):
            v = pixel(c, i + ay, j + ax)
            if minus is not None:
              v -= pixel(c, i + minus[0], j + minus[1])
            y[o, i, j] += wf[k] * v
  return y


def _shift(x, d):
  # out[..., i, j] = x[..., i + dy, j + dx], zero outside.
  height, width = x.shape[-2:]
  xp = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(2, 2), (2, 2)])
  return xp[..., 2 + d[0] : 2 + d[0] + height, 2 + d[1] : 2 + d[1] + width]


def _pdc_numpy(op, w, x, groups=1):
  """The same definition, vectorised: w (O, I/groups, 3, 3), x (N, I, H, W) -> (N, O, H, W)."""
  n, in_ch, height, width = x.shape
  out_ch = w.shape[0]
  wf = w.reshape(out_ch, in_ch // groups, 9).astype(np.float64)
  x = x.astype(np.float64)
  y = 0.0
  for k, plus, minus in _terms(op):
    diff = _shift(x, plus) - (0.0 if minus is None else _shift(x, minus))
    diff = diff.reshape(n, groups, in_ch // groups, height, width)
    wk = wf[:, :, k].reshape(groups, out_ch // groups, in_ch // groups)
    y = y + np.einsum("ngchw,goc->ngohw", diff, wk).reshape(n, out_ch, height, width)
  return y


@pytest.mark.parametrize("op", ["cv", "cd", "ad", "rd"])
def test_converted_kernel_is_the_pixel_difference_conv(op):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
  x = rng.normal(size=(3, 7, 6)).astype(np.float32)
  direct = _pdc_loop(op, w.astype(np.float64), x.astype(np.float64))
  np.testing.assert_allclose(_pdc_numpy(op, w, x[None])[0], direct, atol=1e-9)

  kernel = pidinet.convert_pdc_kernel(op, w)
  size, padding = pidinet.conv_geometry(op)
  assert kernel.shape == (2, 3, size, size)
  vanilla = jax.lax.conv_general_dilated(
    x.transpose(1, 2, 0)[None],
    kernel.transpose(2, 3, 1, 0),
    (1, 1),
    [(padding, padding)] * 2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(np.asarray(vanilla)[0].transpose(2, 0, 1), direct, atol=1e-4)
  if op != "cv":  # the conversion really changes the kernel
    assert not np.allclose(kernel[..., :3, :3] if op == "rd" else kernel, w)


# ------------------------------------------------------------------------------------------
# The whole network against a numpy forward pass of the training form (reference forward()).
# ------------------------------------------------------------------------------------------


def _conv_numpy(x, w, b=None, padding=0, dilation=1):
  height, width = x.shape[2:]
  kh, kw = w.shape[2:]
  xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  ho, wo = height + 2 * padding - dilation * (kh - 1), width + 2 * padding - dilation * (kw - 1)
  y = sum(
    np.einsum(
      "nchw,oc->nohw",
      xp[:, :, i * dilation : i * dilation + ho, j * dilation : j * dilation + wo],
      w[:, :, i, j],
    )
    for i in range(kh)
    for j in range(kw)
  )
  return y if b is None else y + b[None, :, None, None]


def _upsample_numpy(e, height, width):
  """torch bilinear, align_corners=False, as ATen computes it pixel by pixel."""

  def taps(n_in, n_out):
    out = []
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = int(src)
      i1 = i0 + 1 if i0 < n_in - 1 else i0
      out.append((i0, i1, 1.0 - (src - i0), src - i0))
    return out

  y = np.zeros(e.shape[:2] + (height, width))
  for i, (y0, y1, a0, a1) in enumerate(taps(e.shape[2], height)):
    for j, (x0, x1, b0, b1) in enumerate(taps(e.shape[3], width)):
      y[:, :, i, j] = a0 * (b0 * e[:, :, y0, x0] + b1 * e[:, :, y0, x1]) + a1 * (
        b0 * e[:, :, y1, x0] + b1 * e[:, :, y1, x1]
      )
  return y


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _reference_forward(sd, x, pdcs, dil, sa):
  """x (N, 3, H, W) -> fused (N, H, W), sides (N, 4, H, W): training-form PiDiNet in numpy."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  relu = lambda v: np.maximum(v, 0.0)
  height, width = x.shape[2:]
  y = _pdc_numpy(pdcs[0], sd["init_block.weight"], x)
  features, layer = [], 1
  for s, n_blocks in ((1, 3), (2, 4), (3, 4), (4, 4)):
    for b in range(1, n_blocks + 1):
      name = f"block{s}_{b}"
      if s > 1 and b == 1:  # MaxPool2d(2, 2), floor
        n, c, h, w = y.shape
        y = y[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max((3, 5))
      z = _pdc_numpy(pdcs[layer], sd[f"{name}.conv1.weight"], y, groups=y.shape[1])
      z = _conv_numpy(relu(z), sd[f"{name}.conv2.weight"])
      if s > 1 and b == 1:
        y = _conv_numpy(y, sd[f"{name}.shortcut.weight"], sd[f"{name}.shortcut.bias"])
      y = z + y
      layer += 1
    features.append(y)
  sides = []
  for i, f in enumerate(features):
    if dil:
      f = _conv_numpy(relu(f), sd[f"dilations.{i}.conv1.weight"], sd[f"dilations.{i}.conv1.bias"])
      f = sum(
        _conv_numpy(f, sd[f"dilations.{i}.conv2_{j}.weight"], padding=d, dilation=d)
        for j, d in ((1, 5), (2, 7), (3, 9), (4, 11))
      )
    if sa:
      a = _conv_numpy(relu(f), sd[f"attentions.{i}.conv1.weight"], sd[f"attentions.{i}.conv1.bias"])
      f = f * _sigmoid(_conv_numpy(a, sd[f"attentions.{i}.conv2.weight"], padding=1))
    e = _conv_numpy(f, sd[f"conv_reduces.{i}.conv.weight"], sd[f"conv_reduces.{i}.conv.bias"])
    sides.append(_upsample_numpy(e, height, width))
  sides = np.concatenate(sides, axis=1)
  fused = _conv_numpy(sides, sd["classifier.weight"], sd["classifier.bias"])[:, 0]
  return _sigmoid(fused), _sigmoid(sides)


def test_network_matches_numpy_training_form_forward(tiny):
  module, variables = tiny
  sd = pidinet.load_state_dict(TINY)
  rng = np.random.default_rng(1)
  # 37 x 29: odd sizes exercise the floor of the max-pools and non-integer upsampling. Random
  # 6x6-pixel blocks give the network edges to respond to (plain noise gives ~0 everywhere).
  blocks = rng.normal(size=(1, 7, 5, 3)).repeat(6, axis=1).repeat(6, axis=2)[:, :37, :29]
  x = (blocks + 0.1 * rng.normal(size=(1, 37, 29, 3))).astype(np.float32)
  fused, sides = jax.jit(module.apply, static_argnames="side_outputs")(
    variables, x, side_outputs=True
  )
  ref_fused, ref_sides = _reference_forward(
    sd, x.transpose(0, 3, 1, 2).astype(np.float64), module.pdcs, module.dil, module.sa
  )
  assert fused.shape == (1, 37, 29) and sides.shape == (1, 37, 29, 4)
  np.testing.assert_allclose(np.asarray(fused), ref_fused, atol=2e-5)
  np.testing.assert_allclose(np.asarray(sides).transpose(0, 3, 1, 2), ref_sides, atol=2e-5)
  assert ref_fused.std() > 0.01  # a non-trivial output, not a constant that matches by luck


def test_resize_bilinear_matches_aten_rule():
  e = np.random.default_rng(2).normal(size=(1, 5, 4, 1)).astype(np.float32)
  out = pidinet.resize_bilinear(e, (37, 29))
  ref = _upsample_numpy(e.transpose(0, 3, 1, 2).astype(np.float64), 37, 29)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The released weights on images.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (50, 38)])
def test_output_shape_and_range(tiny, prob_fn, edges_fn, size):
  module, variables = tiny
  image = np.random.default_rng(3).uniform(size=(2,) + size + (3,)).astype(np.float32)
  prob = np.asarray(prob_fn(module, variables, image))
  assert prob.shape == (2,) + size
  assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
  edges = edges_fn(module, variables, image, threshold=0.3)
  assert edges.dtype == bool and edges.shape == (2,) + size
  np.testing.assert_array_equal(np.asarray(edges), prob > 0.3)


def _step_images():
  """(2, 64, 64, 1): a vertical step at column 32 and a horizontal one at row 32, z-score-like
  values (not in [0, 1])."""
  image = np.full((2, 64, 64, 1), -1.3, np.float32)
  image[0, :, 32:] = 2.7
  image[1, 32:, :] = 2.7
  return image


def _check_step(prob):
  # Near: within 2 px of the step. Far: more than 10 px from it and 8 px from the image border
  # (zero padding makes the border itself look like an edge to the network).
  for p in (prob[0], prob[1].T):
    near = p[8:-8, 30:34].mean()
    far = np.concatenate([p[8:-8, 8:20], p[8:-8, 44:56]], axis=1).mean()
    assert near > 0.5 and near > 3 * far, (near, far)


def test_step_edge_tiny(tiny, prob_fn, edges_fn):
  module, variables = tiny
  image = _step_images()
  prob = np.asarray(prob_fn(module, variables, image))
  _check_step(prob)
  edges = np.asarray(edges_fn(module, variables, image))
  assert edges[0, 8:-8, 31:33].mean() > 0.9 and not edges[0, 8:-8, 8:20].any()
  # Min-max scaling: a positive affine change of intensities changes nothing, and a grey image
  # is the RGB image with three equal channels.
  again = np.asarray(prob_fn(module, variables, 0.01 * image + 100.0))
  np.testing.assert_allclose(again, prob, atol=1e-4)
  rgb = np.asarray(prob_fn(module, variables, np.repeat(image, 3, axis=-1)))
  np.testing.assert_allclose(rgb, prob, atol=1e-6)


def test_step_edge_full(full, prob_fn):
  module, variables = full
  _check_step(np.asarray(prob_fn(module, variables, _step_images())))


def _training_form_count(c, d):
  """Parameters of the reference PiDiNet (carv4, CDCM width d, CSAM), counted by hand."""
  n = 3 * c * 9  # init_block, no bias
  blocks = (
    [(c, c, 1)] * 3
    + [(c, 2 * c, 2)]
    + [(2 * c, 2 * c, 1)] * 3
    + [(2 * c, 4 * c, 2)]
    + [(4 * c, 4 * c, 1)] * 3
    + [(4 * c, 4 * c, 2)]
    + [(4 * c, 4 * c, 1)] * 3
  )
  for i, o, stride in blocks:
    n += i * 9 + i * o  # depthwise 3x3 + 1x1, no biases
    if stride == 2:
      n += i * o + o  # 1x1 shortcut with bias
  for f in (c, 2 * c, 4 * c, 4 * c):
    n += f * d + d + 4 * d * d * 9  # CDCM
    n += d * 4 + 4 + 4 * 9  # CSAM
    n += d + 1  # MapReduce
  return n + 4 + 1  # classifier


def test_parameter_count(full):
  module, variables = full
  sd = pidinet.load_state_dict(FULL)
  converted = pidinet.convert_state_dict(sd, module.pdcs)
  n_flax = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  assert n_flax == sum(v.size for v in converted.values())
  n_training = sum(v.size for v in sd.values())
  assert n_training == _training_form_count(60, 24) == 710_149
  # Converting each rd kernel (3x3 -> 5x5) adds 16 scalars per channel of the 4 rd layers,
  # which have C, 2C, 4C and 4C channels.
  assert n_flax == n_training + 16 * (60 + 120 + 240 + 240)
  assert n_training < 1_000_000  # "less than 1M parameters" (paper abstract)
  assert sum(v.size for v in pidinet.load_state_dict(_need(TINY)).values()) == (
    _training_form_count(20, 8)
  )
