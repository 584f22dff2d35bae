"""U-Net and U-Net++ (nested U-Net) in flax.linen, laid out as in PyTorch.

Both follow `archs.py` of 4uiiurz1/pytorch-nested-unet, the U-Net++ code the
MetaDCSeg paper (§4.1, "U-Net++ backbone implemented in PyTorch") and L2B build
on: the same blocks, widths, module names (`conv{i}_{j}`, `final`,
`final1..4`), PyTorch's default initialisation and bilinear upsampling with
`align_corners=True`, so the parameter count matches and PyTorch weights map
one-to-one (OIHW kernels transposed to HWIO).

Functional use (batch statistics live in the `batch_stats` collection)::

  model = UNetPlusPlus(num_classes=2, width=32)
  variables = model.init(rng, x, train=False)
  (logits, features), new_state = model.apply(
      variables, x, train=True, mutable=["batch_stats"])
  logits, features = model.apply(variables, x, train=False)

`logits` (B,H,W,L) and `features` come back, and parameters are kept, in
float32 for float32 and bfloat16 computation (float64 for float64, which
finite-difference tests use under `jax.enable_x64`). `features`
(B,H,W,width) are X^{0,4}, the last decoder block before the 1x1 classifier,
the `h` of MetaDCSeg Eq. 10, Eq. 11 (MetaDCSeg §3.3).

References:
  Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
  Segmentation", MICCAI 2015.
  Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image
  Segmentation", DLMIA 2018.
"""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metadcseg_jax.types import Array

Dtype = Any
Activation = Callable[[Array], Array]

NUM_LEVELS = 4  # pooling steps; inputs must be divisible by 2**NUM_LEVELS
WIDTH_MULTIPLIERS = (1, 2, 4, 8, 16)
# flax's BatchNorm momentum weighs the old running value: PyTorch's 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _wide(dtype: Dtype) -> Dtype:
  # Parameter and output dtype: float32, or float64 for float64 computation.
  return jnp.promote_types(dtype, jnp.float32)


def _torch_kernel_init() -> jax.nn.initializers.Initializer:
  # PyTorch's Conv2d default, kaiming_uniform(a=sqrt(5)): U(±1/sqrt(fan_in)).
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> jax.nn.initializers.Initializer:
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(features: int, kernel: int, *, fan_in_channels: int, dtype: Dtype, name: str) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    padding="SAME",
    use_bias=True,
    dtype=dtype,
    param_dtype=_wide(dtype),
    kernel_init=_torch_kernel_init(),
    bias_init=_torch_bias_init(kernel * kernel * fan_in_channels),
    name=name,
  )


def _interp_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """Source index and weight of its right neighbour, `align_corners=True`.

  Output `o` samples `o * (n_in - 1) / (n_out - 1)`; integer arithmetic keeps
  the taps exact, so the corners copy the input bit for bit.
  """
  if n_in == 1 or n_out == 1:
    return np.zeros(n_out, np.int32), np.zeros(n_out)
  num = np.arange(n_out) * (n_in - 1)
  lower, rem = np.divmod(num, n_out - 1)
  return lower.astype(np.int32), rem / (n_out - 1)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of the taps: two non-zeros a row, summing to one."""
  lower, frac = _interp_taps(n_in, n_out)
  upper = np.minimum(lower + 1, n_in - 1)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lower), 1 - frac)
  np.add.at(m, (np.arange(n_out), upper), frac)
  return m


def _lerp_axis(x: Array, axis: int, n_out: int) -> Array:
  # A product with the interpolation matrix rather than two gathers: the gathers' transpose in
  # the backward pass is a scatter-add, which XLA's CPU backend runs element by element; the
  # product's transpose is another product. Exact zeros leave each output the same two-term
  # sum, so the corners still copy the input bit for bit.
  m = jnp.asarray(_interp_matrix(x.shape[axis], n_out), x.dtype)
  spec = "oh,bhwc->bowc" if axis == 1 else "ow,bhwc->bhoc"
  return jnp.einsum(spec, m, x, precision=jax.lax.Precision.HIGHEST)


def upsample_bilinear_2x(x: Array) -> Array:
  """Bilinear 2x upsampling with aligned corners, as `nn.Upsample` in the reference.

  Output pixel `o` samples the input at `o * (n - 1) / (2n - 1)`, separably in
  H and W (a product with a constant matrix on each axis, so forward- and reverse-mode
  both work without a scatter).

  Args:
    x: (B,H,W,C).

  Returns:
    (B,2H,2W,C), same dtype.
  """
  x = _lerp_axis(x, 1, 2 * x.shape[1])
  return _lerp_axis(x, 2, 2 * x.shape[2])


def max_pool_2x(x: Array) -> Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def check_input(x: Array) -> None:
  """Raises ValueError unless `x` is (B,H,W,C) with H, W divisible by 16."""
  factor = 2**NUM_LEVELS
  if x.ndim != 4:
    raise ValueError(f"input x must be (B,H,W,C), got shape {x.shape}")
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(
      f"input x has shape {x.shape}: H and W must be divisible by {factor} "
      f"({NUM_LEVELS} max-pool steps)"
    )


class VGGBlock(nn.Module):
  """(3x3 conv with bias -> BatchNorm -> ReLU) twice.

  Attributes:
    middle_features: channels after the first conv.
    out_features: channels after the second conv.
    dtype: computation dtype (parameters float32, float64 for float64).
    activation: the nonlinearity after each BatchNorm.
  """

  middle_features: int
  out_features: int
  dtype: Dtype = jnp.float32
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    for i, features in enumerate((self.middle_features, self.out_features), 1):
      x = _conv(features, 3, fan_in_channels=x.shape[-1], dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=self.dtype,
        param_dtype=_wide(self.dtype),
        use_fast_variance=False,
        name=f"bn{i}",
      )(x)
      x = self.activation(x)
    return x


def _widths(width: int) -> tuple[int, ...]:
  if width < 1:
    raise ValueError(f"width must be a positive integer, got {width}")
  return tuple(width * m for m in WIDTH_MULTIPLIERS)


def _check_num_classes(num_classes: int) -> None:
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")


class UNet(nn.Module):
  """Classic 4-level U-Net (the reference's `UNet`).

  Encoder X^{i,0} = VGGBlock(pool(X^{i-1,0})), decoder
  X^{i,4-i} = VGGBlock([X^{i,0}, up(X^{i+1,3-i})]), widths
  `width * (1, 2, 4, 8, 16)`, 1x1 classifier on X^{0,4}.

  Attributes:
    num_classes: L, output channels.
    width: channels of the first level (32 in the reference).
    dtype: computation dtype, e.g. `jnp.bfloat16`; parameters and outputs
      are float32 (float64 for float64).
    activation: nonlinearity of every block; ReLU as in the reference. A
      smooth one (e.g. `jax.nn.softplus`) makes finite-difference checks of
      derivatives well posed: with ReLU a perturbation can cross a kink.
  """

  num_classes: int
  width: int = 32
  dtype: Dtype = jnp.float32
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array]:
    """Returns `(logits (B,H,W,L), features h = X^{0,4} (B,H,W,width) of Eq. 5)`, float32."""
    check_input(x)
    _check_num_classes(self.num_classes)
    nb = _widths(self.width)
    block = lambda i, j: VGGBlock(nb[i], nb[i], self.dtype, self.activation, name=f"conv{i}_{j}")
    encoder = [block(0, 0)(x, train=train)]
    for i in range(1, NUM_LEVELS + 1):
      encoder.append(block(i, 0)(max_pool_2x(encoder[-1]), train=train))
    y = encoder[NUM_LEVELS]
    for i in reversed(range(NUM_LEVELS)):
      y = block(i, NUM_LEVELS - i)(
        jnp.concatenate([encoder[i], upsample_bilinear_2x(y)], -1), train=train
      )
    logits = _conv(self.num_classes, 1, fan_in_channels=nb[0], dtype=self.dtype, name="final")(y)
    out_dtype = _wide(self.dtype)
    return logits.astype(out_dtype), y.astype(out_dtype)


class UNetPlusPlus(nn.Module):
  """U-Net++ (the reference's `NestedUNet`), 4 levels.

  Node X^{i,j} (level i, column j):
    X^{i,0} = VGGBlock(pool(X^{i-1,0}))
    X^{i,j} = VGGBlock([X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1})]),  j >= 1
  computed in the reference's order (the encoder column advances one level
  per decoder diagonal). Without deep supervision the classifier is a 1x1
  conv `final` on X^{0,4}. With deep supervision 1x1 heads `final1..4` read
  X^{0,1..4}; the output is their mean (the "accurate" mode of Zhou et al.)
  and each head's logits (output dtype) are sown as `intermediates/head_logits`
  (a tuple of four), so a loss can supervise them one by one::

    (logits, feats), state = model.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"])
    heads = state["intermediates"]["head_logits"]

  Attributes:
    num_classes: L, output channels of every head.
    width: channels of level 0 (32 in the reference).
    deep_supervision: four heads on X^{0,1..4} instead of one on X^{0,4}.
    dtype: computation dtype, e.g. `jnp.bfloat16`; parameters and outputs
      are float32 (float64 for float64).
    activation: nonlinearity of every block (see `UNet`).
  """

  num_classes: int
  width: int = 32
  deep_supervision: bool = False
  dtype: Dtype = jnp.float32
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array]:
    """Returns `(logits (B,H,W,L), features h = X^{0,4} (B,H,W,width) of Eq. 5)`, float32."""
    check_input(x)
    _check_num_classes(self.num_classes)
    nb = _widths(self.width)
    out_dtype = _wide(self.dtype)
    # nodes[i][j] = X^{i,j}
    nodes: list[list[Array]] = [[] for _ in range(NUM_LEVELS + 1)]

    def node(i: int, j: int) -> Array:
      if j == 0:
        inp = x if i == 0 else max_pool_2x(nodes[i - 1][0])
      else:
        inp = jnp.concatenate(nodes[i][:j] + [upsample_bilinear_2x(nodes[i + 1][j - 1])], -1)
      out = VGGBlock(nb[i], nb[i], self.dtype, self.activation, name=f"conv{i}_{j}")(
        inp, train=train
      )
      nodes[i].append(out)
      return out

    node(0, 0)
    for k in range(1, NUM_LEVELS + 1):
      node(k, 0)
      for j in range(1, k + 1):
        node(k - j, j)

    features = nodes[0][NUM_LEVELS]
    if self.deep_supervision:
      heads = []
      for j in range(1, NUM_LEVELS + 1):
        head = _conv(
          self.num_classes, 1, fan_in_channels=nb[0], dtype=self.dtype, name=f"final{j}"
        )(nodes[0][j]).astype(out_dtype)
        self.sow("intermediates", "head_logits", head)
        heads.append(head)
      logits = sum(heads[1:], heads[0]) / len(heads)
    else:
      logits = _conv(self.num_classes, 1, fan_in_channels=nb[0], dtype=self.dtype, name="final")(
        features
      ).astype(out_dtype)
    return logits, features.astype(out_dtype)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (BatchNorm scale/bias included)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
