"""Writing files so that a crash leaves the old version or the new one, never half of one; a full
disk as one `DiskFullError` naming the path and the free space."""

import contextlib
import errno
import fcntl
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

from metadcseg_jax.errors import DiskFullError

# What a full disk (or quota) reads as once wrapped by orbax, tensorstore or XLA.
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "ENOSPC")


def _default_mode() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and a rename.

  The file gets the ordinary permissions of a new file (0666 less the umask), not the 0600 of
  a temporary file: a data folder is often shared between users.
  """
  path = pathlib.Path(path)
  if isinstance(data, str):
    data = data.encode()
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on `lock_path` (created if missing) against the other processes
  on this machine and, through POSIX locks, on a network file system: one builds, the others
  wait and then find it built. The lock goes with the process, also on a kill."""
  lock_path = pathlib.Path(lock_path)
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    fcntl.lockf(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def snapshot(root: pathlib.Path) -> set[str]:
  """Every path below `root` (and `root` itself) that exists now."""
  found = {str(root)} if root.exists() else set()
  for parent, dirs, names in os.walk(root):
    found.update(os.path.join(parent, n) for n in dirs + names)
  return found


def remove_new(root: pathlib.Path, before: set[str]) -> list[str]:
  """Removes what appeared below `root` since `snapshot(root)` returned `before`."""
  removed = []
  for path in sorted(snapshot(root) - before, key=len):
    if any(path.startswith(r + os.sep) for r in removed):
      continue  # inside a folder already removed
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.unlink(path)
    removed.append(path)
  return removed


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is a full disk (ENOSPC, EDQUOT), also when
  orbax or tensorstore wrap it in their own exception with the text only."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, DiskFullError):
      return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(text in str(error) for text in _FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


def _size(n: float) -> str:
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} TB"


def free_space(path: str | os.PathLike) -> str:
  """'1.2 MB free of 6.0 MB' on the file system holding `path` (or its nearest existing
  parent)."""
  p = pathlib.Path(path).absolute()
  while not p.exists() and p != p.parent:
    p = p.parent
  try:
    usage = shutil.disk_usage(p)
  except OSError:
    return "free space unknown"
  return f"{_size(usage.free)} free of {_size(usage.total)}"


def disk_full_error(path: str | os.PathLike) -> DiskFullError:
  """The one-line error of a write to `path` that ran out of space."""
  return DiskFullError(
    f"no space left writing {path} ({free_space(path)}); the last checkpoint is intact: free "
    "some space and rerun the same command to resume"
  )


@contextlib.contextmanager
def full_disk_stops(path: str | os.PathLike) -> Iterator[None]:
  """Turns a full disk inside the block into `disk_full_error(path)`; other errors pass."""
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps OSError in its own types)
    if is_disk_full(e):
      raise disk_full_error(path) from e
    raise
