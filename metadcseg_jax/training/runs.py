"""A run's pieces, rebuilt from its settings as the trainer builds them: one way to open a run.

    run = runs.open_run("runs/meta")          # a run folder of `metadcseg-train`
    state = run.restored()                     # the newest epoch checkpoint that restores
    probs = run.method.predict(state, images, variant="ema")

The trainer (`training.train`) builds its run with `prepare` from the config it was given; the audit
(`metadcseg-audit --recompute`) and the checks in `experiments/` open a finished one with
`open_run`, from the settings it was started with (`config.json`). Both go through the same
steps, so what they restore fits: the data splits, the settings the method takes from the data
(`methods.with_data_settings`), the steps per epoch, the method and its checkpoints.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections

from metadcseg_jax import methods
from metadcseg_jax import parallel
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import CheckpointError
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.training import checkpoint
from metadcseg_jax.training import workdir as workdir_lib

DATA_INFO = "data_info.json"


@dataclasses.dataclass
class Run:
  """One run: its folder, settings and data, and (built when first asked for) its method.

  Attributes:
    workdir: the run's folder.
    config: the settings, with those the method takes from the data.
    data_settings: those settings, {name: value} ({} for most methods).
    splits: the data splits (train, meta, val, test) and their `info`.
    steps_per_epoch: optimizer steps per epoch (whole batches of the training split).
  """

  workdir: workdir_lib.Workdir
  config: ml_collections.ConfigDict
  data_settings: dict[str, Any]
  splits: pipeline.DataSplits
  steps_per_epoch: int

  @functools.cached_property
  def method(self):
    """The method of `config.method` (`methods.create`); the trainer uses its compiled one."""
    return methods.create(self.config, steps_per_epoch=self.steps_per_epoch)

  def initial_state(self) -> Any:
    """The state before the first step (seeded by `config.seed`)."""
    return self.method.init_state(jax.random.PRNGKey(self.config.seed))

  def abstract_state(self) -> Any:
    """The state's shapes and dtypes, without computing it (what a restore needs)."""
    return jax.eval_shape(self.initial_state)

  def checkpointer(self, *, writer: bool = False) -> checkpoint.Checkpointer:
    """The run's checkpoints (`workdir/checkpoints`). `writer`: the run that holds the
    workdir's lock (the trainer); a reader leaves what a running trainer writes alone."""
    return checkpoint.Checkpointer(
      self.workdir.checkpoints,
      keep=self.config.train.keep_checkpoints,
      config=self.config,
      steps_per_epoch=self.steps_per_epoch,
      writer=writer,
    )

  def restore(self, ckpt: checkpoint.Checkpointer, epoch: int | None = None) -> Any:
    """The state saved at `epoch`, or (None) that of the newest epoch checkpoint that restores.

    Raises:
      CheckpointError: the checkpoint does not fit the settings, or (`epoch` None) the run kept
        no epoch checkpoint or none restores.
    """
    settings = self.workdir.first_config()
    if epoch is not None:
      return ckpt.restore_state(epoch, self.abstract_state(), fallback_settings=settings)
    found = ckpt.restore_latest(self.abstract_state(), fallback_settings=settings)
    if found is None:
      raise CheckpointError(f"{ckpt.directory}: no checkpoint to restore")
    return found[1]

  def restored(self, epoch: int | None = None) -> Any:
    """`restore`, with the run's checkpoints opened for it and closed after."""
    with self.checkpointer() as ckpt:
      return self.restore(ckpt, epoch)


def prepare(config: ml_collections.ConfigDict, workdir, *, write_info: bool = False) -> Run:
  """The run of `config` in `workdir` (a path or a `Workdir`): its data and data settings.

  On several processes, process 0 builds the dataset and the noisy labels and the others then
  read its caches. `write_info`: process 0 writes the splits' sizes and noise to
  `workdir/data_info.json`.

  Raises:
    ConfigError: the batch size exceeds the training split. DataError: as
      `pipeline.prepare_data`.
  """
  wd = workdir if isinstance(workdir, workdir_lib.Workdir) else workdir_lib.Workdir(workdir)
  t = config.train
  main = parallel.is_main_process()
  if not main:
    parallel.sync("data: built by process 0")
  splits = pipeline.prepare_data(config.data, meta_batch_size=t.meta_batch_size, workdir=wd.path)
  if main:
    if write_info:
      pipeline.save_info(splits, wd.path / DATA_INFO)
    parallel.sync("data: built by process 0")
  steps_per_epoch = len(splits.train) // t.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
      f"config.train.batch_size={t.batch_size} exceeds the {len(splits.train)} training examples"
    )
  config, data_settings = methods.with_data_settings(config, splits.info)
  return Run(wd, config, data_settings, splits, steps_per_epoch)


def run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The settings a run was started with (its `config.json`).

  Raises:
    WorkdirError: the folder holds no readable config.json.
  """
  settings = workdir_lib.Workdir(workdir).first_config()
  if settings is None:
    raise WorkdirError(f"{workdir}: no config.json, not a metadcseg-train run folder")
  return ml_collections.ConfigDict(settings)


def open_run(workdir: str | os.PathLike) -> Run:
  """The run in `workdir`, rebuilt from the settings it was started with.

  Raises:
    WorkdirError: not a run folder. ConfigError, DataError: as `prepare`.
  """
  return prepare(run_config(workdir), workdir)
