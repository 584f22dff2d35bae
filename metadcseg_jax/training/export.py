"""The model of a run trained before runs saved their `model/`, rebuilt from its checkpoints.

`metadcseg-export` copies a run's `model/`; for a run that has none it calls `rebuild_model`: the
newest epoch checkpoint restored, with the EMA statistics results.json names recomputed on the
training images (which must then still be on disk), saved as `inference.model.save` saves a
finished run's model.
"""

import json
import pathlib

from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.inference import model as model_lib
from metadcseg_jax.training import runs
from metadcseg_jax.training import train


def rebuild_model(workdir: pathlib.Path, output: pathlib.Path) -> None:
  """Writes to `output` the model of the finished run in `workdir` that saved none.

  Raises:
    WorkdirError: the run has not finished (no results.json).
    CheckpointError: no epoch checkpoint restores.
  """
  results_path = workdir / "results.json"
  if not results_path.is_file():
    raise WorkdirError(f"{workdir}: no results.json, the run has not finished")
  results = json.loads(results_path.read_text())
  run = runs.open_run(workdir)
  state = run.restored()
  # A results.json older than the per-run choice names no statistics: its EMA scores used the
  # run's setting (`configs.upgrade` gives the runs older than the setting "ema").
  chosen = results.get("ema_batch_stats") or run.config.train.ema_batch_stats
  if chosen == "recompute":
    compiled = train.compiled_for(run.config, run.steps_per_epoch)
    state = train.recompute_ema_stats(compiled, state, run.splits, run.config)
  model_lib.save(
    output,
    config=run.config,
    state=state,
    pre=model_lib.preprocessing(run.config, run.splits.info),
    ema_batch_stats=chosen,
    scores={k: results[k] for k in ("val", "test") if k in results},
    trained={k: results.get(k) for k in ("workdir", "dataset", "epoch")},
  )
