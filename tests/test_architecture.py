"""The package's import graph: every module imports, there is no cycle, and imports run one way
(docs/architecture.md §3). Parsed from the source (ast), so function-local imports count too."""

import ast
import importlib
import os
import pkgutil

import pytest

import mmfree_jax

ROOT = os.path.dirname(mmfree_jax.__file__)

# Layer of each subpackage / top-level module; a module may import only its own layer or lower.
LAYERS = {
    "ops": 0, "kernels": 0, "hardware": 0,
    "config": 1,
    "parallel": 2,
    "nn": 3, "accounting": 3,
    "data": 4, "checkpoint": 4,
    "generate": 5,
    "eval": 6, "hf": 6, "export": 6,
    "convert": 7, "train": 7,
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
                        "mmfree_jax.nn", "mmfree_jax.ops", "mmfree_jax.data",
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
