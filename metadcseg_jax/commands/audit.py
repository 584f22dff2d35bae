r"""`metadcseg-audit --workdir=RUN`: rank a finished run's training masks by label quality.

    metadcseg-train --config=experiments/configs/synthetic.py --workdir=runs/meta
    metadcseg-audit --workdir=runs/meta --top=16

Reads the audit passes a meta method (l2b, metadcseg) wrote in its last epochs
(`metadcseg_jax.training.audit_passes`) and writes, into --out (default `<workdir>/audit`):
`audit.csv` (every training image, most suspicious first: rank, index in the training split, case
id, score, 1 − Dice between the mask and the model's, and where the clean masks are known because
the noise was injected, 1 − Dice to the clean mask), `suspicion.npy` ((N,H,W) float16, rows in the
CSV's order) and `gallery.png` (image, given mask, model's mask, suspicion map of the --top most
suspicious). With injected noise it also prints how well the score finds the corrupted masks (image
AUROC and AP, Spearman with 1 − Dice, pixel AP for the flipped pixels; `measured.json`, ROC curves
in `roc.png`), beside two scores without meta-weights (the hard and the soft disagreement between
the mask and the model's) and, with cleanlab installed (`pip install -e '.[audit]'`), cleanlab's
scores on the same probabilities (`metadcseg_jax.audit.report`).

`--recompute` first writes the audit passes from the run's kept checkpoints: for a run trained
with config.audit.epochs=0, or with another `--meta_images` (earlier passes are kept aside).
"""

from absl import flags

from metadcseg_jax import cli
from metadcseg_jax.audit import report as audit_report

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "A finished (or interrupted) run's folder.")
  flags.DEFINE_string("out", None, "Where to write the report (default: <workdir>/audit).")
  flags.DEFINE_integer("top", 12, "Images in the gallery.")
  flags.DEFINE_list(
    "corrupted_above",
    ["0.1", "0.3", "0.5"],
    "With injected noise: a mask is 'corrupted' when 1 − Dice to the clean mask exceeds this "
    "(the image AUROC and AP at each).",
  )
  flags.DEFINE_bool(
    "recompute",
    False,
    "First (re)compute the audit passes from the run's kept checkpoints: for a run trained "
    "with config.audit.epochs=0, or to change --meta_images. Earlier passes are moved to "
    "audit/replaced-<time>/.",
  )
  flags.DEFINE_integer(
    "meta_images",
    None,
    "With --recompute: clean meta images per audit batch (0: the training step's meta "
    "batches; default: the run's config.audit.meta_images).",
  )
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  if FLAGS.recompute:
    audit_report.recompute(FLAGS.workdir, meta_images=FLAGS.meta_images)
  r = audit_report.report(
    FLAGS.workdir, out=FLAGS.out, top=FLAGS.top, corrupted_above=FLAGS.corrupted_above
  )
  print("\n".join(audit_report.summary_lines(r)))


def run():
  """Console-script entry (pyproject `metadcseg-audit`)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
