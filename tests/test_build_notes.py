"""Every pointer into the design record names one of its sections.

The package, experiments, tests, the README and docs/ point into the design record as
`BUILD_NOTES.md, "Section name"` (the name may run over a line break of a comment or a
docstring); inside the record a cross-reference reads `section "Section name"` (or
`sections "A" and "B"`). A name resolves when a heading of the record begins with it. The file
named as a whole is written in backticks (prose) or double quotes (a path in code).
"""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTES = ROOT / "BUILD_NOTES.md"
FOLDERS = ("metadcseg_jax", "experiments", "tests", "docs")
SUFFIXES = (".py", ".md", ".ipynb", ".txt")

MENTION = re.compile(r"BUILD_NOTES(?:\.md)?")
POINTER = re.compile(r'BUILD_NOTES\.md, "([^"]+)"')
# The file named as a whole: in backticks (prose) or in double quotes (a path in code).
WHOLE_FILE = ("`BUILD_NOTES.md`", '"BUILD_NOTES.md"')
# A reference inside the record; one in backticks is an example of the form, not a reference.
INTERNAL = re.compile(r'(?<!`)\bsections? ("[^"]+"(?:(?:,| and|, and) "[^"]+")*)')
# A line break inside a comment, a docstring or a Markdown paragraph reads as one space.
BREAK = re.compile(r"[ \t]*\n[ \t]*(?:#[ \t]*)?")


def headings(text: str, levels: int = 6) -> list[str]:
  """The record's headings down to `levels` (# is 1), outside fenced code blocks."""
  out, fenced = [], False
  for line in text.splitlines():
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced and (m := re.match(rf"#{{1,{levels}}} (.+)", line)):
      out.append(m.group(1).strip())
  return out


def _resolves(name: str, heads: list[str]) -> bool:
  return any(h.startswith(name) for h in heads)


def bad_pointers(text: str, heads: list[str]) -> list[str]:
  """Every mention of the record in `text` that is not a pointer to one of `heads`."""
  bad = []
  for m in MENTION.finditer(text):
    if text[max(0, m.start() - 1) : m.start() + len(WHOLE_FILE[0]) - 1] in WHOLE_FILE:
      continue
    ahead = BREAK.sub(" ", text[m.start() : m.start() + 400])
    pointer = POINTER.match(ahead)
    if pointer is None:
      bad.append(f"not of the form BUILD_NOTES.md, \"Section\": {ahead[:70]!r}")
    elif not _resolves(pointer.group(1), heads):
      bad.append(f"no heading begins with {pointer.group(1)!r}")
  return bad


def bad_internal_references(text: str, heads: list[str]) -> list[str]:
  flat = BREAK.sub(" ", text)
  names = [n for m in INTERNAL.finditer(flat) for n in re.findall(r'"([^"]+)"', m.group(1))]
  return [f"no heading begins with {n!r}" for n in names if not _resolves(n, heads)]


def _text(path: pathlib.Path) -> str:
  if path.suffix == ".ipynb":
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells)
  return path.read_text()


def _pointing_files() -> list[pathlib.Path]:
  files = [ROOT / "README.md"]
  for folder in FOLDERS:
    files += [p for p in sorted((ROOT / folder).rglob("*")) if p.suffix in SUFFIXES]
  return [p for p in files if p.is_file() and p.resolve() != pathlib.Path(__file__).resolve()]


def test_every_pointer_into_build_notes_names_a_heading():
  heads = headings(NOTES.read_text())
  bad = [
    f"{p.relative_to(ROOT)}: {b}" for p in _pointing_files() for b in bad_pointers(_text(p), heads)
  ]
  assert bad == []


def test_every_cross_reference_inside_build_notes_names_a_heading():
  text = NOTES.read_text()
  assert bad_internal_references(text, headings(text)) == []


def test_the_check_finds_a_made_up_pointer():
  heads = ["Design", "Label audit (audit.py)", "The quick start"]
  assert bad_pointers('see BUILD_NOTES.md, "Label audit")', heads) == []
  assert bad_pointers('# (BUILD_NOTES.md,\n# "The quick\n# start").', heads) == []
  assert bad_pointers("`BUILD_NOTES.md` holds the design record.", heads) == []
  assert bad_pointers('NOTES = ROOT / "BUILD_NOTES.md"', heads) == []
  assert len(bad_pointers('see BUILD_NOTES.md, "synthetic demo"', heads)) == 1
  assert len(bad_pointers('see BUILD_NOTES "Label audit"', heads)) == 1
  assert len(bad_pointers("(see BUILD_NOTES.md).", heads)) == 1
  assert (
    bad_internal_references('as in section "Design" and sections "The quick start"', heads) == []
  )
  assert len(bad_internal_references('(sections "Design" and "No such")', heads)) == 1


def test_the_contents_list_the_top_two_levels_of_headings():
  text = NOTES.read_text()
  listed = re.findall(r"^ *- \[([^\]]+)\]\(#[^)]+\)$", text.split("\n# ", 1)[0], re.MULTILINE)
  top = [h.replace("`", "") for h in headings(text, levels=2)[1:] if h != "Contents"]
  assert listed == top
