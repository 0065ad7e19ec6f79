"""The package's import graph (docs/architecture.md §3): every module imports; every subpackage
and top-level module has a layer; imports run down the layers, never up; an import between two
packages of one layer is declared in ALLOWED_SIDEWAYS; there is no import cycle, between modules
or between packages. Parsed from the source (ast), so function-local imports count too, and a
name a package exports lazily (`_EXPORTS`, e.g. `from mmfree_jax import build_model`) counts as
an import of the module that defines it."""

import ast
import functools
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import mmfree_jax

ROOT = os.path.dirname(mmfree_jax.__file__)

# Layer of each subpackage / top-level module (the second component of its name); a module may
# import only its own layer or lower. A new subpackage or module fails until it is placed here.
LAYERS = {
  "registry": 0,
  "hardware": 0,
  "paths": 0,
  "cli_logging": 0,
  "numerics": 1,
  "parallel": 2,
  "kernels": 3,
  "ops": 4,
  "config": 5,
  "nn": 6,
  "accounting": 7,
  "data": 8,
  "checkpoint": 8,
  "infer": 8,
  "generate": 9,
  "eval": 10,
  "hf": 10,
  "export": 10,
  "convert": 11,
  "train": 11,
}
# Imports between two different packages of one layer (importer, imported); any other is an
# error, so the layer picture stays true.
ALLOWED_SIDEWAYS = {
  ("eval", "export"),  # eval.py --packed scores an exported folder
  ("export", "hf"),  # an HF import folder's tokenizer travels with the export
  ("train", "convert"),  # distillation starts from a converted student
}
# Optional dependencies a module may import only inside a function (with the reason there).
OPTIONAL = {
  "lm_eval",
  "tqdm",
  "tensorboardX",
  "wandb",
  "mlflow",
  "datasets",
  "pyarrow",
  "zstandard",
  "array_record",
  "torch",
}


def _modules() -> list[str]:
  names = ["mmfree_jax"]
  for info in pkgutil.walk_packages([ROOT], prefix="mmfree_jax."):
    names.append(info.name)
  return sorted(names)


def _source(name: str) -> str:
  spec = importlib.util.find_spec(name)
  return spec.origin


@functools.cache
def _lazy_exports(package: str) -> dict[str, str]:
  """`name -> defining module` of a package's lazy exports (`_EXPORTS`), else {}."""
  if not _is_module(package) or not _source(package).endswith("__init__.py"):
    return {}
  return dict(getattr(importlib.import_module(package), "_EXPORTS", {}))


def _target(module: str, name: str) -> str:
  """The module that `from module import name` really imports: the submodule `name`, the
  module a lazy export resolves to, else `module` itself."""
  sub = f"{module}.{name}"
  if _is_module(sub):
    return sub
  return _lazy_exports(module).get(name, module)


@functools.cache
def _imports(name: str) -> frozenset[str]:
  """mmfree_jax modules that `name` imports anywhere in its source, lazy exports resolved
  (`from pkg import exported` and `pkg.exported` after `import pkg`)."""
  path = _source(name)
  tree = ast.parse(open(path, encoding="utf-8").read())
  is_pkg = path.endswith("__init__.py")
  base = name if is_pkg else name.rsplit(".", 1)[0]
  found = set()
  aliases = {}  # local name -> the mmfree_jax module it is bound to
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("mmfree_jax"):
          found.add(a.name)
          if a.asname:
            aliases[a.asname] = a.name
          else:
            aliases[a.name.split(".")[0]] = a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        parts = base.split(".")
        parts = parts[: len(parts) - node.level + 1]
        module = ".".join(parts + ([module] if module else []))
      if not module.startswith("mmfree_jax"):
        continue
      for alias in node.names:
        target = _target(module, alias.name)
        found.add(target)
        if target == f"{module}.{alias.name}":
          aliases[alias.asname or alias.name] = target
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
    ):
      found.add(_target(aliases[node.value.id], node.attr))
  return frozenset(m for m in found if m != name and _is_module(m))


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ModuleNotFoundError, ValueError):
    return False


def _package(name: str) -> str | None:
  """'nn' for mmfree_jax.nn.model, 'config' for mmfree_jax.config, None for mmfree_jax."""
  parts = name.split(".")
  return parts[1] if len(parts) > 1 else None


def _layer(name: str) -> int | None:
  return LAYERS.get(_package(name))


def test_every_package_is_placed():
  unplaced = sorted({_package(n) for n in _modules()} - set(LAYERS) - {None})
  assert not unplaced, (
    f"mmfree_jax.{unplaced[0]} has no layer: add it to LAYERS in "
    "tests/test_architecture.py (and docs/architecture.md §3, the README's "
    f"module map); unplaced: {unplaced}"
  )


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
        cycle = path[path.index(nxt) :] + [nxt]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if state.get(nxt) is None:
        visit(nxt)
    path.pop()
    state[node] = 2

  for name in sorted(graph):
    if state.get(name) is None:
      visit(name)


def test_no_package_cycle():
  """The graph of packages (an edge where a module of one imports a module of another) has no
  cycle, whatever the layers say."""
  graph: dict[str, set[str]] = {}
  for name in _modules():
    for dep in _imports(name):
      if None not in (_package(name), _package(dep)) and _package(name) != _package(dep):
        graph.setdefault(_package(name), set()).add(_package(dep))
  state: dict[str, int] = {}

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        pytest.fail("package import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
      if state.get(nxt) is None:
        visit(nxt, path + [nxt])
    state[node] = 2

  for pkg in sorted(graph):
    if state.get(pkg) is None:
      visit(pkg, [pkg])


def test_imports_run_one_way():
  bad = []
  for name in _modules():
    own = _layer(name)
    for dep in _imports(name):
      dep_layer = _layer(dep)
      if own is None or dep_layer is None:
        continue  # the top package (lazy exports only) and unplaced ones (test above)
      if dep_layer > own:
        bad.append(f"{name} (layer {own}) imports {dep} (layer {dep_layer})")
      elif (
        dep_layer == own
        and _package(name) != _package(dep)
        and (_package(name), _package(dep)) not in ALLOWED_SIDEWAYS
      ):
        bad.append(f"{name} imports {dep} sideways (both layer {own}): not in ALLOWED_SIDEWAYS")
  assert not bad, "imports running back up or sideways:\n" + "\n".join(bad)


def test_the_top_package_imports_nothing_eagerly():
  """`mmfree_jax/__init__.py` resolves its exports lazily, so it is no layer's way around."""
  assert not _imports("mmfree_jax"), sorted(_imports("mmfree_jax"))


def test_eval_and_generation_never_import_training():
  for name in _modules():
    if name.startswith(
      (
        "mmfree_jax.eval",
        "mmfree_jax.generate",
        "mmfree_jax.hf",
        "mmfree_jax.nn",
        "mmfree_jax.ops",
        "mmfree_jax.numerics",
        "mmfree_jax.kernels",
        "mmfree_jax.parallel",
        "mmfree_jax.data",
        "mmfree_jax.checkpoint",
      )
    ):
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
        bad += [
          f"{name}: from {node.module} import {a.name}" for a in node.names if _private(a.name)
        ]
        module_aliases.update(
          a.asname or a.name for a in node.names if _is_module(f"{node.module}.{a.name}")
        )
      elif isinstance(node, ast.Import):
        module_aliases.update(
          a.asname for a in node.names if a.asname and a.name.startswith("mmfree_jax")
        )
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in module_aliases
        and _private(node.attr)
      ):
        bad.append(f"{name}: {node.value.id}.{node.attr}")
  assert not bad, "\n".join(bad)


@pytest.mark.subprocess
def test_config_imports_no_kernel():
  """The config validates against `registry` (jax-free names), so importing it loads no Pallas
  kernel module and no `jax.experimental.pallas` (checked in a fresh interpreter)."""
  code = (
    "import sys, mmfree_jax.config, mmfree_jax.registry\n"
    "bad = sorted(m for m in sys.modules if m.startswith(('mmfree_jax.kernels', "
    "'mmfree_jax.ops', 'jax.experimental.pallas')))\n"
    "print(repr(bad))\n"
  )
  env = dict(os.environ, PYTHONPATH=os.path.dirname(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
  )
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
  from mmfree_jax.export import layout  # pylint: disable=import-outside-toplevel

  assert sorted(layout.EMBEDDING_DTYPES) == sorted(registry.EMBEDDING_DTYPES)
  assert registry.DEFAULT_MATVEC_METHOD in registry.MATVEC_METHODS


def test_module_maps_list_every_package():
  """The README's module map and docs/architecture.md §3 name every placed package."""
  repo = os.path.dirname(ROOT)
  readme = open(os.path.join(repo, "README.md"), encoding="utf-8").read()
  readme_map = readme[readme.index("Module map") : readme.index("## CLI reference")]
  docs = open(os.path.join(repo, "docs", "architecture.md"), encoding="utf-8").read()
  docs_map = docs[docs.index("## 3. Module map") : docs.index("## 4.")]
  packages = {_package(n) for n in _modules()} - {None}
  assert set(LAYERS) == packages, "LAYERS names a package that does not exist"
  for pkg in sorted(packages):
    name = f"{pkg}/" if os.path.isdir(os.path.join(ROOT, pkg)) else f"{pkg}.py"
    assert f"`{name}`" in readme_map, f"README.md's module map lacks `{name}`"
    assert name in docs_map, f"docs/architecture.md §3 lacks {name}"
