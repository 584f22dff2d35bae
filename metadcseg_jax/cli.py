"""What every command-line entry point shares: absl start-up, help, user errors as one line.

    def main(argv): ...
    def run(): cli.run(main)         # the console script's entry

`--help` (`-h`, `--helpshort`) prints the entry module's docstring, the command's own flags
with one-line descriptions and, for a command with `--config`, the config files that ship;
it exits 0. (absl's own `--help` lists the flags of the console-script wrapper, which defines
none; `--helpfull` still lists every flag, JAX's and absl's included.)

A `UserError` (bad setting, bad data, busy or unwritable workdir, unrestorable checkpoint, NaN
loss), a config file that is missing, unreadable, has a syntax error or fails, and a mistyped
flag or config key print one line, `error: ...`, and exit with status 2; the traceback is
kept with `--verbosity=1` (or `-v 1`) or METADCSEG_DEBUG=1. Any other exception is a
programming error and keeps its traceback.

A run that stopped and can be resumed (`RunStopped`: a stop signal during training, a full
disk) prints one line, `stopped: ...`, and exits with status 75 (`EXIT_RESUMABLE`, sysexits'
EX_TEMPFAIL): a job script can requeue on 75, treat 0 as done and anything else as an error.
"""

import ast
import inspect
import logging as std_logging
import os
import pathlib
import re
import sys
import textwrap
import traceback
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections.config_flags import config_flags as ml_config_flags

from metadcseg_jax.errors import EXIT_RESUMABLE
from metadcseg_jax.errors import RunStopped
from metadcseg_jax.errors import UserError

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
HELPFULL_ARGS = ("--helpfull", "-helpfull")
WIDTH = 100


class ConfigFileError(UserError):
  """A config file that cannot be found, read, compiled or run (raised while parsing flags)."""


def _prog() -> str:
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "metadcseg"


def _debug_requested(argv: list[str]) -> bool:
  if os.environ.get("METADCSEG_DEBUG"):
    return True
  for i, a in enumerate(argv):
    m = re.match(r"^--?(v|verbosity)(?:=(-?\d+))?$", a)
    if m:
      value = m.group(2) if m.group(2) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
      if re.fullmatch(r"-?\d+", value) and int(value) >= 1:
        return True
  return False


def _debug() -> bool:
  verbosity = FLAGS["verbosity"].value if "verbosity" in FLAGS else 0
  return _debug_requested(sys.argv) or (verbosity or 0) >= 1


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


# -- help -------------------------------------------------------------------------------------


def configs_dir() -> pathlib.Path | None:
  """experiments/configs, where the config files that ship are: below the working folder (a
  checkout's root) or beside the package (a checkout installed with `pip install -e .`)."""
  for root in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parents[1]):
    folder = root / "experiments" / "configs"
    if folder.is_dir():
      return folder.resolve()
  return None


def _shown(path: pathlib.Path) -> str:
  """`path` relative to the working folder when below it (as a user would type it)."""
  try:
    return str(path.relative_to(pathlib.Path.cwd()))
  except ValueError:
    return str(path)


def shipped_configs() -> list[tuple[pathlib.Path, str]]:
  """The config files that ship (those defining `get_config`) and the first sentence of each
  docstring, read without running them."""
  folder = configs_dir()
  out = []
  for path in sorted(folder.glob("*.py")) if folder else []:
    try:
      module = ast.parse(path.read_text())
    except (OSError, SyntaxError):
      continue
    if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in module.body):
      continue
    doc = (ast.get_docstring(module) or "").split("\n\n")[0]
    doc = " ".join(doc.split())
    first = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0]
    if len(first) > 100:  # a one-line description: the asides go
      first = re.sub(r"\s*\([^()]*\)", "", first)
    out.append((path, first))
  return out


def _is_config_file(flag) -> bool:
  return isinstance(flag.parser, (ml_config_flags.ConfigFileFlagParser, _CheckedConfigParser))


def _required(flag) -> bool:
  return any(
    "must have a value other than None" in getattr(v, "message", "")
    for v in getattr(flag, "validators", [])
  )


def _flag_form(flag) -> str:
  if _is_config_file(flag):
    return f"--{flag.name}=FILE[:ARG]"
  if isinstance(flag, flags.BooleanFlag):
    return f"--[no]{flag.name}"
  values = getattr(flag.parser, "enum_values", None)
  if values:
    return f"--{flag.name}={'|'.join(values)}"
  kind = flag.flag_type()
  placeholder = (
    "A,B,..."
    if "list" in kind
    else "DIR"
    if flag.name.endswith(("dir", "out"))
    else {"int": "INT", "integer": "INT", "float": "FLOAT"}.get(kind, "VALUE")
  )
  return f"--{flag.name}={placeholder}"


def _flag_help(flag) -> str:
  text = " ".join((flag.help or "").split())
  if getattr(flag.parser, "enum_values", None):  # absl prefixes the values, shown already
    text = re.sub(r"^<[^>]*>: ", "", text)
  if _required(flag):
    return f"{text} Required."
  default = flag.default
  if _is_config_file(flag) or default in (None, "", []):
    return text
  if isinstance(default, (list, tuple)):
    default = ",".join(map(str, default))
  return f"{text} (default: {default})"


def _rows(rows: list[tuple[str, str]]) -> list[str]:
  """Two columns, the second wrapped to WIDTH (a long first cell puts it on the next line)."""
  column = min(max((len(a) for a, _ in rows), default=0), 30) + 4
  lines = []
  for left, right in rows:
    wrapped = textwrap.wrap(right, WIDTH - column) or [""]
    if len(left) + 4 > column:
      lines.append(f"  {left}")
      lines.extend(" " * column + w for w in wrapped)
    else:
      lines.append(f"  {left}".ljust(column) + wrapped[0])
      lines.extend(" " * column + w for w in wrapped[1:])
  return lines


def help_text(module_name: str, prog: str | None = None) -> str:
  """The `--help` of the command whose entry module is `module_name` (its flags defined)."""
  prog = prog or _prog()
  module = sys.modules.get(module_name)
  doc = textwrap.dedent(inspect.getdoc(module) or "").strip() if module else ""
  own = FLAGS.get_key_flags_for_module(module_name)
  if not own and module_name == "__main__":  # `python -m experiments.x`: absl keys by argv[0]
    own = FLAGS.get_key_flags_for_module(sys.argv[0])
  own = sorted(own, key=lambda f: f.name)
  has_config = any(_is_config_file(f) for f in own)
  rows = [(_flag_form(f), _flag_help(f)) for f in own]
  if has_config:
    rows.append(
      (
        "--config.FIELD=VALUE",
        (
          "Override one field of the config (after --config), e.g. "
          "--config.train.num_epochs=5; the config is locked, so a mistyped field is an error."
        ),
      )
    )
  rows += [
    ("-v, --verbosity=N", "1: keep the traceback of an error (or set METADCSEG_DEBUG=1)."),
    ("--helpfull", "Every flag, JAX's and absl's included."),
  ]
  parts = [doc or prog, "Flags:\n" + "\n".join(_rows(rows))]
  if has_config:
    configs = shipped_configs()
    if configs:
      folder = _shown(configs[0][0].parent)
      parts.append(
        f"Configs that ship, in {folder}/ (the commands above are run from the repository "
        "root):\n" + "\n".join(_rows([(p.name, first) for p, first in configs]))
      )
  return "\n\n".join(parts) + "\n"


def _help_requested(argv: list[str]) -> str | None:
  for a in argv[1:]:
    if a == "--":
      break
    if a in HELP_ARGS:
      return "short"
    if a in HELPFULL_ARGS:
      return "full"
  return None


# -- config files -----------------------------------------------------------------------------


def _check_config_file(path: str) -> None:
  """The mistakes a config path can hold, found before ml_collections runs the file."""
  if not path:
    raise ConfigFileError("--config is empty: pass a config file, e.g. --config=CONFIG.py")
  p = pathlib.Path(path).expanduser()
  prog = _prog()
  if not p.exists():
    folder = configs_dir()
    shipped = folder / p.name if folder else None
    message = f"config file {path} not found"
    if not p.is_absolute():
      message += (
        f" in {pathlib.Path.cwd()} (a relative path is read from the folder the command runs "
        f"in; the commands in the README run from the repository root)"
      )
    if shipped is not None and shipped.is_file():
      message += f"; the shipped {p.name} is {shipped}"
    else:
      message += f"; {prog} --help lists the configs that ship"
    raise ConfigFileError(message)
  if p.is_dir():
    raise ConfigFileError(f"config {path} is a folder: pass a config file (.py) in it")
  try:
    source = p.read_bytes()
  except OSError as e:
    raise ConfigFileError(f"cannot read config file {path}: {e.strerror}") from None
  try:
    compile(source, str(p), "exec")
  except SyntaxError as e:
    raise ConfigFileError(f"syntax error in config file {path}, line {e.lineno}: {e.msg}") from None
  except ValueError as e:  # null bytes: not a Python file
    raise ConfigFileError(f"config file {path} is not a Python file: {e}") from None


def _config_failure(argument: str, error: BaseException) -> str:
  """One line for an exception raised while loading the config file or calling get_config."""
  path, _, arg = argument.partition(":")
  # ml_collections re-raises a TypeError or ValueError with the traceback in its message.
  if str(error).startswith("Error whilst parsing config file") and error.__context__:
    error = error.__context__
  if isinstance(error, SyntaxError):
    return (
      f"syntax error in {error.filename}, line {error.lineno} (loaded by config file {path}): "
      f"{error.msg}"
    )
  summary = f"{type(error).__name__}: {error}".splitlines()[0]
  target = os.path.realpath(path)
  frames = traceback.extract_tb(error.__traceback__)
  in_file = [f for f in frames if os.path.realpath(f.filename) == target]
  if not in_file and isinstance(error, TypeError) and "get_config()" in str(error):
    # The call itself failed: the argument after ':' does not fit get_config's parameters.
    if argument.count(":"):
      return (
        f"config file {path} does not take the argument '{arg}' ({error}); pass --config={path}"
      )
    return f"config file {path} needs an argument, --config={path}:ARG ({error})"
  if isinstance(error, AttributeError) and "get_config" in str(error):
    return f"config file {path} defines no get_config()"
  where = f", line {in_file[-1].lineno}" if in_file else ""
  with_arg = f" with the argument '{arg}'" if argument.count(":") else ""
  return f"config file {path}{where} failed{with_arg}: {summary} (-v 1 shows the traceback)"


class _CheckedConfigParser(flags.ArgumentParser):
  """ml_collections' config file parser, with each mistake as a `ConfigFileError`."""

  def __init__(self, inner: flags.ArgumentParser):
    self._inner = inner

  def parse(self, argument):
    if _debug_requested(sys.argv):
      return self._inner.parse(argument)
    _check_config_file(argument.partition(":")[0])
    try:
      config = self._inner.parse(argument)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigFileError(_config_failure(argument, e)) from e
    # ml_collections defers an IOError raised inside the file to the first use of the config.
    if type(config).__name__ == "_ErrorConfig":
      raise ConfigFileError(_config_failure(argument, object.__getattribute__(config, "_error")))
    return config

  def flag_type(self):
    return self._inner.flag_type()


def _check_config_flags() -> None:
  for name, flag in FLAGS._flags().items():  # pylint: disable=protected-access
    if name == flag.name and isinstance(flag.parser, ml_config_flags.ConfigFileFlagParser):
      flag.parser = _CheckedConfigParser(flag.parser)


# -- start-up ---------------------------------------------------------------------------------


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with each command-line mistake as one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except ConfigFileError as e:
    _fail(str(e))
  except flags.Error as e:
    message = str(e).splitlines()[0]
    m = re.search(r"Flag --(\S+) must have a value other than None", message)
    if m:
      message = f"--{m.group(1)} is required"
    _fail(f"{message} ({_prog()} --help lists the flags)")
  except (KeyError, AttributeError) as e:
    # ml_collections' locked config: KeyError("'lrr'\nDid you mean "lr" instead of "lrr"?").
    if _debug_requested(argv):
      raise
    hint = re.search(r"Did you mean (.*?)\?", str(e))
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    _fail(
      f"unknown config setting in {' '.join(bad) or 'the command line'}"
      + (f" (did you mean {hint.group(1)}?)" if hint else "")
    )
  return []


def _only_our_info(record) -> bool:
  # orbax and tfds log several INFO lines per checkpoint or build; keep their warnings only.
  return (
    record.levelno >= std_logging.WARNING
    or "metadcseg_jax" in record.pathname
    or ("experiments" in record.pathname)
  )


# XLA's CPU setting for small CPUs: on 2 cores a training step is 1-2% faster than with XLA's
# defaults (jaxlib 0.10.2; 17% with an earlier one), BUILD_NOTES.md, "XLA threads and processes
# on a 2-core CPU". Not measured on larger CPUs, where the thread pool may win.
CPU_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
SMALL_CPU = 2


def visible_cpus() -> int:
  """The CPU cores this process may run on (its affinity where the system has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS keeps no affinity
    return os.cpu_count() or 1


def apply_cpu_defaults(environ=os.environ, cpus: int | None = None) -> bool:
  """Sets `CPU_XLA_FLAGS` as XLA_FLAGS on a CPU of at most `SMALL_CPU` cores, unless the user
  set XLA_FLAGS (even empty). Must run before JAX creates its backend (the entry points' imports
  do not). Returns whether it set them."""
  cpus = visible_cpus() if cpus is None else cpus
  if "XLA_FLAGS" in environ or cpus > SMALL_CPU:
    return False
  environ["XLA_FLAGS"] = CPU_XLA_FLAGS
  return True


def echo(line: str) -> None:
  """A line for the user on stderr, at once: progress, and failures that do not stop the work."""
  print(line, file=sys.stderr, flush=True)


def exit_status(failures: int, message: str) -> int:
  """The status a command returns after work that goes on past failures (each listed as it
  came): 0, or 1 with `message` (how many failed) as its last line on stderr."""
  if failures:
    echo(message)
    return 1
  return 0


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with the command's help, one-line user errors, the project's INFO lines
  only, and the small-CPU XLA setting (`apply_cpu_defaults`)."""
  apply_cpu_defaults()
  wanted = _help_requested(sys.argv)
  if wanted == "short":
    sys.stdout.write(help_text(main.__module__))
    sys.exit(0)
  if wanted == "full":
    app.usage(shorthelp=False, writeto_stdout=True)
    sys.exit(0)
  _check_config_flags()

  def wrapped(argv):
    if len(argv) > 1:
      _fail(
        f"unexpected arguments {' '.join(argv[1:])}: flags are written --name=value "
        f"({_prog()} --help lists them)"
      )
    logging.set_verbosity(max(logging.INFO, FLAGS["verbosity"].value))
    logging.get_absl_handler().addFilter(_only_our_info)
    try:
      return main(argv)
    except RunStopped as e:
      if _debug():
        traceback.print_exc()
      print(f"stopped: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_RESUMABLE)
    except UserError as e:
      if _debug():
        raise
      _fail(str(e))

  app.run(wrapped, flags_parser=_parse_flags)
