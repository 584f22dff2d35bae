"""`metadcseg-export`'s work: a run's model as a folder that travels (`inference.model`).

A run that finished saved its model in `<workdir>/model/` (the weights results.json scored,
the EMA ones with their chosen BatchNorm statistics); exporting copies it and checks that it
opens. A run trained before runs saved their model has none to copy: `rebuild` writes it
(`metadcseg_jax.training.export.rebuild_model`, from the run's checkpoints and training data;
`metadcseg-export` passes it).
"""

from __future__ import annotations

import pathlib
from typing import Callable

from metadcseg_jax import files
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.inference import model as model_lib


def export(
  workdir,
  output,
  *,
  overwrite: bool = False,
  rebuild: Callable[[pathlib.Path, pathlib.Path], None] | None = None,
) -> pathlib.Path:
  """Writes the model of the run in `workdir` to the folder `output`.

  Args:
    workdir: a finished run's folder.
    output: the model folder to write (created).
    overwrite: replace a model already in `output`.
    rebuild: `(workdir, output) -> None`, writes the model of a run that saved none
      (`metadcseg_jax.training.export.rebuild_model`); None: such a run is an error.

  Returns:
    `output`, once the model there opens.

  Raises:
    ConfigError: `output` holds a model already and not `overwrite`, or is the run's own.
    WorkdirError: `workdir` is not a finished run, or saved no model and `rebuild` is None.
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
  elif rebuild is not None:
    rebuild(workdir, output)
  else:
    raise WorkdirError(
      f"{workdir}: no {model_lib.RUN_MODEL_DIR}/ (a run trained before runs saved their model): "
      "metadcseg-export rebuilds it from the run's checkpoints"
    )
  model_lib.load_model(output)  # it opens, or the error is raised here rather than later
  return output
