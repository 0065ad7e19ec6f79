"""Shared pieces of the benchmarks: presets, timing, machine peaks, memory stats, JSON output.

Every number a benchmark reports is measured in that benchmark's own process and run, and
comparisons are ratios inside one run: the variants of one comparison are timed round-robin
(A, B, A, B, ...) so that a change in machine load hits all of them alike, and each reports
the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Compile times are measured: never read compiled programs from a persistent cache (e.g. a
# JAX_COMPILATION_CACHE_DIR inherited from the test environment). The smoke test, whose
# timings mean nothing, opts back in with MMFREE_BENCH_ALLOW_COMPILATION_CACHE=1.
if os.environ.get("MMFREE_BENCH_ALLOW_COMPILATION_CACHE") != "1":
  jax.config.update("jax_enable_compilation_cache", False)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PRESETS = ("toy", "cpu", "accel")


def parse_args(
  name: str, doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None, argv=None
):
  """`--preset toy|cpu|accel` (default cpu) and `--out` (default: `<name>.json` in a
  temporary folder; `--commit_results`: the committed results/<name>.json)."""
  parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc)
  parser.add_argument(
    "--preset",
    choices=PRESETS,
    default="cpu",
    help="toy: seconds (smoke test); cpu: the CPU-sized default (< 3 min); "
    "accel: bigger shapes for a GPU/TPU",
  )
  parser.add_argument("--out", default=None, help="the JSON file (default: see --commit_results)")
  parser.add_argument(
    "--commit_results",
    action="store_true",
    help=f"write benchmarks/results/{name}.json (committed) instead of "
    f"$TMPDIR/mmfree_bench/{name}.json",
  )
  if extra is not None:
    extra(parser)
  args = parser.parse_args(argv)
  if args.out is None:  # running one benchmark must not dirty the checkout (run_all: --out)
    folder = (
      RESULTS_DIR if args.commit_results else os.path.join(tempfile.gettempdir(), "mmfree_bench")
    )
    args.out = os.path.join(folder, f"{name}.json")
  return args


def _load_average() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


_START_LOAD = _load_average()  # at import, i.e. when the benchmark process starts


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict:
  dev = jax.devices()[0]
  info = {
    "cpu_model": _cpu_model(),
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "machine": platform.machine(),
  }
  info["load_average_1m_start"] = _START_LOAD
  info["load_average_1m_end"] = _load_average()
  return info


def block(x):
  return jax.block_until_ready(x)


def interleaved_times(
  fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, dict]:
  """Times each zero-argument callable `rounds` times, round-robin, after `warmup` calls.

  Returns `{name: {"median_s", "min_s", "times_s"}}`.
  """
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - t)
  return {
    name: {
      "median_s": float(np.median(ts)),
      "min_s": float(np.min(ts)),
      "times_s": [float(t) for t in ts],
    }
    for name, ts in times.items()
  }


def matmul_peaks(sizes=(512, 1024, 2048), dtypes=("float32", "bfloat16"), rounds: int = 5) -> dict:
  """Measured matmul FLOP/s per dtype: the best over `sizes` of the median over rounds.

  Each timed call runs `reps` chained matmuls inside one jit, so dispatch overhead is
  amortized. fp32 and bf16 are timed round-robin in the same run.
  """
  fns, flops = {}, {}
  for dtype in dtypes:
    for n in sizes:
      reps = max(1, int(2 * 2048**3 // n**3))
      a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)) / math.sqrt(n), dtype)

      @jax.jit
      def chain(a, reps=reps):
        return jax.lax.fori_loop(0, reps, lambda _, x: (x @ a).astype(a.dtype), a)

      block(chain(a))
      fns[(dtype, n)] = functools_partial(chain, a)
      flops[(dtype, n)] = 2.0 * n**3 * reps
  times = interleaved_times({f"{d}:{n}": f for (d, n), f in fns.items()}, rounds, warmup=0)
  out = {}
  for dtype in dtypes:
    per_size = {n: flops[(dtype, n)] / times[f"{dtype}:{n}"]["median_s"] for n in sizes}
    best = max(per_size, key=per_size.get)
    out[dtype] = {
      "flops_per_s": per_size[best],
      "best_n": best,
      "by_size": {str(n): v for n, v in per_size.items()},
    }
  return out


def functools_partial(fn, *args):
  return lambda: fn(*args)


def matmul_probe(n: int, dtype: str = "float32", reps: int | None = None):
  """`(thunk, flops)`: chained `n x n` matmuls in one jit, to time round-robin next to a
  workload so that the peak and the workload see the same machine load."""
  reps = reps or max(1, int(2 * 2048**3 // n**3))
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)) / math.sqrt(n), dtype)
  chain = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda _, x: (x @ a).astype(a.dtype), a))
  block(chain(a))
  return (lambda: chain(a)), 2.0 * n**3 * reps


def copy_probe(mbytes: int):
  """`(thunk, bytes moved)`: an in-place `x + 1` over `mbytes` (read + write), to time
  round-robin next to a workload."""
  box = [jnp.ones((mbytes * 2**20 // 4,), jnp.float32)]
  inplace = jax.jit(lambda x: x + 1.0, donate_argnums=0)

  def copy():
    box[0] = inplace(box[0])
    return box[0]

  block(copy())
  return copy, 2 * box[0].nbytes


def copy_bandwidth(mbytes: int = 256, rounds: int = 5) -> dict:
  """Measured memory bandwidth on a buffer well above CPU last-level cache sizes.

  copy: `x + 1` written in place (donated buffer: no fresh pages to fault in), bytes moved =
  read + write. read: `max(x)`, bytes = read.
  """
  n = mbytes * 2**20 // 4
  box = [jnp.ones((n,), jnp.float32)]
  nbytes = box[0].nbytes
  inplace = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  total = jax.jit(jnp.max)  # an order-free reduction XLA vectorizes (a float sum is not)

  def copy():
    box[0] = inplace(box[0])
    return box[0]

  t = interleaved_times({"copy": copy, "read": lambda: total(box[0])}, rounds, warmup=2)
  return {
    "bytes": nbytes,
    "gb_per_s": 2 * nbytes / t["copy"]["median_s"] / 1e9,
    "read_gb_per_s": nbytes / t["read"]["median_s"] / 1e9,
  }


def memory_stats(compiled) -> dict:
  """XLA's compiled memory analysis in bytes; `peak_bytes` = arguments + outputs + temporaries
  - aliased (donated) bytes: what the executable needs live at its peak."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  stats = {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "generated_code_bytes": int(m.generated_code_size_in_bytes),
  }
  stats["peak_bytes"] = (
    stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"] - stats["alias_bytes"]
  )
  return stats


def write_json(path: str, name: str, preset: str, results: dict, notes: list[str]) -> dict:
  payload = {
    "benchmark": name,
    "preset": preset,
    "machine": machine_info(),
    "notes": notes,
    "results": results,
    "unix_time": time.time(),
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  print(f"wrote {path}")
  return payload


def fmt_bytes(b: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(b) < 1024 or unit == "GiB":
      return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
    b /= 1024
  return str(b)


def md_table(header: list[str], rows: list[list]) -> str:
  """A markdown table; floats as 3 significant digits (thousands separated from 1000 up)."""

  def cell(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def yes(ok: bool | None) -> str:
  """A targets-table verdict."""
  return "n/a" if ok is None else ("**yes**" if ok else "no")
