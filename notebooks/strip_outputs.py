"""Strip outputs from notebooks so that git holds only their source (no pre-commit needed).

  python notebooks/strip_outputs.py              # strip every notebooks/*.ipynb in place
  python notebooks/strip_outputs.py a.ipynb      # strip these
  python notebooks/strip_outputs.py --check      # exit 1 listing notebooks that have outputs

Clears cell outputs and execution counts and drops run-specific metadata (execution
timings, widget state). Plots worth keeping are committed as files (experiments/results/).
The test suite runs `--check`'s logic on the committed notebooks.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

NOTEBOOK_DIR = os.path.dirname(os.path.abspath(__file__))
_CELL_METADATA_DROP = ("execution", "collapsed", "scrolled", "ExecuteTime")
_NOTEBOOK_METADATA_DROP = ("widgets", "papermill")


def notebook_paths() -> list[str]:
  return sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def strip(nb: dict) -> dict:
  """Returns `nb` (the JSON dict of a notebook) without outputs; modifies it in place."""
  for cell in nb.get("cells", []):
    if cell.get("cell_type") == "code":
      cell["outputs"] = []
      cell["execution_count"] = None
    for key in _CELL_METADATA_DROP:
      cell.get("metadata", {}).pop(key, None)
  for key in _NOTEBOOK_METADATA_DROP:
    nb.get("metadata", {}).pop(key, None)
  return nb


def problems(nb: dict) -> list[str]:
  """What `strip` would remove: one line per cell with outputs or an execution count."""
  found = []
  for index, cell in enumerate(nb.get("cells", [])):
    if cell.get("cell_type") != "code":
      continue
    if cell.get("outputs"):
      found.append(f"cell {index}: {len(cell['outputs'])} output(s)")
    if cell.get("execution_count") is not None:
      found.append(f"cell {index}: execution_count {cell['execution_count']}")
    if any(key in cell.get("metadata", {}) for key in _CELL_METADATA_DROP):
      found.append(f"cell {index}: run metadata")
  if any(key in nb.get("metadata", {}) for key in _NOTEBOOK_METADATA_DROP):
    found.append("notebook: run metadata")
  return found


def _read(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write(path: str, nb: dict) -> None:
  # nbformat's own layout (indent 1, sorted keys, trailing newline): minimal diffs.
  with open(path, "w", encoding="utf-8") as f:
    json.dump(nb, f, indent=1, sort_keys=True, ensure_ascii=False)
    f.write("\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
  parser.add_argument(
    "--check", action="store_true", help="change nothing; exit 1 if any notebook has outputs"
  )
  args = parser.parse_args(argv)
  paths = args.paths or notebook_paths()
  dirty = 0
  for path in paths:
    nb = _read(path)
    found = problems(nb)
    if args.check:
      if found:
        dirty += 1
        print(f"{path}: " + "; ".join(found))
    elif found:
      _write(path, strip(nb))
      print(f"stripped {path}")
  if args.check and dirty:
    print(f"{dirty} notebook(s) have outputs: run python notebooks/strip_outputs.py")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
