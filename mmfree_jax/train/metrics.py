"""Metric sinks: a JSONL file and TensorBoard event files in the workdir (process 0 only),
and the device peak used for MFU."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp

# Nominal dense bf16 peaks per chip (FLOP/s), from vendor datasheets. CPUs are measured.
NOMINAL_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """Measured FLOP/s of an `n x n` matmul on the default device (best of `repeats`)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def device_peak_flops(configured: float = 0.0) -> tuple[float, str]:
  """Per-device peak FLOP/s and where it came from (config, datasheet or a CPU measurement)."""
  if configured > 0:
    return configured, "config"
  kind = jax.devices()[0].device_kind
  for name, peak in NOMINAL_PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak, f"nominal bf16 ({kind})"
  return measure_matmul_peak(), f"measured fp32 matmul ({kind})"


class MetricsWriter:
  """Writes scalar rows to `metrics.jsonl` and an optional tracker (`trackers.py`); no-op on
  processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True, tracker=None):
    self.enabled = enabled
    self._jsonl = None
    self._tracker = tracker if enabled else None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({prefix + k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tracker is not None:
      self._tracker.log(int(step), {prefix + k: float(v) for k, v in scalars.items()})

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tracker is not None:
      self._tracker.close()
      self._tracker = None


def drop_rows_after(workdir: str, step: int) -> int:
  """Removes the `metrics.jsonl` rows of steps after `step` (a resumed run redoes them);
  returns how many were dropped. The file is replaced atomically."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
      continue
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  dropped = len(lines) - len(kept)
  if dropped:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped
