"""A run's folder: one run at a time (a lock), a log that survives a kill, the settings history.

    wd = Workdir(path)              # a clear error if `path` is a file
    with wd.locked():               # a second run on the same folder gets a one-line error
      wd.record_config(config, argv)
      wd.metrics.append({"epoch": 1, ...})

Files: `.lock` (while a run holds the folder: pid, host, start), `config.json` (the settings of
the first invocation), `config_history.jsonl` (one line per invocation: time, host, pid,
command line, settings), `metrics.jsonl` (one JSON object per line) and, mirroring it,
TensorBoard's `events.out.tfevents.*` (`metadcseg_jax.training.summaries`).
"""

import contextlib
import datetime
import errno
import json
import os
import pathlib
import socket
import sys
from typing import Any, Iterator

from absl import logging
import ml_collections

from metadcseg_jax import configs
from metadcseg_jax import files
from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.training import summaries as summaries_lib

LOCK_NAME = ".lock"


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks (Linux), to tell a reused pid apart."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  # Field 22, counted after the parenthesised command name (which may hold spaces).
  return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by another user
  now = _process_start(pid)
  return started is None or now is None or now == started


class MetricsLog:
  """`metrics.jsonl`: appended one whole line per write, read back tolerantly.

  Each record is one `os.write` of a complete line to a file opened for appending, so a kill
  leaves a line whole or absent; should a line still be torn (a full disk, a crash of the
  machine), `read` drops it with a warning naming the file.

  With `summaries`, every record is also written to TensorBoard's event file, and
  `truncate_after` rewrites that to the records kept.
  """

  def __init__(self, path: pathlib.Path, summaries: summaries_lib.Summaries | None = None):
    self.path = path
    self.summaries = summaries

  def append(self, record: dict[str, Any]) -> None:
    """Appends one line.

    Raises:
      DiskFullError: the disk is full; the file is left as it was (no torn line).
    """
    data = (json.dumps(record) + "\n").encode()
    with files.full_disk_stops(self.path):
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
      try:
        size = os.fstat(fd).st_size
        try:
          if os.write(fd, data) < len(data):  # a short write is the disk filling up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        except OSError:
          os.ftruncate(fd, size)
          raise
      finally:
        os.close(fd)
    if self.summaries is not None:
      self.summaries.write_record(record)

  def read(self) -> list[dict[str, Any]]:
    """The records in file order; unreadable lines are dropped with a warning."""
    if not self.path.exists():
      return []
    records = []
    lines = self.path.read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or "epoch" not in record:
          raise ValueError("not a record with an 'epoch'")
      except ValueError as e:
        where = "its last line" if n == len(lines) else f"line {n}"
        logging.warning(
          "%s: dropped %s, which is not a whole JSON record (%s); a run killed "
          "while writing leaves such a line",
          self.path,
          where,
          e,
        )
        continue
      records.append(record)
    return records

  def truncate_after(self, epoch: int, *, diagnostics_before: int | None = None) -> None:
    """Keeps the records of epochs <= `epoch` (a killed run may have logged past its
    checkpoint) and drops torn lines; rewritten atomically. The event files are rewritten
    from the kept records.

    Args:
      diagnostics_before: resuming inside epoch `epoch + 1` at this global step: that
        epoch's diagnostics records of earlier steps are kept too.
    """
    kept = [
      r
      for r in self.read()
      if r["epoch"] <= epoch
      or (
        diagnostics_before is not None
        and r["epoch"] == epoch + 1
        and r.get("split") == "diagnostics"
        and r.get("step", diagnostics_before) < diagnostics_before
      )
    ]
    if self.path.exists():
      files.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    if self.summaries is not None:
      self.summaries.rebuild(kept)


HINT_WRITABLE = "pass a --workdir in a folder you can write to"


def make_dir(path: str | os.PathLike, *, writable: bool = True) -> pathlib.Path:
  """Creates the folder `path` (and its missing parents) and, with `writable`, checks that it
  can be written.

  Raises:
    WorkdirError: `path` or a parent is a file, or the folder cannot be created or written,
      naming the folder at fault.
  """
  path = pathlib.Path(path).expanduser().resolve()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"workdir {path} exists and is not a directory: pass a folder")
  hint = HINT_WRITABLE
  if not path.exists():
    # The nearest folder that exists is the one at fault when nothing below it can be made.
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
      raise WorkdirError(f"cannot create workdir {path}: {existing} is a file, not a folder")
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "is on a read-only file system" if e.errno == errno.EROFS else "is not writable"
        raise WorkdirError(f"cannot create workdir {path}: {existing} {why}; {hint}") from None
      first = next(p for p in (path, *path.parents) if p.parent == existing)
      raise WorkdirError(
        f"cannot create workdir {path}: cannot create {first} in {existing} ({e.strerror}); {hint}"
      ) from None
  if writable and not os.access(path, os.W_OK):
    raise WorkdirError(f"workdir {path} is not writable; {hint}")
  return path


class Workdir:
  """The folder of one run (created if missing)."""

  def __init__(self, path: str | os.PathLike):
    # Reading a finished run needs no write access; taking the lock checks it.
    self.path = make_dir(path, writable=False)
    self.summaries = summaries_lib.Summaries(self.path)
    self.metrics = MetricsLog(self.path / "metrics.jsonl", self.summaries)
    self.checkpoints = self.path / "checkpoints"
    self._lock_path = self.path / LOCK_NAME

  # -- the lock ----------------------------------------------------------------------------

  def _holder(self) -> dict[str, Any]:
    try:
      return json.loads(self._lock_path.read_text())
    except (OSError, ValueError):
      return {}

  def _try_lock(self) -> bool:
    me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": _now(),
      "process_start": _process_start(os.getpid()),
      "argv": sys.argv,
    }
    try:
      fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      return False
    except OSError as e:
      raise WorkdirError(
        f"workdir {self.path} is not writable ({e.strerror}); {HINT_WRITABLE}"
      ) from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return True

  def acquire(self) -> None:
    """Takes the folder for this process; a stale lock of a dead process is taken over.

    Raises:
      WorkdirError: another live process (or a process on another host) holds the folder, or
        the folder is not writable.
    """
    if self._try_lock():
      return
    holder = self._holder()
    pid, host = holder.get("pid"), holder.get("host")
    stale = (
      host == socket.gethostname()
      and isinstance(pid, int)
      and not _alive(pid, holder.get("process_start"))
    )
    if stale or not holder:
      logging.warning(
        "%s: taking over the lock of %s, which is no longer running",
        self.path,
        f"pid {pid} on {host} (started {holder.get('started')})"
        if holder
        else "an unreadable lock file",
      )
      self._lock_path.unlink(missing_ok=True)
      if self._try_lock():
        return
      holder = self._holder()
      pid, host = holder.get("pid"), holder.get("host")
    raise WorkdirError(
      f"workdir {self.path} is in use by pid {pid} on {host} since {holder.get('started')}; "
      f"wait for that run to finish, use another --workdir, or delete {self._lock_path} if "
      f"that run is gone"
    )

  def release(self) -> None:
    self.summaries.close()
    if self._holder().get("pid") == os.getpid():
      self._lock_path.unlink(missing_ok=True)

  @contextlib.contextmanager
  def locked(self) -> Iterator["Workdir"]:
    self.acquire()
    try:
      yield self
    finally:
      self.release()

  # -- settings ----------------------------------------------------------------------------

  def record_config(self, config: ml_collections.ConfigDict, argv: list[str] | None = None) -> None:
    """Keeps the first invocation's settings in config.json and appends every invocation's
    to config_history.jsonl, so the settings behind each checkpoint stay known."""
    settings = json.loads(config.to_json_best_effort())
    first = self.path / "config.json"
    if not first.exists():
      files.write_atomic(first, json.dumps(settings, indent=1))
    entry = {
      "time": _now(),
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "argv": list(sys.argv if argv is None else argv),
      "config": settings,
    }
    with (self.path / "config_history.jsonl").open("a") as f:
      f.write(json.dumps(entry) + "\n")

  def first_config(self) -> dict[str, Any] | None:
    """The settings of the first invocation (config.json), if readable, brought up to date
    (`configs.upgrade`: a field added since reads as what the run did without it)."""
    try:
      settings = json.loads((self.path / "config.json").read_text())
    except (OSError, ValueError):
      return None
    return configs.upgrade(settings)
