"""Shared pytest set-up, and the `deps` fixture of the dependency checks."""

import importlib.metadata as md
import os
import pathlib
import re
import shutil
import sys
import tempfile
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's own default in the test process and in the console scripts it starts (an XLA_FLAGS that
# is set, even empty, is left alone by the scripts' small-CPU setting), so that a run in a
# subprocess and one in the test process compute alike, as the suite always has.
os.environ.setdefault("XLA_FLAGS", "")
# One persistent compilation cache for the session: the test process and every program it starts
# (console scripts, the notebook, the preemption runs) compile the same tiny configuration, and
# compiling, not running, is what the suite spends its time on. Removed at the end.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="metadcseg-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest
from absl import flags
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
  # absl flags raise UnparsedFlagAccessError when read under pytest otherwise.
  flags.FLAGS.mark_as_parsed()


def pytest_unconfigure(config):
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data():
  """Path to shared/data beside the checkout (real samples); skips the test when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} not present")
  return SHARED_DATA


@pytest.fixture(scope="session")
def run_data_dir(tmp_path_factory):
  """One data folder for the tests that run whole programs (console scripts, the notebook):
  JAX's persistent compilation cache under it lets the later ones skip compiling."""
  return tmp_path_factory.mktemp("run_data")


# ----------------------------------------------------------------------------- dependencies
# Which installed distributions a module name comes from, and which ones pyproject declares.
#
# Shared by the dependency tests: a module counts as declared when the distribution that provides
# it is `metadcseg-jax` itself or lies in the transitive closure of its requirements (markers
# evaluated for this interpreter and the extras given). A package that merely happens to be
# installed (the way `importlib_resources` hid a broken install from CI once) is not.

PROJECT = "metadcseg-jax"
OWN_MODULES = {"metadcseg_jax", "experiments"}


def declared_closure(extras: tuple[str, ...] = ()) -> set[str]:
  """Canonical names of the project and every distribution its requirements pull in."""
  seen: set[str] = set()
  todo = [(PROJECT, set(extras))]
  while todo:
    name, wanted = todo.pop()
    key = (canonicalize_name(name), frozenset(wanted))
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = md.distribution(name)
    except md.PackageNotFoundError:
      continue  # an unmet optional requirement: nothing it could provide is installed
    for text in dist.requires or ():
      req = Requirement(text)
      envs = [dict(default_environment(), extra=e) for e in (wanted or {""})]
      if req.marker is None or any(req.marker.evaluate(env) for env in envs):
        todo.append((req.name, set(req.extras)))
  return {name for name, _ in seen}


def providers() -> dict[str, list[str]]:
  """Top-level module name -> canonical names of the distributions that install it."""
  out: dict[str, list[str]] = {}
  for module, dists in md.packages_distributions().items():
    out[module] = [canonicalize_name(d) for d in dists]
  return out


def undeclared(module_names, extras: tuple[str, ...] = ()) -> dict[str, list[str]]:
  """The third-party top-level modules among `module_names` that no declared dist provides.

  Returns:
    {module: [distributions that provide it here]} for every offender (empty when all is well).
  """
  closure = declared_closure(extras)
  by_module = providers()
  stdlib = set(sys.stdlib_module_names)
  bad = {}
  for name in sorted({m.split(".")[0] for m in module_names}):
    if name in stdlib or name in OWN_MODULES or name.startswith("_") or name not in by_module:
      # `_`-modules are interpreter or .pth start-up hooks (setuptools' _distutils_hack, the
      # editable-install finder); a name no distribution claims is a built-in or local one.
      continue
    if not set(by_module[name]) & closure:
      bad[name] = by_module[name]
  return bad


_IMPORTTIME = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def modules_from_importtime(stderr: str) -> set[str]:
  """Module names listed by `python -X importtime` (PYTHONPROFILEIMPORTTIME=1) on stderr."""
  return {m.group(1) for line in stderr.splitlines() if (m := _IMPORTTIME.match(line))}


@pytest.fixture(scope="session")
def deps():
  """The dependency checks above, for test_dependencies.py and test_cli.py."""
  return types.SimpleNamespace(
    declared_closure=declared_closure,
    undeclared=undeclared,
    modules_from_importtime=modules_from_importtime,
  )
