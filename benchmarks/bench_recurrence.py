"""The MLGRU recurrence `h_t = f_t h_{t-1} + i_t`: forward+backward time and compiled peak
memory vs sequence length, for every `scan_type` (sequential, associative, chunked,
sequential_custom_vjp, and on GPU/TPU the Pallas kernel `pallas`; `auto` is an alias).

On CPU the Pallas kernels can only run in Pallas' interpreter, whose timings mean nothing:
there each kernel (GPU and TPU) runs once, interpreted, and the result records only that it ran
and how far it is from `sequential` (`kernels_interpret`). Device timings of `pallas` come from
this benchmark with `--preset accel` on a GPU/TPU, or from `benchmarks.accel_check`.

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
from mmfree_jax import registry
from mmfree_jax.kernels import dispatch
from mmfree_jax.ops import recurrence

NAME = "bench_recurrence"

SEQ_LENS = {
  "toy": [64, 256],
  "cpu": [256, 1024, 4096, 16384],
  "accel": [256, 1024, 4096, 16384, 65536],
}
BATCH_DIM = {"toy": (1, 32), "cpu": (2, 256), "accel": (8, 2048)}
ROUNDS = {"toy": 2, "cpu": 5, "accel": 10}


def timed_scan_types() -> list[str]:
  """All but the alias `auto`; `pallas` only on GPU/TPU (on CPU: `kernels_interpret`)."""
  return list(registry.native_scan_types(dispatch.default_platform()))


def kernels_interpret(batch: int = 2, seq: int = 37, dim: int = 256) -> list[dict]:
  """Each Pallas kernel once in interpret mode vs `sequential` (CPU: it ran, and its error)."""
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.uniform(0.8, 1.0, (batch, seq, dim)), jnp.float32)
  i = jnp.asarray(rng.normal(size=(batch, seq, dim)) * 0.1, jnp.float32)
  w = jnp.asarray(rng.normal(size=(batch, seq, dim)), jnp.float32)
  want = _grad_fn("sequential", 64)(f, i, w)
  rows = []
  for platform in dispatch.KERNEL_PLATFORMS:
    with dispatch.kernel_platform(platform, interpret=True):
      got = _grad_fn("pallas", 64)(f, i, w)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
    rows.append(
      {
        "kernel": platform,
        "ran": True,
        "shape": [batch, seq, dim],
        "grad_max_abs_err_vs_sequential": err,
      }
    )
    print(
      f"pallas ({platform} kernel, interpreted) ran; grad max |err| vs sequential {err:.1e} "
      "(interpret timings are meaningless: not timed)",
      flush=True,
    )
  return rows


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
    for scan_type in timed_scan_types():
      g = _grad_fn(scan_type, chunk_size)
      compiled = g.lower(f, i, w).compile()
      mem[scan_type] = common.memory_stats(compiled)
      fns[scan_type] = functools.partial(compiled, f, i, w)
    times = common.interleaved_times(fns, ROUNDS[preset], warmup=1)
    best = min(t["median_s"] for t in times.values())
    for scan_type, t in times.items():
      row = {
        "scan_type": scan_type,
        "seq_len": seq,
        "batch": batch,
        "dim": dim,
        "fwd_bwd_s": t["median_s"],
        "fwd_bwd_min_s": t["min_s"],
        "relative_to_best": t["median_s"] / best,
        "temp_bytes": mem[scan_type].get("temp_bytes"),
        "peak_bytes": mem[scan_type].get("peak_bytes"),
      }
      rows.append(row)
      print(
        f"T={seq:6d} {scan_type:22s} {t['median_s'] * 1e3:9.2f} ms  "
        f"temp {common.fmt_bytes(row['temp_bytes'] or 0)}",
        flush=True,
      )
  # Recommendation: the fastest at the longest and at a typical training length.
  summary = {}
  for seq in SEQ_LENS[preset]:
    at = [r for r in rows if r["seq_len"] == seq]
    summary[str(seq)] = min(at, key=lambda r: r["fwd_bwd_s"])["scan_type"]
  # Recommendation: the lowest total time over all T (long sequences dominate, as they do a
  # training step's recurrence cost; sub-millisecond short-T timings are the noisiest); within
  # 5% of it, the one with the least total memory.
  types = timed_scan_types()
  total = {t: sum(r["fwd_bwd_s"] for r in rows if r["scan_type"] == t) for t in types}
  mem = {t: sum(r["temp_bytes"] or 0 for r in rows if r["scan_type"] == t) for t in types}
  best = min(total.values())
  rel_time = {t: total[t] / best for t in types}
  close = [t for t in types if total[t] <= 1.05 * best]
  recommended = min(close, key=lambda t: mem[t])
  print(f"recommended scan_type on {jax.default_backend()}: {recommended}", flush=True)
  out = {
    "chunk_size": chunk_size,
    "rows": rows,
    "fastest_by_seq_len": summary,
    "total_time_vs_best": rel_time,
    "recommended": recommended,
    "backend": jax.default_backend(),
  }
  if dispatch.default_platform() not in dispatch.KERNEL_PLATFORMS:
    out["kernels_interpret"] = kernels_interpret()
  return out


def main(argv=None):
  def extra(p):
    p.add_argument("--chunk_size", type=int, default=64)

  args = common.parse_args(NAME, __doc__, extra, argv)
  results = run(args.preset, args.chunk_size)
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "grad of sum(h*w)+sum(h_T) w.r.t. (f, i); median of round-robin rounds",
      "memory: XLA compiled memory analysis (temp = saved residuals + scratch; "
      "peak = args + outputs + temp)",
    ],
  )


def markdown(r: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  seqs = sorted({x["seq_len"] for x in r["rows"]})
  types = list(dict.fromkeys(x["scan_type"] for x in r["rows"]))
  get = {(x["scan_type"], x["seq_len"]): x for x in r["rows"]}
  rows = [
    [st]
    + [
      f"{1e3 * get[(st, s)]['fwd_bwd_s']:.2f} ms / {get[(st, s)]['temp_bytes'] / 2**20:.1f} MiB"
      for s in seqs
    ]
    for st in types
  ]
  x0 = r["rows"][0]
  return (
    f"## 3. Recurrence fwd+bwd time / compiled temp memory vs T (`bench_recurrence`, "
    f"batch {x0['batch']}, dim {x0['dim']}, chunk {r['chunk_size']})\n\n"
    + common.md_table(["scan_type"] + [f"T={s}" for s in seqs], rows)
    + "\n\nfastest: "
    + ", ".join(f"T={k}: {v}" for k, v in r["fastest_by_seq_len"].items())
    + (
      "\n\ntotal time over all T relative to the fastest: "
      + ", ".join(f"{k} {v:.2f}" for k, v in r["total_time_vs_best"].items())
      + f". **Recommended default `scan_type` on {r['backend']}: "
      f"`{r['recommended']}`** (least total time; within 5% of it, least memory)"
      if "recommended" in r
      else ""
    )
  )


if __name__ == "__main__":
  main()
