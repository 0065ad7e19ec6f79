"""The package's import graph: every module imports, there is no cycle, and imports run one way
(docs/architecture.md §3). Parsed from the source (ast), so function-local imports count too."""

import ast
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import mmfree_jax

ROOT = os.path.dirname(mmfree_jax.__file__)

# Layer of each subpackage / top-level module; a module may import only its own layer or lower.
LAYERS = {
    "registry": 0, "hardware": 0,
    "numerics": 1,
    "parallel": 2,
    "kernels": 3,
    "ops": 4,
    "config": 5,
    "nn": 6,
    "accounting": 7,
    "data": 8, "checkpoint": 8,
    "generate": 9,
    "eval": 10, "hf": 10, "export": 10,
    "convert": 11, "train": 11,
}
# Optional dependencies a module may import only inside a function (with the reason there).
OPTIONAL = {"lm_eval", "tqdm", "tensorboardX", "wandb", "mlflow", "datasets", "pyarrow",
            "zstandard", "array_record", "torch"}


def _modules() -> list[str]:
  names = ["mmfree_jax"]
  for info in pkgutil.walk_packages([ROOT], prefix="mmfree_jax."):
    names.append(info.name)
  return sorted(names)


def _source(name: str) -> str:
  spec = importlib.util.find_spec(name)
  return spec.origin


def _imports(name: str) -> set[str]:
  """mmfree_jax modules that `name` imports anywhere in its source."""
  path = _source(name)
  tree = ast.parse(open(path, encoding="utf-8").read())
  is_pkg = path.endswith("__init__.py")
  base = name if is_pkg else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("mmfree_jax"))
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        parts = base.split(".")
        parts = parts[:len(parts) - node.level + 1]
        module = ".".join(parts + ([module] if module else []))
      if not module.startswith("mmfree_jax"):
        continue
      for alias in node.names:  # `from pkg import module` imports the submodule
        sub = f"{module}.{alias.name}"
        found.add(sub if _is_module(sub) else module)
  return {m for m in found if m != name}


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ModuleNotFoundError, ValueError):
    return False


def _layer(name: str) -> int | None:
  parts = name.split(".")
  return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_imports():
  for name in _modules():
    if name.endswith("lm_eval_adapter") or name.endswith("__main__"):
      continue  # optional dependency / CLI entry point: checked by their own tests
    importlib.import_module(name)


def test_no_import_cycle():
  graph = {name: {m for m in _imports(name) if _is_module(m)} for name in _modules()}
  # A package's __init__ re-exporting its submodules is not a cycle with them.
  def edges(name):
    return {m for m in graph.get(name, ()) if not name.startswith(m + ".")}

  state: dict[str, int] = {}
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(edges(node)):
      if state.get(nxt) == 1:
        cycle = path[path.index(nxt):] + [nxt]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if state.get(nxt) is None:
        visit(nxt)
    path.pop()
    state[node] = 2

  for name in sorted(graph):
    if state.get(name) is None:
      visit(name)


def test_imports_run_one_way():
  bad = []
  for name in _modules():
    own = _layer(name)
    if own is None:
      continue
    for dep in _imports(name):
      dep_layer = _layer(dep)
      if dep_layer is not None and dep_layer > own:
        bad.append(f"{name} (layer {own}) imports {dep} (layer {dep_layer})")
  assert not bad, "imports running back up:\n" + "\n".join(bad)


def test_eval_and_generation_never_import_training():
  for name in _modules():
    if name.startswith(("mmfree_jax.eval", "mmfree_jax.generate", "mmfree_jax.hf",
                        "mmfree_jax.nn", "mmfree_jax.ops", "mmfree_jax.numerics",
                        "mmfree_jax.kernels", "mmfree_jax.parallel", "mmfree_jax.data",
                        "mmfree_jax.checkpoint")):
      assert not any(d.startswith("mmfree_jax.train") for d in _imports(name)), name


def _private(attr: str) -> bool:
  return attr.startswith("_") and not attr.startswith("__")


def test_no_cross_module_private_names():
  """Neither `from m import _x` nor `m._x` on an imported mmfree_jax module."""
  bad = []
  for name in _modules():
    tree = ast.parse(open(_source(name), encoding="utf-8").read())
    module_aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmfree_jax"):
        bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                if _private(a.name)]
        module_aliases.update(a.asname or a.name for a in node.names
                              if _is_module(f"{node.module}.{a.name}"))
      elif isinstance(node, ast.Import):
        module_aliases.update(a.asname for a in node.names
                              if a.asname and a.name.startswith("mmfree_jax"))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in module_aliases and _private(node.attr)):
        bad.append(f"{name}: {node.value.id}.{node.attr}")
  assert not bad, "\n".join(bad)


def test_config_imports_no_kernel():
  """The config validates against `registry` (jax-free names), so importing it loads no Pallas
  kernel module and no `jax.experimental.pallas` (checked in a fresh interpreter)."""
  code = ("import sys, mmfree_jax.config, mmfree_jax.registry\n"
          "bad = sorted(m for m in sys.modules if m.startswith(('mmfree_jax.kernels', "
          "'mmfree_jax.ops', 'jax.experimental.pallas')))\n"
          "print(repr(bad))\n")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_registry_imports_nothing():
  """`registry` imports no jax and nothing from the package (a CLI may read it before jax)."""
  tree = ast.parse(open(_source("mmfree_jax.registry"), encoding="utf-8").read())
  imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert set(imported) <= {"__future__"}, imported


def test_registries_match_their_names():
  from mmfree_jax import registry  # pylint: disable=import-outside-toplevel
  from mmfree_jax.numerics import ternary_packing  # pylint: disable=import-outside-toplevel
  from mmfree_jax.ops import bitlinear, recurrence  # pylint: disable=import-outside-toplevel
  assert tuple(recurrence.IMPLS) == registry.SCAN_TYPES
  assert tuple(bitlinear.IMPLS) == registry.BITLINEAR_IMPLS
  assert ternary_packing.MATVEC_METHODS == registry.MATVEC_METHODS
  assert registry.DEFAULT_MATVEC_METHOD in registry.MATVEC_METHODS
