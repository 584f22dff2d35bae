"""The package's shape: rooms that import one way, no import cycle, no import hidden in a
function, short functions, equations findable, docstring examples that run."""

import ast
import doctest
import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metadcseg_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The package modules a module imports (at any depth of its syntax tree)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        full = f"{node.module}.{a.name}"
        out.add(full if full in modules else node.module)
  return {m for m in out if m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The cycles a depth-first walk of `graph` ({node: the nodes it imports}) meets."""
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for other in sorted(graph.get(node, ())):
      if state.get(other) == "open":
        cycles.append(stack[stack.index(other) :] + [other])
      elif other not in state:
        visit(other, stack + [other])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return cycles


def test_the_package_has_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  # A package's __init__ is imported before any of its submodules: an edge to it counts.
  assert _cycles(graph) == []


# The modules the package keeps at its top, beside its rooms (sub-packages): what every room
# shares (errors, files, types, settings, the configs and their checks, the command line, devices,
# metrics, progress lines).
MAX_TOP_MODULES = 12


def test_the_top_of_the_package_holds_at_most_a_dozen_modules():
  top = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert len(top) <= MAX_TOP_MODULES, top


def _room(module: str) -> str:
  """A module's room: its first sub-package (`metadcseg_jax.core.meta` -> `core`); a module at the
  top of the package is a room of its own (`metadcseg_jax.configs` -> `configs`)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def test_rooms_import_one_way():
  """Between rooms the imports form no cycle: if a module of room A imports one of room B, no
  module of B imports (directly or through other rooms) one of A. The package's __init__ (it
  exports `load_model`) is left out: nothing inside the package imports it."""
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    if name == "metadcseg_jax":
      continue
    room = _room(name)
    graph.setdefault(room, set()).update(
      _room(m) for m in _imports(path, modules) if m != "metadcseg_jax" and _room(m) != room
    )
  assert _cycles(graph) == []
  # The ways the rooms are meant to go, checked by name.
  assert "audit" not in graph["methods"] and "training" not in graph["inference"]
  assert not graph["core"] - {"settings", "types", "errors"}, graph["core"]


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
  """The lines of a function's body without its docstring."""
  body = node.body
  if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
    if isinstance(body[0].value.value, str):
      body = body[1:]
  return node.end_lineno - body[0].lineno + 1 if body else 0


MAX_FUNCTION_LINES = 80


def test_no_function_body_is_longer_than_80_lines():
  long = [
    f"{name}.{node.name} ({_body_lines(node)} lines)"
    for name, path in _modules().items()
    for node in ast.walk(ast.parse(path.read_text()))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    and _body_lines(node) > MAX_FUNCTION_LINES
  ]
  assert long == []


def test_no_import_inside_a_function():
  offenders = []
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if isinstance(inner, (ast.Import, ast.ImportFrom)):
            offenders.append(f"{name}.{node.name} (line {inner.lineno})")
  assert offenders == []


def _equation_table() -> list[tuple[int, str]]:
  text = (ROOT / "docs" / "library.md").read_text()
  rows = re.findall(r"^\| Eq\. (\d+) \| `([\w.]+)` \|", text, re.M)
  assert len(rows) >= 20, "docs/library.md's equation table is missing"
  return [(int(n), f) for n, f in rows]


def test_every_equation_in_the_readme_table_is_in_its_functions_docstring():
  for number, dotted in _equation_table():
    module_name, _, attr = dotted.rpartition(".")
    try:
      obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
      module_name, _, cls = module_name.rpartition(".")
      obj = getattr(getattr(importlib.import_module(module_name), cls), attr)
    doc = inspect.getdoc(obj) or ""
    assert re.search(rf"\bEq\. {number}\b", doc), f"Eq. {number} not in {dotted}'s docstring"


def test_equations_are_tagged_one_number_per_mention():
  ranged = re.compile(r"Eqs?\. ?\d+\s*(?:[-–]|,\s*\d)")
  bad = [
    f"{p.relative_to(ROOT)}:{i}"
    for p in PACKAGE.rglob("*.py")
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if ranged.search(line)
  ]
  assert bad == []


def _project_texts() -> list[pathlib.Path]:
  """The Python files of the package, experiments/ and tests/ (this one excepted: it holds the
  words it looks for), the README, the design record and docs/*.md."""
  files = [
    p for folder in ("metadcseg_jax", "experiments", "tests") for p in (ROOT / folder).rglob("*.py")
  ]
  files += [ROOT / "README.md", ROOT / "BUILD_NOTES.md", *sorted((ROOT / "docs").glob("*.md"))]
  return [p for p in files if p.resolve() != pathlib.Path(__file__).resolve()]


def test_project_files_speak_of_the_project_and_the_papers():
  """Project files speak of the project and the papers: no notes or specifications kept outside
  the repository, no issue numbers, no working sessions."""
  pattern = re.compile(
    r"\bSPEC\b|papers/|\.\./shared|STACK_NOTES|\b[Ii]ssues? #?\d|\b[Tt]he issue\b|\b[Ii]ssue's"
    r"|\b(?:this|these|that|earlier|later|other) sessions?\b|\blent\b"
  )
  bad = [
    f"{p.relative_to(ROOT)}:{i}"
    for p in _project_texts()
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if pattern.search(line)
  ]
  assert bad == []


def test_the_tree_is_formatted_with_the_configured_formatter():
  """`ruff format .` with pyproject's settings (2-space indents, 100 columns) changes nothing,
  and no line is longer than 100 columns."""
  fmt = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert fmt.returncode == 0, fmt.stdout + fmt.stderr
  width = subprocess.run(
    [sys.executable, "-m", "ruff", "check", "--select", "E501", "--output-format", "concise", "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert width.returncode == 0, width.stdout


# ----------------------------------------------------------------------------- docstring examples

# Every module with a `>>>` example, run by `test_docstring_examples_run` (optax's way).
DOCTEST_MODULES = (
  "metadcseg_jax.benchmark.report",
  "metadcseg_jax.benchmark.stats",
  "metadcseg_jax.commands.speed",
  "metadcseg_jax.configs",
  "metadcseg_jax.core.dcd",
  "metadcseg_jax.core.losses",
  "metadcseg_jax.core.meta",
  "metadcseg_jax.core.objective",
  "metadcseg_jax.core.optim",
  "metadcseg_jax.core.wasserstein",
  "metadcseg_jax.metrics",
  "metadcseg_jax.progress",
  "metadcseg_jax.tools.throughput",
)
# The method's core functions each carry a short example on tiny arrays.
EXAMPLES_REQUIRED = (
  "metadcseg_jax.core.meta.meta_weights",
  "metadcseg_jax.core.meta.suspicion_map",
  "metadcseg_jax.core.dcd.regions",
  "metadcseg_jax.core.dcd.region_centers",
  "metadcseg_jax.core.dcd.dcd_map",
  "metadcseg_jax.core.dcd.boundary_weights",
  "metadcseg_jax.core.objective.l2b_loss",
  "metadcseg_jax.core.objective.metadcseg_loss",
  "metadcseg_jax.benchmark.stats.paired_difference",
)


def test_every_module_with_an_example_is_run():
  with_examples = sorted(name for name, p in _modules().items() if ">>>" in p.read_text())
  assert with_examples == sorted(DOCTEST_MODULES)
  for dotted in EXAMPLES_REQUIRED:
    module_name, _, attr = dotted.rpartition(".")
    doc = inspect.getdoc(getattr(importlib.import_module(module_name), attr)) or ""
    assert ">>>" in doc, f"{dotted} has no example"


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples_run(module_name):
  module = importlib.import_module(module_name)
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(module, optionflags=flags, verbose=False)
  assert result.attempted > 0 and result.failed == 0, result


# ----------------------------------------------------------------------------- signatures


def _functions(module_filter=lambda name: True):
  """(module, qualified name, node, public) of every function of the package's modules."""
  for name, path in sorted(_modules().items()):
    if not module_filter(name):
      continue

    def walk(node, prefix, public):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
          yield from walk(
            child, f"{prefix}{child.name}.", public and not child.name.startswith("_")
          )
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
          yield name, prefix + child.name, child, public and not child.name.startswith("_")

    yield from walk(ast.parse(path.read_text()), "", True)


def _parameters(node) -> tuple[list[str], list[str]]:
  """(positional, keyword-only) parameter names, self and cls left out."""
  a = node.args
  positional = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")]
  return positional, [x.arg for x in a.kwonlyargs]


# Called positionally by what it stands in for: the unpickler of PyTorch's files.
POSITIONAL_BY_PROTOCOL = ("metadcseg_jax.core.edges.pidinet._rebuild_tensor_v2",)


def test_core_functions_take_at_most_three_positional_parameters():
  """The method's mathematics (core/): past the third, every parameter is keyword-only."""
  wide = [
    f"{module}.{name} ({len(_parameters(node)[0])} positional)"
    for module, name, node, _ in _functions(lambda m: m.startswith("metadcseg_jax.core"))
    if len(_parameters(node)[0]) > 3 and f"{module}.{name}" not in POSITIONAL_BY_PROTOCOL
  ]
  assert wide == []


def test_optimizer_comes_before_its_state_everywhere():
  swapped = []
  for module, name, node, _ in _functions():
    positional, keyword = _parameters(node)
    names = positional + keyword
    if "optimizer" in names and "opt_state" in names:
      if names.index("opt_state") < names.index("optimizer"):
        swapped.append(f"{module}.{name}")
  assert swapped == []


def test_public_functions_of_four_or_more_parameters_document_them():
  undocumented = [
    f"{module}.{name}"
    for module, name, node, public in _functions()
    if public
    and len(sum(_parameters(node), [])) >= 4
    and "Args:" not in (ast.get_docstring(node) or "")
  ]
  assert undocumented == []
