"""The MLGRU recurrence `h_t = f_t h_{t-1} + i_t`: forward+backward time and compiled peak
memory vs sequence length, for every `scan_type` (sequential, associative, chunked,
sequential_custom_vjp).

    python -m benchmarks.bench_recurrence [--preset toy|cpu|accel]

Inputs `f, i: [batch, T, d]` fp32; the timed function is `grad(sum(h * w))` w.r.t. (f, i).
Memory is XLA's compiled memory analysis of that function (temporaries = what autodiff keeps
plus scratch). The implementations are timed round-robin at each T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from mmfree_jax.ops import recurrence

NAME = "bench_recurrence"

SEQ_LENS = {"toy": [64, 256], "cpu": [256, 1024, 4096, 16384],
            "accel": [256, 1024, 4096, 16384, 65536]}
BATCH_DIM = {"toy": (1, 32), "cpu": (2, 256), "accel": (8, 2048)}
ROUNDS = {"toy": 2, "cpu": 5, "accel": 10}


def _grad_fn(scan_type: str, chunk_size: int):
  rec = recurrence.get_recurrence(scan_type, chunk_size)

  def loss(f, i, w):
    h, h_last = rec(f, i)
    return jnp.sum(h * w) + jnp.sum(h_last)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def run(preset: str, chunk_size: int = 64) -> dict:
  batch, dim = BATCH_DIM[preset]
  rows = []
  for seq in SEQ_LENS[preset]:
    rng = np.random.default_rng(seq)
    f = jnp.asarray(rng.uniform(0.8, 1.0, (batch, seq, dim)), jnp.float32)
    i = jnp.asarray(rng.normal(size=(batch, seq, dim)) * 0.1, jnp.float32)
    w = jnp.asarray(rng.normal(size=(batch, seq, dim)), jnp.float32)
    fns, mem = {}, {}
    for scan_type in recurrence.SCAN_TYPES:
      g = _grad_fn(scan_type, chunk_size)
      compiled = g.lower(f, i, w).compile()
      mem[scan_type] = common.memory_stats(compiled)
      fns[scan_type] = functools.partial(compiled, f, i, w)
    times = common.interleaved_times(fns, ROUNDS[preset], warmup=1)
    best = min(t["median_s"] for t in times.values())
    for scan_type, t in times.items():
      row = {"scan_type": scan_type, "seq_len": seq, "batch": batch, "dim": dim,
             "fwd_bwd_s": t["median_s"], "fwd_bwd_min_s": t["min_s"],
             "relative_to_best": t["median_s"] / best,
             "temp_bytes": mem[scan_type].get("temp_bytes"),
             "peak_bytes": mem[scan_type].get("peak_bytes")}
      rows.append(row)
      print(f"T={seq:6d} {scan_type:22s} {t['median_s'] * 1e3:9.2f} ms  "
            f"temp {common.fmt_bytes(row['temp_bytes'] or 0)}", flush=True)
  # Recommendation: the fastest at the longest and at a typical training length.
  summary = {}
  for seq in SEQ_LENS[preset]:
    at = [r for r in rows if r["seq_len"] == seq]
    summary[str(seq)] = min(at, key=lambda r: r["fwd_bwd_s"])["scan_type"]
  # Recommendation: the lowest total time over all T (long sequences dominate, as they do a
  # training step's recurrence cost; sub-millisecond short-T timings are the noisiest); within
  # 5% of it, the one with the least total memory.
  types = list(recurrence.SCAN_TYPES)
  total = {t: sum(r["fwd_bwd_s"] for r in rows if r["scan_type"] == t) for t in types}
  mem = {t: sum(r["temp_bytes"] or 0 for r in rows if r["scan_type"] == t) for t in types}
  best = min(total.values())
  rel_time = {t: total[t] / best for t in types}
  close = [t for t in types if total[t] <= 1.05 * best]
  recommended = min(close, key=lambda t: mem[t])
  print(f"recommended scan_type on {jax.default_backend()}: {recommended}", flush=True)
  return {"chunk_size": chunk_size, "rows": rows, "fastest_by_seq_len": summary,
          "total_time_vs_best": rel_time, "recommended": recommended,
          "backend": jax.default_backend()}


def main(argv=None):
  def extra(p):
    p.add_argument("--chunk_size", type=int, default=64)
  args = common.parse_args(NAME, __doc__, extra, argv)
  results = run(args.preset, args.chunk_size)
  common.write_json(args.out, NAME, args.preset, results,
                    ["grad of sum(h*w)+sum(h_T) w.r.t. (f, i); median of round-robin rounds",
                     "memory: XLA compiled memory analysis (temp = saved residuals + scratch; "
                     "peak = args + outputs + temp)"])


if __name__ == "__main__":
  main()
