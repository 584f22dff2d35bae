"""The Colab notebook: valid, outputs cleared, every code cell compiles."""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab.ipynb"


def test_notebook_is_valid_and_compiles():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert kinds[0] == "markdown" and kinds.count("code") >= 6
  text = "\n".join("".join(c["source"]) for c in nb["cells"])
  for needle in ("pip install", "jax[cuda12]", "jax.devices()", "train_and_evaluate",
                 "synthetic.get_config()", "panel.png", "plot_curves", 'data.name = "kvasir_seg"',
                 "manual_dir", "metadcseg-corrupt", "run_sweep"):
    assert needle in text, needle
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i} has outputs"
    src = "".join(cell["source"])
    py = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%")))
    compile(py, f"colab.ipynb cell {i}", "exec")
