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
  """Writes scalar rows to `metrics.jsonl` and TensorBoard; no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter  # optional: metrics.jsonl works without it
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard output is optional
        self._tb = None

  def write(self, step: int, scalars: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({prefix + k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(prefix + k, float(v), int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
