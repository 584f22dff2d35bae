r"""Measured corruption 1 - Dice (Eq. 20) of each noise kind on synthetic blobs.

Prints a markdown table (mean ± std over masks, and the share of non-empty
masks that came out empty, by the small-mask rule or by erosion) for the L2B levels with and
without kernel scaling,
and optionally GSD-Net's Markov and distance noise. Run:

  python -m experiments.noise_table          # ~4 s on this 2-core CPU
  python -m experiments.noise_table --gsd    # + markov_sr/se, dist: ~12 s
"""

from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from metadcseg_jax.data import noise
from metadcseg_jax.data import synthetic
from metadcseg_jax.data.noise import l2b

_N = flags.DEFINE_integer("n", 100, "Blob masks per image size.")
_SIZES = flags.DEFINE_list("sizes", ["64", "256"], "Image sides.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed (blobs use seed + 1).")
_GSD = flags.DEFINE_bool("gsd", False, "Also GSD-Net's markov/dist kinds.")


def table(n: int, sizes: Sequence[int], seed: int, gsd: bool) -> str:
  """Returns the markdown table."""
  rows = [
    "| size | kind | kernel scaling | kernels | small-mask threshold | "
    "1 − Dice (mean ± std) | emptied |",
    "|---|---|---|---|---|---|---|",
  ]
  for size in sizes:
    clean = synthetic.blob_masks(n, size, seed=seed + 1)
    settings = [(k, s) for k in l2b.L2B_LEVELS for s in (False, True)]
    if gsd:
      settings += [(k, None) for k in ("markov_sr", "markov_se", "dist")]
    for kind, scale in settings:
      opts = {} if scale is None else {"scale_kernels_with_size": scale}
      noisy = noise.corrupt_masks(clean, kind=kind, seed=seed, **opts)
      rate = noise.measured_corruption(clean, noisy)
      emptied = np.mean((noisy.sum((1, 2)) == 0) & (clean.sum((1, 2)) > 0))
      if scale is None:
        kernels, thr, scale_txt = "-", "-", "-"
      else:
        ks, t = l2b.l2b_kernel_sizes(kind, clean.shape, scale_kernels_with_size=scale)
        kernels, thr, scale_txt = ",".join(map(str, ks)), f"{t:g}", str(scale)
      rows.append(
        f"| {size} | {kind} | {scale_txt} | {kernels} | {thr} | "
        f"{rate.mean():.3f} ± {rate.std():.3f} | {emptied:.0%} |"
      )
  return "\n".join(rows)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  print(table(_N.value, [int(s) for s in _SIZES.value], _SEED.value, _GSD.value))


if __name__ == "__main__":
  app.run(main)
