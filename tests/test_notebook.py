"""The Colab notebook: valid, outputs cleared in git, and executed top to bottom on the tiny
config (nbclient), installing nothing because the package is installed from this checkout."""

import json
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab.ipynb"


def test_notebook_is_valid_with_outputs_cleared():
  nb = json.loads(NOTEBOOK.read_text())
  nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))
  text = "\n".join("".join(c["source"]) for c in nb["cells"])
  assert "<org>" not in text  # installs from its own repository, no placeholder URL
  for needle in (
    "find_repository",
    "jax[cuda12]",
    "train_and_evaluate",
    "corruption_table",
    "run_benchmark",
    "dcd.png",
    'data.name = "folder"',
  ):
    assert needle in text, needle
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i} has outputs"


def test_notebook_runs_top_to_bottom_on_the_tiny_config(tmp_path, run_data_dir, monkeypatch):
  # The kernel inherits this environment: the tiny config, folders under tmp_path.
  monkeypatch.setenv("METADCSEG_NOTEBOOK_CONFIG", "tiny")
  monkeypatch.setenv("METADCSEG_RUNS", str(tmp_path / "runs"))
  monkeypatch.setenv("METADCSEG_DATA_DIR", str(run_data_dir))
  monkeypatch.setenv("KVASIR_DIR", str(tmp_path / "no_kvasir_here"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  )
  client.execute()
  outputs = {}
  for cell in nb.cells:
    if cell.cell_type == "code":
      outputs[cell.id] = "".join(o.get("text", "") for o in cell.outputs)
      assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]
  text = "\n".join(outputs.values())
  assert "metadcseg-jax is installed from" in text and str(ROOT) in text
  assert "final test Dice" in text and "test Dice (EMA) on clean masks: CE" in text
  assert "skipped" in text  # no Kvasir folder here
  assert "| l2b40 |" in text  # the corruption table
  runs = tmp_path / "runs"
  for name in ("results.json", "panel.png", "dcd.png", "curves.png"):
    assert (runs / "tiny_metadcseg_l2b40" / name).is_file(), name
  assert (runs / "bench_tiny" / "benchmark.md").is_file()
  images = sum(
    o.output_type == "display_data" and "image/png" in o.data
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
  )
  assert images >= 4
