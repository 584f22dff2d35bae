"""The README is a user's guide that runs as written: every command it shows names a console
script that exists, flags that script defines and config fields the config it names has."""

import ast
import importlib.util
import pathlib
import re
import shlex
import tomllib

import pytest

from metadcseg_jax import configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Flags every absl program has (absl's own), beside those a command defines.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "verbosity", "v", "logtostderr", "alsologtostderr"}


def scripts() -> dict[str, str]:
  """Console script -> its module (pyproject's [project.scripts])."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  return {name: target.split(":")[0] for name, target in project["scripts"].items()}


def defined_flags(module: str) -> set[str]:
  """The flags a command module defines (its `flags.DEFINE_*` and config_flags calls, read from
  its source: defining them here would clash with other commands' flags of the same name)."""
  spec = importlib.util.find_spec(module)
  tree = ast.parse(pathlib.Path(spec.origin).read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      if node.func.attr.startswith("DEFINE") and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
          names.add(first.value)
  return names


def commands() -> list[list[str]]:
  """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
    text = re.sub(r"\\\n\s*", " ", block)
    for line in text.splitlines():
      line = line.split(" #")[0].strip()
      for part in re.split(r"\s*(?:&&|;)\s*", line):
        if part:
          out.append(shlex.split(part))
  return out


def _has_field(config, dotted: str) -> bool:
  node = config
  for key in dotted.split("."):
    if not hasattr(node, "keys") or key not in node:
      return False
    node = node[key]
  return True


def test_the_readme_is_a_short_guide():
  lines = README.read_text().splitlines()
  assert len(lines) <= 260, len(lines)
  heads = [l for l in lines if l.startswith("## ")]
  # In the order a user needs them.
  order = ["Install", "Your own data", "Use a trained model", "Choosing a method"]
  found = [next(i for i, h in enumerate(heads) if h.startswith(f"## {o}")) for o in order]
  assert found == sorted(found)


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_names_what_exists(argv):
  known = scripts()
  program = argv[0]
  if not program.startswith("metadcseg-"):
    return  # pip, python, tensorboard, ...
  assert program in known, f"{program} is not a console script"
  flags_defined = defined_flags(known[program]) | ABSL_FLAGS
  config = None
  for arg in argv[1:]:
    if not arg.startswith("--"):
      continue
    name, _, value = arg[2:].partition("=")
    if name.startswith("no") and name[2:] in flags_defined:
      continue
    if name.startswith("config."):
      assert "config" in flags_defined, f"{program} takes no --config"
      assert config is not None, f"--{name} before --config in {argv}"
      assert _has_field(config, name[len("config.") :]), f"--{name}: no such config field"
      continue
    assert name in flags_defined, f"{program} has no flag --{name}"
    if name == "config":
      config = configs.from_file(ROOT / value)
