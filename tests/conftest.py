"""Test setup, before jax is imported anywhere: 8 fake CPU devices and a persistent
compilation cache (shared with the worker subprocesses through the environment), so the many
small end-to-end runs compile each distinct program once."""

import gc
import math
import os
import sys
import tempfile

import pytest

from tests.cpu_pipeline import FAST_FLAGS

# The compile-only TPU/CUDA toolchains (requirements-accel.txt) live in their own folder, which
# the README's test command fills (`pip install --target .venv-accel`), so that the runtime
# venv's CLIs never load them (tests/test_cli_clean.py). Here, and in every subprocess a test
# starts, they go on the path.
ACCEL_TOOLCHAINS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-accel"
)
if os.path.isdir(ACCEL_TOOLCHAINS) and ACCEL_TOOLCHAINS not in sys.path:
  sys.path.insert(0, ACCEL_TOOLCHAINS)
  os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (ACCEL_TOOLCHAINS, os.environ.get("PYTHONPATH")) if p
  )
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:  # tests/cpu_pipeline.py
  os.environ["XLA_FLAGS"] += " " + FAST_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the toolchains above are compile-only
# Tests compile for TPU topologies with libtpu in several processes at once (xdist workers):
# without this libtpu's per-host lockfile lets only one of them load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mmfree_jax_test_jit_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tokenizer/corpus caches of the tests stay out of the user's ~/.cache.
os.environ.setdefault("MMFREE_CACHE", os.path.join(tempfile.gettempdir(), "mmfree_jax_test_cache"))


@pytest.fixture
def allow_exploding_lr(monkeypatch):
  """Lifts optim.lr's sanity bound for the tests that blow the weights up on purpose (lr 1e30)
  to make every later step non-finite."""
  from mmfree_jax.config import schema  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(schema, "MAX_LR", math.inf)


def pytest_sessionfinish(session):
  """Collects the session's garbage before an xdist worker reports that it finished, and
  freezes what survives. pytest collects once more while it unconfigures, after that report;
  in a worker that ran hundreds of jax tests this took over execnet's 5 s shutdown grace on a
  loaded machine, so execnet sent the worker a SIGINT, which landed in hypothesis's gc
  callback: a `PytestUnraisableExceptionWarning` with a `KeyboardInterrupt` after `[100%]`.
  Here the controller waits for it; the later collection skips the frozen objects."""
  del session
  gc.collect()
  gc.freeze()


from tests.storage_emulators import (  # noqa: E402,F401  (fixtures)
  gcs_emulator,
  gcs_root,
  s3_emulator,
  s3_root,
)
from tests.xdist_order import (  # noqa: E402,F401  (hooks)
  pytest_collection_modifyitems,
  pytest_configure,
  pytest_configure_node,
  pytest_unconfigure,
  pytest_xdist_make_scheduler,
)
