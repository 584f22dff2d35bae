"""A fresh machine can install and run the project: every import declared, CI = the README."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Imports every module of the package and of experiments/ (entry points define absl flags at
# import, so each one's flags are dropped before the next is imported), then builds a tiny
# synthetic dataset: TFDS imports some modules only while building (importlib_resources).
# Modules that need an extra are left out (OPTIONAL_MODULES) and checked against that extra.
_IMPORT_ALL = textwrap.dedent("""
    import importlib, json, pkgutil, sys, tempfile
    from absl import flags
    optional = set(json.loads(sys.argv[1]))
    failures = {}
    for package in ("metadcseg_jax", "experiments"):
      pkg = importlib.import_module(package)
      names = [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
      for name in names:
        if name in optional:
          continue
        try:
          importlib.import_module(name)
        except Exception as e:
          failures[name] = f"{type(e).__name__}: {e}"
        for flag in flags.FLAGS.get_flags_for_module(name):
          delattr(flags.FLAGS, flag.name)
    from metadcseg_jax.data import synthetic
    with tempfile.TemporaryDirectory() as d:
      sources = synthetic.load_synthetic(data_dir=d, size=16, channels=1, n_train=2, n_val=1,
                                        n_test=1, seed=0)
      assert sources["train"][1]["image"].shape == (16, 16, 1)
    print(json.dumps({"failures": failures, "modules": sorted(sys.modules)}))
""")


# Modules whose imports belong to an optional extra: {module: (extra, top-level import)}.
OPTIONAL_MODULES = {
  "metadcseg_jax.tools.torch_ref": ("bench", "torch"),
  "metadcseg_jax.audit.cleanlab_ref": ("audit", "cleanlab"),
}


def test_every_module_imports_and_every_import_is_declared(deps):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", _IMPORT_ALL, json.dumps(list(OPTIONAL_MODULES))],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["failures"] == {}
  assert (
    "metadcseg_jax.training.train" in report["modules"] and "experiments.main" in report["modules"]
  )
  bad = deps.undeclared(report["modules"])
  assert bad == {}, (
    f"imported at run time but not declared in pyproject.toml (module: the "
    f"distributions that provide it): {bad}"
  )


def test_optional_modules_import_only_what_their_extra_declares():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  for module, (extra, top) in OPTIONAL_MODULES.items():
    names = {
      canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"][extra]
    }
    assert canonicalize_name(top) in names, (module, extra)
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert re.search(rf"^import {top}$", source, re.M), module


def test_the_check_catches_an_undeclared_module(deps):
  # pytest and medpy are installed here, but only through the `test` extra.
  assert set(deps.undeclared(["pytest", "medpy.metric", "numpy", "json"])) == {"pytest", "medpy"}
  assert deps.undeclared(["pytest", "medpy"], extras=("test",)) == {}
  # The package that broke fresh installs: provided by importlib_resources, declared by us.
  assert "importlib-resources" in deps.declared_closure()


def _readme_block(title: str) -> str:
  """The first ```bash block after the line starting with `title` in README.md."""
  text = (ROOT / "README.md").read_text()
  start = text.index(title)
  block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
  assert block, f"no bash block after {title!r} in README.md"
  return block.group(1).strip()


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
  ci = (ROOT / ".ci" / "run").read_text()
  command = _readme_block("Run the tests")
  assert command in ci.splitlines()
  assert "python3 -m venv" in ci and "mktemp -d" in ci  # a new environment every time
  assert "--system-site-packages" not in ci


def test_constraints_pin_every_declared_dependency_inside_its_range():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  pins = {}
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[canonicalize_name(name)] = version
  reqs = [Requirement(r) for r in project["dependencies"]]
  # The extras the test command installs; cuda12 and bench depend on the platform.
  reqs += [
    Requirement(r) for group in ("test", "data") for r in project["optional-dependencies"][group]
  ]
  for req in reqs:
    name = canonicalize_name(req.name)
    if name == "metadcseg-jax" or req.marker is not None:
      continue
    assert name in pins, f"constraints.txt does not pin {req.name}"
    assert req.specifier.contains(pins[name], prereleases=True), (
      f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
    )
  # The fast-moving libraries have an upper bound.
  for name in (
    "jax",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "array-record",
  ):
    spec = next(r.specifier for r in reqs if canonicalize_name(r.name) == name)
    assert any(s.operator in ("<", "<=", "~=", "==") for s in spec), name


@pytest.mark.parametrize(
  "script",
  [
    "metadcseg-train",
    "metadcseg-corrupt",
    "metadcseg-bench",
    "metadcseg-benchmark",
    "metadcseg-throughput",
    "metadcseg-audit",
  ],
)
def test_console_scripts_are_declared(script):
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  module, func = scripts[script].split(":")
  assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
  assert f"def {func}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text()
