"""What every command-line entry point shares: absl start-up with user errors as one line.

    def main(argv): ...
    def run(): cli.run(main)         # the console script's entry

A `UserError` (bad setting, bad data, busy workdir, unrestorable checkpoint, NaN loss) and a
mistyped config key print one line, `error: ...`, and exit with status 2; the traceback is
kept with `--verbosity=1` (or `-v 1`) or METADCSEG_DEBUG=1. Any other exception is a
programming error and keeps its traceback.
"""

import logging as std_logging
import os
import re
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

from metadcseg_jax.errors import UserError

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2


def _debug() -> bool:
  verbosity = FLAGS["verbosity"].value if "verbosity" in FLAGS else 0
  return bool(os.environ.get("METADCSEG_DEBUG")) or (verbosity or 0) >= 1


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a mistyped `--config.x.y` key as one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}\nPass --helpshort or --helpfull to see the flags.")
  except (KeyError, AttributeError) as e:
    # ml_collections' locked config: KeyError("'lrr'\nDid you mean "lr" instead of "lrr"?").
    if os.environ.get("METADCSEG_DEBUG") or any(
      (m := re.match(r"^--?(v|verbosity)=(\d+)$", a)) and int(m.group(2)) >= 1 for a in argv
    ):
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


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with one-line user errors and the project's INFO lines only."""

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(max(logging.INFO, FLAGS["verbosity"].value))
    logging.get_absl_handler().addFilter(_only_our_info)
    try:
      return main(argv)
    except UserError as e:
      if _debug():
        raise
      _fail(str(e))

  app.run(wrapped, flags_parser=_parse_flags)
