"""Segmentation backbones: U-Net and U-Net++ (flax.linen, BatchNorm)."""

import jax.numpy as jnp
import flax.linen as nn

from metadcseg_jax.core.models.unet import count_params
from metadcseg_jax.core.models.unet import UNet
from metadcseg_jax.core.models.unet import UNetPlusPlus
from metadcseg_jax.core.models.unet import upsample_bilinear_2x
from metadcseg_jax.core.models.unet import VGGBlock

_ALIASES = {
  "unet": "unet",
  "u-net": "unet",
  "unet++": "unet++",
  "u-net++": "unet++",
  "unetplusplus": "unet++",
  "unet_plus_plus": "unet++",
  "nested_unet": "unet++",
  "nestedunet": "unet++",
}
MODEL_NAMES = ("unet", "unet++")


def build_model(
  name: str, *, num_classes: int, width: int, deep_supervision: bool = False, dtype=jnp.float32
) -> nn.Module:
  """Builds a backbone by name.

  Args:
    name: "unet" or "unet++" (aliases: "u-net", "unetplusplus",
      "nested_unet", case-insensitive).
    num_classes: L, logit channels.
    width: channels of the first level; levels use width * (1, 2, 4, 8, 16).
    deep_supervision: U-Net++ only: average four heads on X^{0,1..4}.
    dtype: computation dtype (parameters stay float32, logits come back
      float32).

  Returns:
    An unbound flax module; call `init(rng, x, train=False)` then `apply`.

  Raises:
    ValueError: unknown name, deep supervision asked of the plain U-Net, or a
      non-positive num_classes / width.
  """
  key = _ALIASES.get(str(name).lower())
  if key is None:
    raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if width < 1:
    raise ValueError(f"width must be >= 1, got {width}")
  if key == "unet":
    if deep_supervision:
      raise ValueError("deep_supervision needs the nested decoder: use 'unet++'")
    return UNet(num_classes=num_classes, width=width, dtype=dtype)
  return UNetPlusPlus(
    num_classes=num_classes, width=width, deep_supervision=deep_supervision, dtype=dtype
  )


__all__ = [
  "MODEL_NAMES",
  "UNet",
  "UNetPlusPlus",
  "VGGBlock",
  "build_model",
  "count_params",
  "upsample_bilinear_2x",
]
