r"""`metadcseg-export --workdir=RUN --output=DIR`: a trained model as a folder that travels.

    metadcseg-export --workdir=runs/kvasir --output=models/kvasir
    metadcseg-predict --model=models/kvasir --input=new/ --output=pred/

Writes model.json (the settings, the preprocessing, the class names, the scores the run
reported) and weights.msgpack (the raw and EMA weights, the EMA ones with the BatchNorm
statistics results.json scored them with). `metadcseg-predict --model=DIR` and
`metadcseg_jax.load_model(DIR)` open it without the training data, the run folder or a config
file. An existing model in --output is not replaced without --overwrite.
"""

from absl import flags

from metadcseg_jax import cli
from metadcseg_jax.inference import export
from metadcseg_jax.training import export as training_export

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  if "workdir" in FLAGS:  # already defined in this process
    return
  flags.DEFINE_string("workdir", None, "A finished run's folder.")
  flags.DEFINE_string("output", None, "The model folder to write (created if needed).")
  flags.DEFINE_bool("overwrite", False, "Replace a model already in --output.")
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  del argv
  path = export.export(
    FLAGS.workdir,
    FLAGS.output,
    overwrite=FLAGS.overwrite,
    rebuild=training_export.rebuild_model,
  )
  print(f"exported {FLAGS.workdir} to {path}", flush=True)


def run():
  """Console-script entry (pyproject `metadcseg-export`)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
