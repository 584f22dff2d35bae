r"""One report of what the project does on a GPU, budgeted for ten minutes (`report.md` and
`report.json` in --output, rewritten after every measurement).

    python -m experiments.gpu_report --output=/tmp/gpu_report \
        --kvasir_dir=/data/Kvasir-SEG     # sections budgeted at 540 s in all
    python -m experiments.gpu_report --output=/tmp/gpu_report_tiny --tiny   # any CPU

Sections (`metadcseg_jax.tools.gpu_report`), in this order, each with a time budget
(--<section>_s; 0: off): throughput and MFU of every method at 256 px, batch 8 and 32, PyTorch's
steps beside them; the TF32 / highest / bf16 meta-weight error; the trainer against its bare
step at the Kvasir-SEG shape; epochs of the paper's Kvasir-SEG setting (--kvasir_config) and the
projected time of its whole table, in what the sections before it left. Without --kvasir_dir,
or with a folder that is absent, the last section is skipped; --tiny trains the synthetic set in
its place. A flag left out takes the preset's value (--tiny: the tiny one's).
"""

import os
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from metadcseg_jax import cli
from metadcseg_jax.benchmark import report
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.tools import gpu_report

FLAGS = flags.FLAGS
_GPU, _TINY = gpu_report.Settings(), gpu_report.tiny_settings()


def _default(name: str) -> str:
  gpu, tiny = getattr(_GPU, name), getattr(_TINY, name)
  show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
  return f"(default {show(gpu)}; --tiny: {show(tiny)})"


_OUTPUT = flags.DEFINE_string("output", None, "Folder for report.md and report.json.")
_TINY_FLAG = flags.DEFINE_bool(
  "tiny", False, "The tiny setting, for checking the report on a CPU (a minute or a few)."
)
flags.DEFINE_string("kvasir_dir", None, "The Kvasir-SEG folder (images/, masks/).")
flags.DEFINE_string(
  "data_dir", None, f"Dataset builds and compilation cache {_default('data_dir')}."
)
flags.DEFINE_list("methods", None, f"Methods of the throughput table {_default('methods')}.")
flags.DEFINE_list("batches", None, f"Batch sizes of the throughput table {_default('batches')}.")
flags.DEFINE_integer("size", None, f"Image size, sections 1-2 {_default('size')}.")
flags.DEFINE_integer("width", None, f"U-Net++ width, sections 1-2 {_default('width')}.")
flags.DEFINE_integer("channels", None, f"Input channels, sections 1-2 {_default('channels')}.")
flags.DEFINE_integer("repeats", None, f"Timed steps per row {_default('repeats')}.")
flags.DEFINE_bool("torch", None, f"PyTorch's steps where torch imports {_default('torch')}.")
flags.DEFINE_integer(
  "flops_processes", None, f"Helper processes for the CPU FLOPs {_default('flops_processes')}."
)
flags.DEFINE_integer(
  "precision_size", None, f"Image size of the precision section {_default('precision_size')}."
)
flags.DEFINE_integer(
  "precision_batch", None, f"Batch of the precision section {_default('precision_batch')}."
)
flags.DEFINE_list(
  "trainer_methods", None, f"Methods of the trainer section {_default('trainer_methods')}."
)
flags.DEFINE_integer("trainer_steps", None, f"Steps per trainer epoch {_default('trainer_steps')}.")
flags.DEFINE_integer(
  "trainer_runs", None, f"Trainer runs, the last measured {_default('trainer_runs')}."
)
flags.DEFINE_integer(
  "kvasir_warmup_epochs",
  None,
  f"Warm-up epochs of the Kvasir-SEG run (the projection counts the config's) "
  f"{_default('kvasir_warmup_epochs')}.",
)
flags.DEFINE_integer(
  "kvasir_max_epochs",
  None,
  f"At most this many epochs (0: until the time is up) {_default('kvasir_max_epochs')}.",
)
flags.DEFINE_string("table", None, f"Benchmark preset the projection counts {_default('table')}.")
for _name in gpu_report.SECTIONS:
  flags.DEFINE_float(
    f"{_name}_s",
    None,
    f"Seconds for the {_name} section (default {_GPU.budgets[_name]:.0f}; --tiny: "
    f"{_TINY.budgets[_name]:.0f}; 0: off).",
  )
config_flags.DEFINE_config_file(
  "kvasir_config",
  str(pathlib.Path(__file__).resolve().parent / "configs" / "kvasir_seg.py"),
  "The paper's Kvasir-SEG config (overridable: --kvasir_config.data.noise.kind=none).",
)
_SETTINGS = [
  "kvasir_dir",
  "data_dir",
  "methods",
  "batches",
  "size",
  "width",
  "channels",
  "repeats",
  "torch",
  "flops_processes",
  "precision_size",
  "precision_batch",
  "trainer_methods",
  "trainer_steps",
  "trainer_runs",
  "kvasir_warmup_epochs",
  "kvasir_max_epochs",
  "table",
] + [f"{name}_s" for name in gpu_report.SECTIONS]


def main(argv):
  del argv
  if not _OUTPUT.value:
    raise ConfigError("--output: give the report's folder")
  # JAX would otherwise take 75% of the GPU's memory at start, leaving PyTorch's steps little.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  given = {k: FLAGS[k].value for k in _SETTINGS if FLAGS[k].value is not None}
  gpu_report.run(
    gpu_report.settings_for(_TINY_FLAG.value, given),
    output=_OUTPUT.value,
    command=report.command_line(sys.argv, module="experiments.gpu_report"),
    kvasir_config=FLAGS.kvasir_config,
  )
  print(f"report: {pathlib.Path(_OUTPUT.value) / 'report.md'}")


if __name__ == "__main__":
  cli.run(main)
