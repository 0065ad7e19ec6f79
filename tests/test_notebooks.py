"""Every notebook runs top to bottom (nbclient, a real kernel) with a few training steps, and the
committed notebooks carry no outputs."""

import copy
import importlib.util
import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ("quickstart", "recurrence", "scaling", "convert")
NB_STEPS = 5
# Tiny models: compile fast (less LLVM optimisation) on one CPU device.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# What each notebook must print (besides running without an error and drawing its plots).
EXPECTED_TEXT = {
  "quickstart": [
    f"reloaded step {NB_STEPS}",
    "fraction of zero weights per layer",
    "max |logit difference|",
  ],
  "recurrence": [
    "sequential_custom_vjp",
    "decode steps vs one parallel forward",
    "recurrent state",
  ],
  "scaling": ["transformer", "mmfree", "gap"],
  "convert": ["converted student, step 0", "ConversionError", "val loss: teacher"],
}
MIN_PLOTS = {"quickstart": 2, "recurrence": 2, "scaling": 1, "convert": 1}


def _strip_module():
  spec = importlib.util.spec_from_file_location("strip_outputs", NOTEBOOK_DIR / "strip_outputs.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _outputs(nb):
  """All text the notebook printed, and the number of PNG images it displayed."""
  text, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        text.append(out.get("text", ""))
      data = out.get("data", {})
      text.append(data.get("text/plain", ""))
      images += "image/png" in data
  return "".join(text), images


def run_notebook(name: str, tmp_path, monkeypatch):
  """Executes notebooks/NAME.ipynb in a fresh kernel whose cwd is notebooks/."""
  monkeypatch.setenv("MMFREE_NB_STEPS", str(NB_STEPS))
  monkeypatch.setenv("MMFREE_NB_WORKDIR", str(tmp_path / "workdir"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", FAST_XLA_FLAGS)  # kernel: 1 device, not the tests' 8
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.setenv(
    "PYTHONPATH",
    os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ),
  )
  nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  client = NotebookClient(
    nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
  )
  client.execute()
  return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  nb = run_notebook(name, tmp_path, monkeypatch)
  text, images = _outputs(nb)
  for expected in EXPECTED_TEXT[name]:
    assert expected in text, f"{name}.ipynb did not print {expected!r}:\n{text[-3000:]}"
  assert images >= MIN_PLOTS[name], f"{name}.ipynb drew {images} plot(s)"
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  if name in ("quickstart", "recurrence"):  # trained and checkpointed into the temp workdir
    assert (tmp_path / "workdir" / "config.json").exists()
    metrics = [
      json.loads(line) for line in (tmp_path / "workdir" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics and max(row["step"] for row in metrics) == NB_STEPS


def test_committed_notebooks_have_no_outputs():
  strip_outputs = _strip_module()
  paths = strip_outputs.notebook_paths()
  assert sorted(pathlib.Path(p).stem for p in paths) == sorted(NOTEBOOKS)
  for path in paths:
    with open(path) as f:
      nb = json.load(f)
    assert strip_outputs.problems(nb) == [], (
      f"{path} has outputs; run python notebooks/strip_outputs.py"
    )
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))


def test_strip_outputs_removes_outputs(tmp_path):
  strip_outputs = _strip_module()
  with open(NOTEBOOK_DIR / "scaling.ipynb") as f:
    clean = json.load(f)
  dirty = copy.deepcopy(clean)
  code_cell = next(c for c in dirty["cells"] if c["cell_type"] == "code")
  code_cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
  code_cell["execution_count"] = 3
  code_cell["metadata"]["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00"}
  dirty["metadata"]["widgets"] = {"state": {}}
  assert len(strip_outputs.problems(dirty)) == 4

  path = tmp_path / "dirty.ipynb"
  path.write_text(json.dumps(dirty))
  assert strip_outputs.main(["--check", str(path)]) == 1
  assert json.loads(path.read_text()) == dirty  # --check changes nothing
  assert strip_outputs.main([str(path)]) == 0
  stripped = json.loads(path.read_text())
  assert strip_outputs.problems(stripped) == []
  assert strip_outputs.main(["--check", str(path)]) == 0
  assert [c["source"] for c in stripped["cells"]] == [c["source"] for c in clean["cells"]]
