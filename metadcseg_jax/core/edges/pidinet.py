"""PiDiNet edge detector (Su et al., ICCV 2021) in flax.linen, inference only.

"Pixel Difference Networks for Efficient Edge Detection" (arXiv:2108.07009). MetaDCSeg's boundary
region (Eq. 8) adds the edge pixels PiDiNet detects; this module runs the authors' released BSDS500
checkpoints (reference code: github.com/hellozhuo/pidinet, `models/pidinet.py`, `models/ops.py`,
`models/config.py`, `models/convert_pidinet.py`) without torch:

  module, variables = load_pidinet("/path/to/table5_pidinet.pth")
  prob = edge_probability(module, variables, images)      # (B,H,W) in [0,1]
  edges = pidinet_edges(module, variables, images)         # (B,H,W) bool

Both functions are jittable with the module static: `jax.jit(edge_probability, static_argnums=0)`
(a PiDiNet is a hashable dataclass) or `jax.jit(functools.partial(edge_probability, module))`.

Architecture (paper Fig. 5), for a width C (60 for PiDiNet, 20 for PiDiNet-Tiny):

  init_block   3x3 conv, 3 -> C, no bias                    (pixel-difference type pdcs[0])
  stage 1      block1_1..1_3       C channels, full resolution
  stage 2      block2_1..2_4      2C channels, 1/2 (block2_1 max-pools and widens)
  stage 3      block3_1..3_4      4C channels, 1/4
  stage 4      block4_1..4_4      4C channels, 1/8
  block        [2x2 max-pool; 1x1 shortcut conv] depthwise PDC -> ReLU -> 1x1 conv, + residual
  side i       [CDCM] -> [CSAM] -> MapReduce (1x1 conv to one map) -> bilinear to (H, W)
  classifier   1x1 conv over the four side maps; every map goes through a sigmoid.

The pixel-difference convolutions (paper §3.2: central "cd", angular "ad", radial "rd";
"cv" is vanilla) are linear in the input, so after training each is a vanilla convolution with a
rearranged kernel; the checkpoints store the training-form 3x3 kernels and `convert_pdc_kernel`
turns them into vanilla 3x3 (cd, ad) or 5x5 (rd) kernels at load time, which is all the flax
module ever sees (paper §3.2; the reference's `convert_pidinet.py`).

The torch checkpoint is read by `read_torch_zip`: a `torch.save` zip holds a pickle
(`<prefix>/data.pkl`) whose tensors point, through persistent ids, at raw little-endian storage
files (`<prefix>/data/<key>`). The unpickler resolves only the handful of globals torch uses for
tensors (`_rebuild_tensor_v2`, the storage classes, OrderedDict) and refuses every other global,
so loading a checkpoint never executes code from the file.
"""

import collections
from collections.abc import Mapping, Sequence
import os
import pickle
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metadcseg_jax.types import Array

# --------------------------------------------------------------------------------------------
# Reading torch zip checkpoints without torch.
# --------------------------------------------------------------------------------------------

# numpy dtypes (without byte order) of the legacy typed storage classes torch pickles.
_STORAGE_DTYPES = {
  "DoubleStorage": "f8",
  "FloatStorage": "f4",
  "HalfStorage": "f2",
  "LongStorage": "i8",
  "IntStorage": "i4",
  "ShortStorage": "i2",
  "CharStorage": "i1",
  "ByteStorage": "u1",
  "BoolStorage": "b1",
}


class _StorageType:
  """Stand-in for a `torch.<Name>Storage` class named in the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(
  storage: np.ndarray,
  storage_offset: int,
  size: Sequence[int],
  stride: Sequence[int],
  requires_grad: bool = False,
  backward_hooks: Any = None,
  metadata: Any = None,
) -> np.ndarray:
  """numpy version of `torch._utils._rebuild_tensor_v2`: a strided view of a 1-D storage, copied.

  Args:
    storage: (numel,) the storage's elements.
    storage_offset: index of the tensor's first element in the storage.
    size: the tensor's shape.
    stride: the tensor's strides, in elements.
    requires_grad, backward_hooks, metadata: ignored (autograd state).

  Returns:
    A C-contiguous array of shape `size`.
  """
  del requires_grad, backward_hooks, metadata
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"bad tensor geometry: size {size}, stride {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or last >= storage.shape[0]:
    raise pickle.UnpicklingError(
      f"tensor (offset {storage_offset}, size {size}, stride {stride}) runs past its storage "
      f"of {storage.shape[0]} elements"
    )
  view = np.lib.stride_tricks.as_strided(
    storage[storage_offset:],
    shape=size,
    strides=tuple(s * storage.itemsize for s in stride),
    writeable=False,
  )
  return np.array(view, copy=True)


def _rebuild_parameter(
  data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None
) -> np.ndarray:
  """`torch._utils._rebuild_parameter`: an nn.Parameter is its data here."""
  del requires_grad, backward_hooks
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch zip's data.pkl into numpy arrays, loading storages from the archive."""

  def __init__(self, file, *, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    # Why a whitelist: pickle's default find_class imports and calls anything the file names.
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"unsupported global {module}.{name} in a torch checkpoint")

  def persistent_load(self, pid: Any) -> np.ndarray:
    # torch writes ('storage', storage class, key, location, numel) for every storage.
    if not (
      isinstance(pid, tuple)
      and len(pid) == 5
      and pid[0] == "storage"
      and isinstance(pid[1], _StorageType)
    ):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    key = str(key)
    if key not in self._storages:
      try:
        raw = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError as e:
        raise pickle.UnpicklingError(f"storage {key} missing from the archive") from e
      dtype = np.dtype(self._byteorder + storage_type.dtype)
      if len(raw) < int(numel) * dtype.itemsize:
        raise pickle.UnpicklingError(
          f"storage {key} holds {len(raw)} bytes, fewer than {numel} x {dtype.itemsize}"
        )
      self._storages[key] = np.frombuffer(raw, dtype, count=int(numel)).astype(
        dtype.newbyteorder("="), copy=False
      )
    return self._storages[key]


def read_torch_zip(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` zip archive (PyTorch >= 1.6) into Python objects with numpy arrays.

  Args:
    path: the checkpoint file.

  Returns:
    The pickled object, with every tensor as a numpy array of its dtype and shape.

  Raises:
    ValueError: naming the file, when it is missing, not a zip archive, has no `data.pkl`, or
      its pickle refers to anything other than tensors, storages and plain containers.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such checkpoint file")
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a torch zip checkpoint (expected a torch.save zip archive)")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise ValueError(
          f"{path}: expected one <prefix>/data.pkl in the archive, found {pickles or 'none'}"
        )
      prefix = pickles[0][: -len("data.pkl")]
      # Archives written on big-endian machines say so; the default is little-endian.
      byteorder = "<"
      if f"{prefix}byteorder" in archive.namelist():
        byteorder = "<" if archive.read(f"{prefix}byteorder").strip() == b"little" else ">"
      with archive.open(pickles[0]) as f:
        return _TorchUnpickler(f, archive=archive, prefix=prefix, byteorder=byteorder).load()
  except (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
    KeyError,
    AttributeError,
    TypeError,
    IndexError,
  ) as e:
    raise ValueError(f"{path}: unreadable torch checkpoint: {e}") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The `state_dict` of a torch checkpoint as numpy arrays, without DataParallel's "module.".

  Args:
    path: a `torch.save` zip of either {"state_dict": {...}, ...} or the state dict itself.

  Returns:
    {parameter name: array}, e.g. "init_block.weight": (20, 3, 3, 3) float32.

  Raises:
    ValueError: naming the file, when it cannot be read or holds no mapping of arrays.
  """
  obj = read_torch_zip(path)
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not (
    isinstance(obj, Mapping)
    and obj
    and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
  ):
    raise ValueError(f"{os.fspath(path)}: no state dict of tensors in the checkpoint")
  return {k.removeprefix("module."): v for k, v in obj.items()}


# --------------------------------------------------------------------------------------------
# Pixel-difference convolutions and their conversion to vanilla kernels (paper §3.2).
# --------------------------------------------------------------------------------------------

PDC_TYPES = ("cv", "cd", "ad", "rd")

# The 16 pixel-difference layers (init_block and the 15 blocks' depthwise conv1), in the order
# of the reference's `pdcs` list.
LAYER_NAMES = (
  "init_block",
  "block1_1",
  "block1_2",
  "block1_3",
  "block2_1",
  "block2_2",
  "block2_3",
  "block2_4",
  "block3_1",
  "block3_2",
  "block3_3",
  "block3_4",
  "block4_1",
  "block4_2",
  "block4_3",
  "block4_4",
)

# The named layouts of the reference's models/config.py: which PDC each of the 16 layers uses.
# "carv4" (cd, ad, rd, cv repeated four times) is the paper's PiDiNet (Table 5).
CONFIGS: dict[str, tuple[str, ...]] = {
  "baseline": ("cv",) * 16,
  **{f"{t[0]}-v15": (t,) + ("cv",) * 15 for t in ("cd", "ad", "rd")},
  **{f"{t[0]}vvv4": (t, "cv", "cv", "cv") * 4 for t in ("cd", "ad", "rd")},
  **{f"{t[0] * 3}v4": (t, t, t, "cv") * 4 for t in ("cd", "ad", "rd")},
  **{f"{t[0]}16": (t,) * 16 for t in ("cd", "ad", "rd")},
  "carv4": ("cd", "ad", "rd", "cv") * 4,
}

# Angular PDC pairs each 3x3 position with its clockwise neighbour on the ring (raster indices
# 0 1 2 / 3 4 5 / 6 7 8): 0->1->2->5->8->7->6->3->0; the centre pairs with itself (no term).
AD_CLOCKWISE_NEXT = (1, 2, 5, 0, 4, 8, 3, 6, 7)
# The vanilla kernel of ad is w - w[AD_SOURCE]: position j also carries -w_i of the i whose
# clockwise neighbour it is (AD_SOURCE is the inverse permutation of AD_CLOCKWISE_NEXT).
AD_SOURCE = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# Radial PDC on a 5x5 support: direction k (raster order NW, N, NE, W, E, SW, S, SE) takes the
# outer pixel (2 steps away, +w) minus the inner pixel (1 step, -w). The reference feeds it the
# 3x3 kernel's flattened entries 1..8 (entry 0 unused), which the trained weights follow.
RD_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
RD_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


def conv_geometry(op: str) -> tuple[int, int]:
  """(kernel size, padding) of the vanilla convolution a PDC layer becomes (stride 1, dilation 1).

  Why: rd reaches two pixels out, so its vanilla form is 5x5 with padding 2; the others stay 3x3
  with padding 1. Zero padding makes the vanilla and pixel-difference forms agree at the border.
  """
  if op not in PDC_TYPES:
    raise ValueError(f"unknown pixel-difference type {op!r}; expected one of {PDC_TYPES}")
  return (5, 2) if op == "rd" else (3, 1)


def convert_pdc_kernel(op: str, weight: np.ndarray) -> np.ndarray:
  """Vanilla kernel of a trained pixel-difference convolution (paper §3.2).

  With x_i the 3x3 neighbourhood (raster order, x_4 the centre) and w_i the trained weights:
    cv: sum_i w_i x_i                        -> the kernel itself
    cd: sum_i w_i (x_i - x_4)                -> w, with sum_i w_i subtracted at the centre
    ad: sum_i w_i (x_i - x_next(i))          -> w - w[AD_SOURCE] (next = clockwise neighbour)
    rd: sum_k v_k (x_outer(k) - x_inner(k))  -> 5x5 kernel, +v_k on the outer ring at
        RD_OUTER, -v_k at RD_INNER, with v = w.flat[1:9]

  Args:
    op: "cv", "cd", "ad" or "rd".
    weight: (O, I, 3, 3) PyTorch-layout training-form kernel.

  Returns:
    (O, I, 3, 3) for cv/cd/ad, (O, I, 5, 5) for rd, float32, PyTorch layout.
  """
  conv_geometry(op)
  weight = np.asarray(weight, np.float32)
  if weight.ndim != 4 or weight.shape[2:] != (3, 3):
    raise ValueError(f"a {op} kernel must be (O, I, 3, 3), got {weight.shape}")
  out_ch, in_ch = weight.shape[:2]
  flat = weight.reshape(out_ch, in_ch, 9)
  if op == "cv":
    return weight.copy()
  if op == "cd":
    kernel = flat.copy()
    kernel[:, :, 4] -= flat.sum(axis=-1)
    return kernel.reshape(weight.shape)
  if op == "ad":
    return (flat - flat[:, :, list(AD_SOURCE)]).reshape(weight.shape)
  kernel = np.zeros((out_ch, in_ch, 25), np.float32)
  kernel[:, :, list(RD_OUTER)] = flat[:, :, 1:]
  kernel[:, :, list(RD_INNER)] = -flat[:, :, 1:]
  return kernel.reshape(out_ch, in_ch, 5, 5)


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], pdcs: Sequence[str]
) -> dict[str, np.ndarray]:
  """Replaces the 16 pixel-difference kernels of a training-form state dict by vanilla ones.

  Args:
    state_dict: {name: array} without "module.", PyTorch layouts.
    pdcs: 16 PDC types, one per entry of LAYER_NAMES.

  Returns:
    A new dict; "init_block.weight" and "block*_*.conv1.weight" converted, the rest unchanged.
  """
  names = {"init_block.weight": pdcs[0]}
  names.update({f"{layer}.conv1.weight": op for layer, op in zip(LAYER_NAMES[1:], pdcs[1:])})
  return {
    k: convert_pdc_kernel(names[k], v) if k in names else np.asarray(v, np.float32)
    for k, v in state_dict.items()
  }


# --------------------------------------------------------------------------------------------
# The network, in its converted (vanilla convolution) form.
# --------------------------------------------------------------------------------------------

# ImageNet statistics: the reference's data loader applies torchvision's Normalize with these
# to RGB images in [0, 1] (edge_dataloader.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv(
  features: int,
  kernel: int,
  *,
  padding: int = 0,
  dilation: int = 1,
  groups: int = 1,
  bias: bool,
  name: str,
) -> nn.Conv:
  # Explicit symmetric zero padding, as PyTorch's Conv2d(padding=p).
  return nn.Conv(
    features,
    (kernel, kernel),
    padding=((padding, padding), (padding, padding)),
    kernel_dilation=(dilation, dilation),
    feature_group_count=groups,
    use_bias=bias,
    name=name,
  )


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's bilinear resize with align_corners=False.

  Source coordinate (i + 0.5) * in/out - 0.5, clamped below at 0, interpolating between its
  floor and the next pixel (clamped at the last one), as ATen's upsample_bilinear2d.
  """
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` for NHWC arrays.

  Why not jax.image.resize: the reference's exact sampling rule (including its clamping at the
  top-left border) is spelt out here as two small static matrices, so it can be checked.

  Args:
    x: (B, h, w, C).
    size: (H, W), the output size.

  Returns:
    (B, H, W, C).
  """
  rows = jnp.asarray(_bilinear_matrix(x.shape[1], size[0]), x.dtype)
  cols = jnp.asarray(_bilinear_matrix(x.shape[2], size[1]), x.dtype)
  return jnp.einsum("Hh,Ww,bhwc->bHWc", rows, cols, x)


class PDCBlock(nn.Module):
  """Residual block: [2x2 max-pool] -> depthwise conv -> ReLU -> 1x1 conv, plus the input.

  The depthwise conv is the converted pixel-difference conv (3x3, or 5x5 for rd). A block with
  stride 2 max-pools first and maps the pooled input through a 1x1 conv (with bias) to
  `out_channels` for the residual; otherwise in and out channels must agree.

  Attributes:
    op: the PDC type of the depthwise conv ("cv", "cd", "ad" or "rd").
    out_channels: channels of the output.
    stride: 1 or 2.
  """

  op: str
  out_channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, I) -> (B, H', W', out_channels), H' = H // stride (floor, as MaxPool2d)."""
    if self.stride > 1:
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    channels = x.shape[-1]
    kernel, padding = conv_geometry(self.op)
    y = _conv(channels, kernel, padding=padding, groups=channels, bias=False, name="conv1")(x)
    y = nn.relu(y)
    y = _conv(self.out_channels, 1, bias=False, name="conv2")(y)
    if self.stride > 1:
      x = _conv(self.out_channels, 1, bias=True, name="shortcut")(x)
    return y + x


class CDCM(nn.Module):
  """Compact Dilation Convolution based Module (paper Fig. 5).

  ReLU -> 1x1 conv (with bias) to `channels`, then the sum of four 3x3 convs with dilations 5, 7,
  9 and 11 (padding = dilation, no bias): a multi-scale context at little cost.

  Attributes:
    channels: output channels (the reference's `dil`: 24 for PiDiNet, 8 for the tiny one).
  """

  channels: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, I) -> (B, H, W, channels)."""
    x = _conv(self.channels, 1, bias=True, name="conv1")(nn.relu(x))
    return sum(
      _conv(self.channels, 3, padding=d, dilation=d, bias=False, name=f"conv2_{i}")(x)
      for i, d in enumerate((5, 7, 9, 11), start=1)
    )


class CSAM(nn.Module):
  """Compact Spatial Attention Module (paper Fig. 5).

  x * sigmoid(conv3x3(conv1x1(relu(x)))): 1x1 conv (with bias) to 4 channels, 3x3 conv (no bias,
  padding 1) to one attention map that rescales every channel.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    y = _conv(4, 1, bias=True, name="conv1")(nn.relu(x))
    y = _conv(1, 3, padding=1, bias=False, name="conv2")(y)
    return x * nn.sigmoid(y)


class MapReduce(nn.Module):
  """1x1 conv (with bias) reducing a side feature map to one edge logit map."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H, W, 1)."""
    return _conv(1, 1, bias=True, name="conv")(x)


class PiDiNet(nn.Module):
  """PiDiNet in its converted (vanilla convolution) form, for inference (paper Fig. 5).

  Parameter names follow the reference's state dict ("dilations.0.conv1" becomes
  "dilations_0/conv1", kernels HWIO), so `load_pidinet` maps a checkpoint one to one.

  Attributes:
    width: C, channels of stage 1 (stages have C, 2C, 4C, 4C): 60 PiDiNet, 30 small, 20 tiny.
    pdcs: 16 PDC types, one per LAYER_NAMES entry (CONFIGS["carv4"] for the paper's PiDiNet).
    dil: channels of the CDCM modules, or None for none (24 PiDiNet, 12 small, 8 tiny).
    sa: whether each side output has a CSAM module.
  """

  width: int = 60
  pdcs: tuple[str, ...] = CONFIGS["carv4"]
  dil: int | None = 24
  sa: bool = True

  @nn.compact
  def __call__(self, x: Array, side_outputs: bool = False) -> Array | tuple[Array, Array]:
    """Edge probabilities of normalised images.

    Args:
      x: (B, H, W, 3) float RGB images in [0, 1], normalised with IMAGENET_MEAN / IMAGENET_STD
        (see `edge_probability` for arbitrary inputs). Any H, W >= 8; sizes that are not
        multiples of 8 are floored by the max-pools and the side maps resized back to (H, W).
      side_outputs: also return the four side outputs.

    Returns:
      (B, H, W) fused edge probability (sigmoid of the classifier), and with side_outputs also
      (B, H, W, 4) the sigmoids of the side maps of stages 1..4 (fine to coarse).
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"PiDiNet expects (B, H, W, 3) images, got {x.shape}")
    if min(x.shape[1:3]) < 8:
      raise ValueError(f"PiDiNet needs H, W >= 8 (three 2x2 max-pools), got {x.shape[1:3]}")
    if len(self.pdcs) != len(LAYER_NAMES):
      raise ValueError(f"pdcs needs {len(LAYER_NAMES)} entries, got {len(self.pdcs)}")
    height, width = x.shape[1:3]
    kernel, padding = conv_geometry(self.pdcs[0])
    x = _conv(self.width, kernel, padding=padding, bias=False, name="init_block")(x)

    # (number of blocks, channels) per stage; the first block of stages 2-4 halves the size.
    stages = ((3, self.width), (4, 2 * self.width), (4, 4 * self.width), (4, 4 * self.width))
    features = []
    layer = 1
    for s, (n_blocks, channels) in enumerate(stages, start=1):
      for b in range(1, n_blocks + 1):
        stride = 2 if (s > 1 and b == 1) else 1
        x = PDCBlock(self.pdcs[layer], channels, stride, name=f"block{s}_{b}")(x)
        layer += 1
      features.append(x)

    maps = []
    for i, f in enumerate(features):
      if self.dil is not None:
        f = CDCM(self.dil, name=f"dilations_{i}")(f)
      if self.sa:
        f = CSAM(name=f"attentions_{i}")(f)
      e = MapReduce(name=f"conv_reduces_{i}")(f)
      maps.append(resize_bilinear(e, (height, width)))
    maps = jnp.concatenate(maps, axis=-1)  # (B, H, W, 4) side logits
    fused = _conv(1, 1, bias=True, name="classifier")(maps)[..., 0]
    if side_outputs:
      return nn.sigmoid(fused), nn.sigmoid(maps)
    return nn.sigmoid(fused)


# --------------------------------------------------------------------------------------------
# Loading and running.
# --------------------------------------------------------------------------------------------


def _flax_path(torch_name: str) -> tuple[str, ...]:
  # "dilations.0.conv2_1.weight" -> ("dilations_0", "conv2_1", "kernel")
  parts = []
  for part in torch_name.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  leaf = {"weight": "kernel", "bias": "bias"}.get(parts[-1], parts[-1])
  return tuple(parts[:-1]) + (leaf,)


def load_pidinet(
  path: str | os.PathLike, config: str | Sequence[str] = "carv4"
) -> tuple[PiDiNet, dict[str, Any]]:
  """Loads a released PiDiNet checkpoint as a flax module and its converted parameters.

  The width (init_block's output channels), the CDCM width (absent: no CDCM) and whether CSAM
  modules are present are read from the state dict. The PDC layout cannot be: every PDC kernel
  is stored as 3x3 whatever its type, so it comes from `config` ("carv4" for all the released
  table5 models, as the reference README's commands say).

  Args:
    path: a `torch.save` zip checkpoint of the reference code (e.g. table5_pidinet.pth).
    config: a CONFIGS name or 16 PDC types.

  Returns:
    (module, {"params": params}) ready for `module.apply(variables, x)`.

  Raises:
    ValueError: naming the file, when it is missing or unreadable, or its state dict is not
      that of a PiDiNet (missing, unexpected or wrongly shaped entries).
  """
  path = os.fspath(path)
  if isinstance(config, str):
    if config not in CONFIGS:
      raise ValueError(f"unknown PiDiNet config {config!r}; expected one of {sorted(CONFIGS)}")
    pdcs = CONFIGS[config]
  else:
    pdcs = tuple(config)
    if len(pdcs) != len(LAYER_NAMES) or any(op not in PDC_TYPES for op in pdcs):
      raise ValueError(f"config needs {len(LAYER_NAMES)} entries from {PDC_TYPES}, got {pdcs}")
  state_dict = load_state_dict(path)
  init = state_dict.get("init_block.weight")
  if init is None or init.ndim != 4 or init.shape[1:] != (3, 3, 3):
    raise ValueError(f"{path}: not a PiDiNet state dict (no (C, 3, 3, 3) init_block.weight)")
  cdcm = state_dict.get("dilations.0.conv1.weight")
  module = PiDiNet(
    width=int(init.shape[0]),
    pdcs=pdcs,
    dil=None if cdcm is None else int(cdcm.shape[0]),
    sa="attentions.0.conv1.weight" in state_dict,
  )

  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  expected = {key: leaf.shape for key, leaf in _flatten(expected)}
  params_flat = {}
  problems = []
  for name, value in convert_state_dict(state_dict, pdcs).items():
    key = _flax_path(name)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: (k, k, 1, C))
    if key not in expected:
      problems.append(f"unexpected {name} {value.shape}")
    elif tuple(expected[key]) != value.shape:
      problems.append(f"{name}: shape {value.shape} (converted, HWIO), expected {expected[key]}")
    params_flat[key] = value
  problems += [f"missing {'/'.join(k)} {v}" for k, v in expected.items() if k not in params_flat]
  if problems:
    raise ValueError(
      f"{path}: unexpected PiDiNet state dict (width {module.width}, "
      f"dil {module.dil}, sa {module.sa}): " + "; ".join(problems[:8])
    )
  params: dict[str, Any] = {}
  for key, value in params_flat.items():
    node = params
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = jnp.asarray(value)
  return module, {"params": params}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  # Yields (path tuple, leaf) of a nested dict.
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def edge_probability(module: PiDiNet, variables: Mapping[str, Any], image: Array) -> Array:
  """PiDiNet's fused edge probability for images in any intensity range.

  Each image is min-max scaled to [0, 1] (over its pixels and channels together, so colours keep
  their ratios) and then normalised as the reference normalises RGB images in [0, 1]. Why: the
  segmentation datasets here are z-scored, and PiDiNet was trained on [0, 1] images with
  ImageNet normalisation; a constant image maps to zeros. Grey images are repeated to RGB.
  Jittable (with `module` static or closed over); no Python loop over the batch.

  Args:
    module: a PiDiNet (from `load_pidinet`).
    variables: its {"params": ...}.
    image: (B, H, W, C) with C = 1 (grey) or 3 (RGB), any real range.

  Returns:
    (B, H, W) float32 edge probabilities in [0, 1].
  """
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 4 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected (B, H, W, 1 or 3) images, got {image.shape}")
  if image.shape[-1] == 1:
    image = jnp.broadcast_to(image, image.shape[:3] + (3,))
  lo = image.min(axis=(1, 2, 3), keepdims=True)
  span = image.max(axis=(1, 2, 3), keepdims=True) - lo
  scaled = jnp.where(span > 0, (image - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  normed = (scaled - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return module.apply(variables, normed)


def pidinet_edges(
  module: PiDiNet, variables: Mapping[str, Any], image: Array, *, threshold: float = 0.5
) -> Array:
  """Edge pixels: `edge_probability(module, variables, image) > threshold`, (B, H, W) bool.

  Args:
    module: the `PiDiNet` module.
    variables: its variables (`load_pidinet`).
    image: (B, H, W, C) images in [0, 1].
    threshold: the edge probability above which a pixel is an edge.
  """
  return edge_probability(module, variables, image) > threshold
