"""Metric sinks: a JSONL file and TensorBoard event files in the workdir (process 0 only),
and the device peak and throughput behind MFU."""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from mmfree_jax import hardware, paths

# Where an MFU's peak came from (the `mfu_peak` field of a metrics row).
PEAK_SOURCES = ("config", "datasheet", "measured")


def measure_matmul_peak(
  sizes=(512, 1024), dtype=jnp.float32, repeats: int = 3, rounds: int = 3
) -> float:
  """Measured FLOP/s of square matmuls on the default device: the best single call over
  `rounds` rounds of `repeats` calls per size. On a shared, loaded host one short burst
  underestimates the peak (and an MFU above 1 follows); the best of several rounds of two
  sizes is what the device can do when it gets the cores."""
  best = 0.0
  calls = []
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    calls.append((n, f, a))
  for _ in range(rounds):
    for n, f, a in calls:
      for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = max(best, 2.0 * n**3 / max(time.perf_counter() - t, 1e-9))
  return best


def device_peak_flops(
  configured: float = 0.0, device_kind: str | None = None
) -> tuple[float, str, str]:
  """Per-device peak FLOP/s, its source (one of `PEAK_SOURCES`) and a description.

  `train.peak_flops_per_device` if set, else the chip table's dense bf16 peak for the exact
  `device_kind` (`mmfree_jax.hardware`), else a measured fp32 matmul (CPUs, unknown chips)."""
  if configured > 0:
    return configured, "config", "train.peak_flops_per_device"
  kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
  chip = hardware.lookup(kind)
  if chip is not None:
    return chip.bf16_flops, "datasheet", f"{chip.name} dense bf16 datasheet ({kind!r})"
  return measure_matmul_peak(), "measured", f"best measured fp32 matmul ({kind!r})"


@dataclasses.dataclass
class Throughput:
  """Turns step wall times into tokens/s and MFU (model FLOPs / device peak).

  With a measured peak, a step faster than that peak means the measurement caught the host
  busy: the peak is measured again (best of several rounds) and the higher one kept, so an
  MFU above 1 is only recorded when the device really beats its measured matmul."""

  tokens_per_step: int
  flops_per_token: float
  peak_flops: float
  peak_source: str
  devices: int
  peak_note: str = ""
  remeasure: object = measure_matmul_peak
  remeasures_left: int = 3  # each costs ~1 s on a CPU; a device that truly beats it stays > 1

  def row(self, step_time: float) -> dict:
    tokens_per_s = self.tokens_per_step / step_time
    per_device = tokens_per_s * self.flops_per_token / self.devices
    if self.peak_source == "measured" and per_device > self.peak_flops and self.remeasures_left > 0:
      self.remeasures_left -= 1
      self.peak_flops = max(self.peak_flops, self.remeasure())
    return {
      "step_time_s": step_time,
      "tokens_per_s": tokens_per_s,
      "mfu": per_device / self.peak_flops,
      "mfu_peak": self.peak_source,
    }


class MetricsWriter:
  """Writes scalar rows to `metrics.jsonl` and an optional tracker (`trackers.py`); no-op on
  processes other than 0.

  Locally each row is appended and flushed. An object in a bucket cannot be appended to, so
  there the rows are kept in memory and the whole object is rewritten (`paths.write_atomic`):
  at most every `upload_every_s` seconds, on `sync()` (each checkpoint save) and at close. A
  run killed between uploads loses only rows after its last checkpoint, which a resume redoes.
  """

  def __init__(
    self, workdir: str, enabled: bool = True, tracker=None, upload_every_s: float = 30.0
  ):
    self.enabled = enabled
    self._path = paths.join(workdir, "metrics.jsonl")
    self._jsonl = None
    self._tracker = tracker if enabled else None
    self._remote_text: list[str] | None = None  # a bucket's object: its whole text
    self._upload_every_s = upload_every_s
    self._uploaded_at = time.monotonic()
    self._pending = False
    if not enabled:
      return
    if paths.is_remote(workdir):
      old = (paths.read_fresh(self._path) or b"").decode("utf-8")
      self._remote_text = [old if not old or old.endswith("\n") else old + "\n"]
    else:
      paths.makedirs(workdir)
      self._jsonl = paths.open_file(self._path, "a")

  def write(self, step: int, scalars: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    numbers = {prefix + k: float(v) for k, v in scalars.items() if not isinstance(v, str)}
    row.update({prefix + k: v if isinstance(v, str) else float(v) for k, v in scalars.items()})
    line = json.dumps(row) + "\n"
    if self._remote_text is not None:
      self._remote_text.append(line)
      self._pending = True
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tracker is not None:
      self._tracker.log(int(step), numbers)
    if time.monotonic() - self._uploaded_at >= self._upload_every_s:
      self.sync()

  def sync(self) -> None:
    """Puts every row written so far (and the tracker's files) in the workdir."""
    if self._remote_text is not None and self._pending:
      paths.write_atomic(self._path, "".join(self._remote_text))
      self._pending = False
    if self._tracker is not None:
      self._tracker.sync()
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self.sync()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tracker is not None:
      self._tracker.close()
      self._tracker = None


def drop_rows_after(workdir: str, step: int) -> int:
  """Removes the `metrics.jsonl` rows of steps after `step` (a resumed run redoes them);
  returns how many were dropped. The file is replaced atomically."""
  path = paths.join(workdir, "metrics.jsonl")
  raw = paths.read_fresh(path)
  if raw is None:
    return 0
  lines = raw.decode("utf-8").splitlines(keepends=True)
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
    paths.write_atomic(path, "".join(kept))
  return dropped
