"""The package's shape: rooms that import one way, no import cycle, no import hidden in a
function, short functions, equations findable, docstring examples that run."""

import ast
import importlib
import inspect
import pathlib
import re
import subprocess
import sys

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


def test_the_package_has_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  # A package's __init__ is imported before any of its submodules: an edge to it counts.
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(graph[m]):
      if state.get(n) == "open":
        cycles.append(stack[stack.index(n) :] + [n])
      elif n not in state:
        visit(n, stack + [n])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert cycles == []


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
  state, cycles = {}, []

  def visit(room, stack):
    state[room] = "open"
    for other in sorted(graph.get(room, ())):
      if state.get(other) == "open":
        cycles.append(stack[stack.index(other) :] + [other])
      elif other not in state:
        visit(other, stack + [other])
    state[room] = "done"

  for room in sorted(graph):
    if room not in state:
      visit(room, [room])
  assert cycles == []
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
