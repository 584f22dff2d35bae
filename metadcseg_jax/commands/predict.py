r"""`metadcseg-predict --model=RUN_OR_MODEL --input=PATH [PATH ...] --output=DIR`: masks for new
images and volumes, in each input's own size and geometry.

    metadcseg-predict --model=runs/kvasir --input=/data/new_polyps/ --output=pred/
    metadcseg-predict --model=exported/ --input='scans/*.nii.gz' --output=pred/ --probabilities

--model is a finished run's folder (its model/) or a folder written by metadcseg-export.
--input takes files, folders (their image and volume files) and globs (quoted), several times
or comma-separated: 2D images (PNG, JPEG, BMP, TIFF), NIfTI volumes (.nii, .nii.gz) and, with
SimpleITK installed, MHA/MHD. The preprocessing is the training run's own (channels, resizing,
intensity normalisation, which modality of a multi-channel volume), read from the model.
Outputs in --output: a 2D image's mask as a PNG of its height and width (0/255 for two classes,
class indices for more), a volume's as the same format with the input's shape, affine and
header (predicted slice by slice along its last axis); --probabilities adds the class
probabilities (float32; `<name>_probabilities.npy` (H,W,L) for an image, a 4D volume for a
volume). --variant=raw|ema picks the weights (default: those results.json reports, ema).

A file that cannot be read is one line naming it and why; the others are written and the
command ends with the count and exit status 1. Outputs that exist are not replaced without
--overwrite (an error before any work).
"""

from absl import flags

from metadcseg_jax import cli
from metadcseg_jax.inference import model as model_lib
from metadcseg_jax.inference import predict

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  if "model" in FLAGS:  # already defined in this process
    return
  flags.DEFINE_string("model", None, "A finished run's folder, or an exported model folder.")
  flags.DEFINE_list("input", None, "Files, folders or globs of images and volumes.")
  flags.DEFINE_string("output", None, "Folder for the masks (created if needed).")
  flags.DEFINE_bool("probabilities", False, "Also write the class probabilities (float32).")
  flags.DEFINE_enum(
    "variant", None, list(model_lib.VARIANTS), "Weights: raw or ema (default: the model's, ema)."
  )
  flags.DEFINE_bool("overwrite", False, "Replace outputs that exist.")
  flags.DEFINE_integer("batch_size", 8, "Images or slices per call (rounded up to the devices).")
  flags.mark_flags_as_required(["model", "input", "output"])


def main(argv):
  inputs = list(FLAGS.input) + list(argv[1:])  # a shell-expanded glob arrives as arguments
  model = model_lib.load_model(FLAGS.model, batch_size=FLAGS.batch_size)
  result = predict.predict_paths(
    model,
    inputs,
    FLAGS.output,
    probabilities=FLAGS.probabilities,
    variant=FLAGS.variant,
    overwrite=FLAGS.overwrite,
    echo=cli.echo,
  )
  print(f"wrote {len(result.written)} masks to {FLAGS.output}", flush=True)
  return cli.exit_status(
    len(result.failures), f"{len(result.failures)} inputs failed (listed above)"
  )


def run():
  """Console-script entry (pyproject `metadcseg-predict`)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
