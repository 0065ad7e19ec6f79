"""House rules a reviewer would otherwise check by hand: ruff's lint and format check (the
configuration in pyproject.toml), and the size limits of the package (a module of at most 450
lines, a function of at most 80, outside tests)."""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# Code outside the package held to the function limit too (tests are not).
FUNCTION_LIMIT_ROOTS = ("mmfree_jax", "benchmarks", "experiments", "launch")


def _ruff(*args):
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args, str(REPO)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.subprocess
def test_ruff_lint():
  proc = _ruff("check", "--no-cache")
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.subprocess
def test_ruff_format():
  proc = _ruff("format", "--check", "--no-cache")
  assert proc.returncode == 0, (
    proc.stdout[-4000:] + proc.stderr[-2000:] + "\nrun `.venv/bin/ruff format .`"
  )


def _python_files(root: str):
  return sorted((REPO / root).rglob("*.py")) if (REPO / root).is_dir() else []


def test_module_size():
  long = [
    f"{p.relative_to(REPO)}: {n} lines"
    for p in _python_files("mmfree_jax")
    if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
  ]
  assert not long, f"modules over {MAX_MODULE_LINES} lines (split by job):\n" + "\n".join(long)


def test_function_size():
  long = []
  for root in FUNCTION_LIMIT_ROOTS:
    for path in _python_files(root):
      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          lines = node.end_lineno - node.lineno + 1
          if lines > MAX_FUNCTION_LINES:
            long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
