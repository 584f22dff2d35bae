"""`metadcseg-export`'s work: a run's model as a folder that travels (`inference.model`).

A run that finished saved its model in `<workdir>/model/` (the weights results.json scored,
the EMA ones with their chosen BatchNorm statistics); exporting copies it and checks that it
opens. A run trained before runs saved their model is rebuilt from its newest epoch
checkpoint, with the EMA statistics results.json names recomputed on the training images
(which must then still be on disk).
"""

from __future__ import annotations

import json
import pathlib

from metadcseg_jax import files
from metadcseg_jax import runs
from metadcseg_jax import train
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.inference import model as model_lib


def export(workdir, output, *, overwrite: bool = False) -> pathlib.Path:
  """Writes the model of the run in `workdir` to the folder `output`.

  Raises:
    ConfigError: `output` holds a model already and not `overwrite`, or is the run's own.
    WorkdirError: `workdir` is not a finished run.
  """
  workdir, output = pathlib.Path(workdir).expanduser(), pathlib.Path(output).expanduser()
  if (output / model_lib.MODEL_FILE).exists() and not overwrite:
    raise ConfigError(f"{output} holds a model already: pass --overwrite or another --output")
  saved = workdir / model_lib.RUN_MODEL_DIR
  if (saved / model_lib.MODEL_FILE).is_file():
    if saved.resolve() == output.resolve():
      raise ConfigError(f"{output} is the run's own model folder: export to another folder")
    output.mkdir(parents=True, exist_ok=True)
    with files.full_disk_stops(output):
      for name in (model_lib.WEIGHTS_FILE, model_lib.MODEL_FILE):  # model.json last: complete
        files.write_atomic(output / name, (saved / name).read_bytes())
  else:
    _rebuild(workdir, output)
  model_lib.load_model(output)  # it opens, or the error is raised here rather than later
  return output


def _rebuild(workdir: pathlib.Path, output: pathlib.Path) -> None:
  """The model of a run that did not save one, from its newest epoch checkpoint."""
  results_path = workdir / "results.json"
  if not results_path.is_file():
    raise WorkdirError(f"{workdir}: no results.json, the run has not finished")
  results = json.loads(results_path.read_text())
  run = runs.open_run(workdir)
  ckpt = run.checkpointer()
  try:
    state = run.restore(ckpt)
  finally:
    ckpt.close()
  chosen = results.get("ema_batch_stats", "ema")
  if chosen == "recompute":
    compiled = train.compiled_for(run.config, run.steps_per_epoch)
    state = train.recompute_ema_stats(compiled, state, run.splits, run.config)
  model_lib.save(
    output,
    config=run.config,
    state=state,
    pre=train.preprocessing(run.config, run.splits.info),
    ema_batch_stats=chosen,
    scores={k: results[k] for k in ("val", "test") if k in results},
    trained={k: results.get(k) for k in ("workdir", "dataset", "epoch")},
  )
