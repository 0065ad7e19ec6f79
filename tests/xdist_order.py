"""How `pytest -n N` shares the tests among its workers (hooks that tests/conftest.py imports).

pytest-xdist's default (`--dist load`) hands each worker runs of consecutive tests in file
order, so the suite ended with whatever slow tests sorted last on one worker while the other
sat idle, and a module-scoped fixture (a training run, the benchmarks' toy run) was built on
both workers when its module fell into both workers' runs. Instead, under `-n N`:

- the tests that use a module- or class-scoped fixture form one unit per module, so the
  fixture is built once; every other test is a unit of its own;
- units go out longest first (the estimate below, from the markers), one at a time to
  whichever worker is free, so the last ones are short and the workers end together.

xdist's own `--dist loadgroup` would do the grouping from `xdist_group` marks, but it tags
node ids, which pytest 9.2 no longer lets it do (pytest-xdist issue 1386): the workers write
the groups to a file the controller's scheduler reads once every worker has collected. A plain
run (no `-n`), or any explicit `--dist` other than `load`, keeps pytest's order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

_DIR = "mmfree_groups_dir"  # the key in xdist's workerinput (controller -> worker)
_KEY = pytest.StashKey[str]()  # the controller's folder for the workers' group files
# Rough seconds on 2 cores per marker (pyproject.toml defines them): only the order matters,
# and among equal estimates the file order is kept.
_COST = {"slow": 30.0, "subprocess": 8.0, "tpu_compile": 8.0}
_SHARED_SCOPES = ("module", "class", "package")


def _cost(item: pytest.Item) -> float:
  return max([1.0] + [c for name, c in _COST.items() if item.get_closest_marker(name)])


def _shares_a_fixture(item: pytest.Item) -> bool:
  info = getattr(item, "_fixtureinfo", None)
  if info is None:
    return False
  return any(d.scope in _SHARED_SCOPES for defs in info.name2fixturedefs.values() for d in defs)


def _ours(config: pytest.Config) -> bool:
  """Controller side: whether this run is scheduled here (`-n N` with xdist's default)."""
  return bool(config.getoption("numprocesses", None)) and config.getoption("dist", "no") == "load"


def pytest_configure(config: pytest.Config) -> None:
  if getattr(config, "workerinput", None) is None and _ours(config):
    config.stash[_KEY] = tempfile.mkdtemp(prefix="pytest-xdist-groups-")


def pytest_unconfigure(config: pytest.Config) -> None:
  path = config.stash.get(_KEY, None)
  if path is not None:
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
  """Controller side, per worker: where that worker writes its groups."""
  path = node.config.stash.get(_KEY, None)
  if path is not None:
    node.workerinput[_DIR] = path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
  path = config.stash.get(_KEY, None)
  if path is None:
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

  class LongestFirst(LoadScopeScheduling):
    """xdist's scope scheduling with the workers' groups as scopes, in the workers' order."""

    groups: dict[str, str] = {}

    def _split_scope(self, nodeid: str) -> str:
      return self.groups.get(nodeid, nodeid)

    def schedule(self) -> None:
      if self.collection is None:  # every worker has collected, so its file is complete
        names = sorted(os.listdir(path))
        if names:
          with open(os.path.join(path, names[0])) as f:
            self.groups = json.load(f)
      super().schedule()

  config.option.loadscopereorder = False  # keep the workers' order
  return LongestFirst(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  workerinput = getattr(config, "workerinput", None)
  if not workerinput or _DIR not in workerinput:
    return
  units: dict[str, list[pytest.Item]] = {}
  groups = {}
  for item in items:
    unit = item.nodeid
    if _shares_a_fixture(item):
      unit = item.nodeid.split("::")[0]
      groups[item.nodeid] = unit
    units.setdefault(unit, []).append(item)
  order = sorted(units.values(), key=lambda unit: -sum(_cost(i) for i in unit))
  items[:] = [item for unit in order for item in unit]
  target = os.path.join(workerinput[_DIR], f"{workerinput['workerid']}.json")
  with open(target + ".tmp", "w") as f:
    json.dump(groups, f)
  os.replace(target + ".tmp", target)
