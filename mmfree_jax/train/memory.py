"""The train step's memory, from its compiled program, checked before the first step.

XLA's memory analysis of the compiled step (arguments + outputs - donated aliases +
temporaries, per device) is known once the step is compiled, which `check_step_memory` does
ahead of the first step; the compile is cached, so the loop's first call reuses it. A step
that cannot fit is refused in one line with the number, instead of an out-of-memory error
after the data pipeline started (or minutes of swapping on a CPU host).
"""

from __future__ import annotations

import os
import time

import jax


def step_bytes(compiled) -> int | None:
  """Peak bytes per device of a compiled step: arguments + outputs - aliases + temporaries
  (None where the backend gives no analysis)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )


def _host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux), else the physical memory, else None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def memory_limit(device: jax.Device | None = None) -> tuple[int | None, str]:
  """(bytes one device's program may use, where that number comes from).

  An accelerator reports its allocator limit (`memory_stats()['bytes_limit']`); CPU devices
  share the host's available memory, split over this process's devices.
  """
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  host = _host_available_bytes()
  if host is None:
    return None, "unknown"
  count = jax.local_device_count()
  per = f" / {count} devices" if count > 1 else ""
  return host // count, f"available host memory{per}"


def _size(n: int) -> str:
  """Bytes in GiB (MiB below one GiB, so a small step does not read '0.00 GiB')."""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(needed: int, limit: int | None, source: str) -> None:
  """Raises `ValueError` (one line, naming the fixes) when `needed` bytes exceed `limit`."""
  if limit is None or needed <= limit:
    return
  raise ValueError(
    f"the train step needs about {_size(needed)} per device (XLA's estimate of the compiled "
    f"step) but {source} is {_size(limit)}: lower data.seq_len or train.global_batch, raise "
    "train.microbatches, set model.remat, or shard over more devices (mesh.shape)"
  )


def check_step_memory(train_step, abstract_state, abstract_batch) -> str:
  """Compiles `train_step` for the given shapes and refuses a step that cannot fit.

  `train_step` is a jitted `(state, batch)` step, or an object whose `lower(state, batch)`
  gives a list of lowered steps (the distillation stages). Returns the banner's line: compile
  time and the largest estimate per device against the limit.
  """
  started = time.perf_counter()
  lowered = train_step.lower(abstract_state, abstract_batch)
  estimates = [
    step_bytes(low.compile()) for low in (lowered if isinstance(lowered, list) else [lowered])
  ]
  seconds = time.perf_counter() - started
  known = [e for e in estimates if e is not None]
  if not known:
    return f"train step: compiled in {seconds:.1f}s (no memory estimate on this backend)"
  needed = max(known)
  limit, source = memory_limit()
  check_fits(needed, limit, source)
  of = f" of {_size(limit)} ({source})" if limit is not None else ""
  return f"train step: compiled in {seconds:.1f}s, needs about {_size(needed)} per device{of}"
