r"""`metadcseg-evaluate --pred=DIR --ref=DIR`: score predicted masks against reference masks.

    metadcseg-evaluate --pred=runs/kvasir/pred --ref=/data/Kvasir-SEG/masks
    metadcseg-evaluate --pred=pred/ --ref=labelsTs/ --dataset_json=dataset.json --output=eval/

Pairs the two folders' files by stem (PNG, JPEG, BMP, TIFF masks: 0/255 or 0/1 binary, or class
indices; NIfTI .nii/.nii.gz volumes; MHA/MHD with SimpleITK installed) and scores each pair per
foreground class with the project's metrics, those of training's evaluation (Dice, IoU, HD95,
ASD; the distances in mm from a volume's header spacing, in pixels for 2D images), then per
case the mean over the foreground classes. A pair must have one shape and, for volumes, one
grid (affines equal within 1e-3 mm).

Empty masks, per class: both empty -> Dice 1, IoU 1, HD95 = ASD = 0; exactly one empty ->
Dice 0, IoU 0, HD95 = ASD = the image diagonal. Dice and IoU follow MONAI's DiceMetric and
MeanIoU with ignore_empty=False; the distances follow BraTS's fixed worst value (as nnU-Net's
BraTS evaluation, 373.13 mm, the diagonal of a BraTS volume), here the case's own diagonal.

A reference without a prediction stops the command before anything is scored (--missing=error,
as nnU-Net's evaluate_folder): --missing=empty scores it as an empty prediction (Dice 0),
--missing=skip leaves it out. A prediction without a reference is named and not scored. A pair
that cannot be read or does not match is one line; the others are scored and the command exits
with status 1. Prints a summary table (mean ± std per class and the foreground mean); writes
cases.csv (per case and class) and summary.json (mean, std, median) only into --output.
"""

from absl import flags

from metadcseg_jax import cli
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.inference import evaluate_folder

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  if "pred" in FLAGS:  # already defined in this process
    return
  flags.DEFINE_string("pred", None, "Folder of predicted masks.")
  flags.DEFINE_string("ref", None, "Folder of reference masks (file stems as in --pred).")
  flags.DEFINE_string(
    "output",
    None,
    "Folder to write cases.csv and summary.json into (created if needed). Default: print the "
    "summary only, write nothing.",
  )
  flags.DEFINE_integer(
    "num_classes",
    None,
    "Classes including background. Default: from --class_names or --dataset_json, else the "
    "largest label seen + 1 (at least 2).",
    lower_bound=2,
  )
  flags.DEFINE_list(
    "class_names", None, "Names of classes 1, 2, ... (not the background), e.g. liver,tumour."
  )
  flags.DEFINE_string(
    "dataset_json",
    None,
    "An nnU-Net / Decathlon dataset.json whose 'labels' name the classes (v1 {\"1\": \"liver\"} "
    "or v2 {\"liver\": 1}).",
  )
  flags.DEFINE_integer(
    "threshold", None, "Binarise JPEG masks (lossy: other values near edges) as value > THRESHOLD."
  )
  flags.DEFINE_enum(
    "missing",
    "error",
    list(evaluate_folder.MISSING),
    "A reference without a prediction: error (stop before scoring), empty (score it as an "
    "empty prediction) or skip (leave it out).",
  )
  flags.mark_flags_as_required(["pred", "ref"])


def main(argv):
  del argv
  names = FLAGS.class_names
  if FLAGS.dataset_json:
    if names:
      raise ConfigError("--class_names and --dataset_json both name the classes: pass one")
    names = evaluate_folder.class_names_from_dataset_json(FLAGS.dataset_json)[1:]
  if names and FLAGS.num_classes and FLAGS.num_classes != len(names) + 1:
    raise ConfigError(
      f"--num_classes={FLAGS.num_classes} but {len(names)} class names: the names are of "
      f"classes 1..{len(names)}, so num_classes is {len(names) + 1}"
    )
  out = evaluate_folder.prepare_output(FLAGS.output) if FLAGS.output else None
  result = evaluate_folder.evaluate_folder(
    FLAGS.pred,
    FLAGS.ref,
    num_classes=FLAGS.num_classes,
    class_names=names or None,
    missing=FLAGS.missing,
    threshold=FLAGS.threshold,
    echo=cli.echo,
  )
  print("\n".join(evaluate_folder.summary_lines(result)), flush=True)
  if out is not None:
    paths = evaluate_folder.write_outputs(result, out)
    print(f"wrote {', '.join(str(p) for p in paths)}", flush=True)
  return cli.exit_status(
    len(result.failures),
    f"{len(result.failures)} of {len(result.failures) + len(result.cases)} pairs could not be "
    "scored (listed above)",
  )


def run():
  """Console-script entry (pyproject `metadcseg-evaluate`)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
