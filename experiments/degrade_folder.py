r"""A degraded copy of an image folder with clean masks, a share of them kept as trusted/.

    python -m experiments.degrade_folder --source=/data/Kvasir-SEG --out=/tmp/kvasir_own \
        --kind=l2b40 --trusted_share=0.1

Stands for "the masks you have" on data whose right masks are known, to try training on a
user's own folder (`metadcseg_jax.data.noise.folder`). BUILD_NOTES.md, "Your own data, tried".
"""

from absl import app
from absl import flags

from metadcseg_jax.data import noise
from metadcseg_jax.data.noise import folder

_SOURCE = flags.DEFINE_string("source", None, "Folder with images/ and masks/ (clean).")
_OUT = flags.DEFINE_string("out", None, "The new folder.")
_KIND = flags.DEFINE_enum("kind", "l2b40", list(noise.KINDS), "Noise kind for masks/.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise and trusted draw.")
_TRUSTED = flags.DEFINE_float("trusted_share", 0.1, "Share of original masks kept in trusted/.")
flags.mark_flags_as_required(["source", "out"])


def main(argv):
  del argv
  r = folder.degrade_folder(
    _SOURCE.value, _OUT.value, kind=_KIND.value, seed=_SEED.value, trusted_share=_TRUSTED.value
  )
  print(
    f"{r['n_images']} masks corrupted with {r['kind']} (1 - Dice {r['corruption_mean']:.3f} ± "
    f"{r['corruption_std']:.3f}), {len(r['trusted'])} originals in trusted/: {_OUT.value}"
  )


if __name__ == "__main__":
  app.run(main)
