"""Test setup, before jax is imported anywhere: 8 fake CPU devices and a persistent
compilation cache (shared with the worker subprocesses through the environment), so the many
small end-to-end runs compile each distinct program once."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu and the CUDA plugin are installed
# Tests compile for TPU topologies with libtpu in several processes at once (xdist workers):
# without this libtpu's per-host lockfile lets only one of them load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "mmfree_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tokenizer/corpus caches of the tests stay out of the user's ~/.cache.
os.environ.setdefault("MMFREE_CACHE", os.path.join(tempfile.gettempdir(), "mmfree_jax_test_cache"))
