"""Data parallelism over a device mesh, on one host or several (`jax.jit` with `NamedSharding`).

The train state is replicated; every batch (and the clean meta batch) is split along its first
axis over the mesh's `data` axis. The steps are the one-device steps, unchanged: written on the
global batch, they are partitioned by XLA, which inserts the all-reduces a global mean or sum
needs. So the mathematics is that of one device on the global batch: BatchNorm statistics over
the global batch, the meta-gradient from the whole meta batch, the per-batch normaliser of
Eq. 24 over the global batch, per-image quantities per image. Only the order of floating-point
sums differs (tests/test_parallel.py: 4 devices equal 1 to 1e-5 relative).

Several hosts: `initialize_distributed` joins the processes (`config.distributed`, or the
environment of a cluster manager that `jax.distributed.initialize()` recognises, e.g. SLURM);
each process then feeds only its rows of every global batch (`process_rows`,
`global_batch`).
"""

import dataclasses
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from metadcseg_jax.errors import ConfigError

DATA_AXIS = "data"
P = jax.sharding.PartitionSpec

# Environment variables that mean "launched as one of several processes" for the cluster
# managers jax.distributed.initialize() detects by itself.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: the device layout."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # devices on the data axis: -1 = every device of every process
  return mesh


def distributed_config() -> ml_collections.ConfigDict:
  """`config.distributed`: joining the processes of a multi-host run."""
  distributed = ml_collections.ConfigDict()
  # "auto": join when a cluster manager launched several processes (SLURM, Open MPI) or when
  # coordinator_address is set; "on": always call jax.distributed.initialize(); "off": never.
  distributed.initialize = "auto"
  distributed.coordinator_address = ""  # host:port of process 0 (no cluster manager)
  distributed.num_processes = 0  # with coordinator_address
  distributed.process_id = -1  # with coordinator_address
  distributed.timeout_s = 300  # how long to wait for the other processes to join
  return distributed


def _launched_as_several() -> bool:
  return any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_VARS)


def initialize_distributed(cfg: ml_collections.ConfigDict | None) -> bool:
  """Joins the other processes of a multi-host run (once per process, before any device use).

  Returns:
    Whether jax.distributed was initialised by this call.

  Raises:
    ConfigError: `cfg.initialize` is not auto/on/off, or coordinator_address is set without
      num_processes and process_id.
  """
  if cfg is None:
    return False
  mode = cfg.initialize
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"config.distributed.initialize={mode!r}: expected auto, on or off")
  explicit = bool(cfg.coordinator_address)
  if mode == "off" or (mode == "auto" and not explicit and not _launched_as_several()):
    return False
  if jax.distributed.is_initialized():
    return False
  kwargs: dict[str, Any] = {}
  if explicit:
    if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
      raise ConfigError(
        f"config.distributed.coordinator_address={cfg.coordinator_address!r} needs "
        f"num_processes >= 1 and 0 <= process_id < num_processes (got {cfg.num_processes}, "
        f"{cfg.process_id})"
      )
    kwargs = dict(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
    )
  jax.distributed.initialize(initialization_timeout=int(cfg.timeout_s), **kwargs)
  logging.info(
    "process %d of %d, %d local devices of %d",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


@dataclasses.dataclass(frozen=True)
class Parallel:
  """A 1-D `data` mesh and how the trainer places states and batches on it.

  Attributes:
    mesh: `jax.sharding.Mesh` over `num_devices` devices, axis "data".
  """

  mesh: jax.sharding.Mesh

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    """Split along the first axis over the `data` axis."""
    return jax.sharding.NamedSharding(self.mesh, P(DATA_AXIS))

  def check_batch(self, name: str, size: int) -> None:
    """ConfigError unless the global batch `size` splits evenly over the devices."""
    if size % self.num_devices:
      raise ConfigError(
        f"{name}={size} does not divide over the {self.num_devices} devices of the mesh "
        f"(config.mesh.data={self.num_devices}): use a multiple of {self.num_devices}, or "
        f"fewer devices"
      )

  def process_rows(self, global_size: int) -> tuple[int, int]:
    """`(first, count)`: the rows of a global batch of `global_size` that this process feeds.

    The mesh lists the devices process by process, so a process's rows are contiguous.
    """
    index_map = self.batch_sharding.addressable_devices_indices_map((global_size,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return min(starts), max(stops) - min(starts)

  def input_shard(self, global_size: int) -> dict[str, int]:
    """`{"shard_index", "num_shards"}` of `pipeline.train_dataset` for this process: which
    equal block of rows of every global batch it feeds."""
    first, count = self.process_rows(global_size)
    if first % count or global_size % count:
      raise ConfigError(
        f"process {jax.process_index()} owns rows {first}..{first + count - 1} of a batch of "
        f"{global_size}: not one of equal blocks (the mesh's devices are not grouped by process)"
      )
    return {"shard_index": first // count, "num_shards": global_size // count}

  def replicate(self, tree: Any) -> Any:
    """Every leaf on every device of the mesh (a multi-process run passes the same value on
    every process)."""

    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

    return jax.tree.map(put, tree)

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays split over the `data` axis."""
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)), local
    )

  def abstract(self, tree: Any) -> Any:
    """Shapes, dtypes and the replicated sharding of `tree`'s leaves (for an orbax restore onto
    this mesh, whatever mesh wrote the checkpoint)."""
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), tree
    )

  def fetch(self, tree: Any) -> Any:
    """Replicated global arrays -> numpy on every process."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

  def local(self, tree: Any) -> Any:
    """Replicated global arrays -> their copy on this process's first device: for work one
    process does alone (evaluation, figures), with no collective the others must join."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def make_parallel(mesh_cfg: ml_collections.ConfigDict | None) -> Parallel:
  """The mesh of `config.mesh` (`data` devices, -1 = all).

  Raises:
    ConfigError: more devices asked for than there are, or a count that is not a whole
      number of hosts.
  """
  devices = jax.devices()  # process by process, then by id
  want = -1 if mesh_cfg is None else int(mesh_cfg.data)
  if want == -1:
    want = len(devices)
  if not 1 <= want <= len(devices):
    raise ConfigError(
      f"config.mesh.data={want}: this run has {len(devices)} devices "
      f"({jax.process_count()} processes); use 1 to {len(devices)} or -1 for all"
    )
  if jax.process_count() > 1 and want != len(devices):
    raise ConfigError(
      f"config.mesh.data={want}: a run of {jax.process_count()} processes uses all "
      f"{len(devices)} devices (config.mesh.data=-1)"
    )
  return Parallel(jax.sharding.Mesh(np.array(devices[:want]), (DATA_AXIS,)))


def sync(name: str) -> None:
  """Waits for every process (no-op on one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
  """The process that writes the workdir's logs, figures and results."""
  return jax.process_index() == 0


def any_process(flags: list[bool]) -> list[bool]:
  """Each flag, true if it is true on any process: one small all-gather, so that every process
  takes the same decision at the same step (no communication on one process)."""
  if jax.process_count() == 1:
    return [bool(f) for f in flags]
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return [bool(v) for v in np.asarray(gathered).reshape(-1, len(flags)).max(axis=0)]
