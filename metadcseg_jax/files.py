"""Writing files so that a crash leaves the old version or the new one, never half of one."""

import os
import pathlib
import shutil
import tempfile


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
