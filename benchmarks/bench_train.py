"""Train-step throughput and MFU: MatMul-free (autodiff and lean BitLinear) vs Transformer++
at equal d/L, for several sizes and sequence lengths.

    python -m benchmarks.bench_train [--preset toy|cpu|accel]

MFU = accounting.train_flops_per_token(cfg, T) x tokens/s / the matmul peak measured in this run
(fp32 peak for fp32 compute, bf16 peak for bf16 compute). The variants of one (size, T) are
timed round-robin; tokens/s uses the median step time.
"""

from __future__ import annotations

from benchmarks import common, setups
from mmfree_jax import accounting

NAME = "bench_train"

# (d_model, num_layers, seq_len, tokens per step)
SHAPES = {
  "toy": [(64, 2, 64, 128)],
  "cpu": [(256, 4, 512, 2048), (256, 4, 2048, 2048), (512, 2, 2048, 2048)],
  "accel": [
    (1024, 24, 512, 262144),
    (1024, 24, 2048, 262144),
    (1024, 24, 8192, 262144),
    (2048, 24, 2048, 262144),
  ],
}
VOCAB = {"toy": 256, "cpu": 4096, "accel": 32000}
ROUNDS = {"toy": 2, "cpu": 3, "accel": 5}
VARIANTS = {  # name -> (kind, model overrides)
  "mmfree": ("mmfree", {"bitlinear_impl": "autodiff"}),  # explicit: the default is auto
  "mmfree_lean": ("mmfree", {"bitlinear_impl": "lean"}),
  "transformer": ("transformer", {}),
}


TOY_VARIANTS = ("mmfree", "transformer")  # the smoke test keeps compiles few


def run(
  preset: str, dtype: str = "float32", scan_type: str | None = None, remat: str = "none"
) -> dict:
  peak_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
  peak_sizes = {"toy": (256,), "cpu": (512, 1024), "accel": (4096, 8192)}[preset]
  # The best matmul size, then that matmul is timed in every round next to the steps, so the
  # MFU denominator is measured under the same load as the numerator.
  peak_n = common.matmul_peaks(peak_sizes, (peak_dtype,), rounds=2)[peak_dtype]["best_n"]
  probe, probe_flops = common.matmul_probe(peak_n, peak_dtype)
  peaks = []
  rows = []
  for d, num_layers, seq, tokens in SHAPES[preset]:
    batch = max(1, tokens // seq)
    runners, info = {}, {}
    variants = VARIANTS if preset != "toy" else {k: VARIANTS[k] for k in TOY_VARIANTS}
    for name, (kind, overrides) in variants.items():
      extra = dict(overrides, dtype=dtype, remat=remat)
      if kind == "mmfree" and scan_type:
        extra["scan_type"] = scan_type
      cfg = setups.model_config(kind, d, num_layers, VOCAB[preset], **extra)
      setup = setups.train_setup(cfg)
      compiled, lower_s, compile_s = setups.compile_step(setup, batch, seq)
      runners[name] = setups.StepRunner(
        setup, compiled, setups.random_batch(batch, seq, cfg.vocab_size)
      )
      info[name] = (cfg, lower_s + compile_s)
    times = common.interleaved_times({**runners, "_peak": probe}, ROUNDS[preset], warmup=1)
    peak = probe_flops / times.pop("_peak")["median_s"]
    peaks.append(peak)
    base = times["transformer"]["median_s"]
    for name, t in times.items():
      cfg, compile_s = info[name]
      tok_s = batch * seq / t["median_s"]
      row = {
        "variant": name,
        "d_model": d,
        "num_layers": num_layers,
        "seq_len": seq,
        "batch": batch,
        "vocab": cfg.vocab_size,
        "scan_type": cfg.scan_type,
        "step_s": t["median_s"],
        "step_min_s": t["min_s"],
        "tokens_per_s": tok_s,
        "flops_per_token": accounting.train_flops_per_token(cfg, seq),
        "compile_s": compile_s,
        "speedup_vs_transformer": base / t["median_s"],
        "peak_flops_per_s": peak,
      }
      row["mfu"] = row["flops_per_token"] * tok_s / peak
      rows.append(row)
      print(
        f"d={d} L={num_layers} T={seq} B={batch} {name:12s} {tok_s:9.0f} tok/s  "
        f"MFU {row['mfu']:6.1%}  x{row['speedup_vs_transformer']:.2f} vs transformer",
        flush=True,
      )
    del runners
  return {
    "peak_flops_per_s": float(max(peaks)),
    "peak_n": peak_n,
    "peak_dtype": peak_dtype,
    "dtype": dtype,
    "remat": remat,
    "rows": rows,
  }


def main(argv=None):
  def extra(p):
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPU/TPU)")
    p.add_argument("--scan_type", default=None, help="MatMul-free scan_type (default: config)")
    p.add_argument("--remat", default="none")

  args = common.parse_args(NAME, __doc__, extra, argv)
  results = run(args.preset, args.dtype, args.scan_type, args.remat)
  notes = [
    "tokens/s from the median of round-robin timed steps (AdamW step included)",
    "MFU counts 6N (+ attention for Transformer++) per token against the matmul peak "
    "measured in the same rounds (an n x n matmul chain timed round-robin with the "
    "steps of each shape)",
  ]
  if args.preset == "cpu":
    notes.append(
      "CPU preset: 2048 tokens per step, T in {512, 2048}; T=8192 and d>=1024 "
      "only in --preset accel (one step would take minutes on 2 CPU cores)"
    )
  common.write_json(args.out, NAME, args.preset, results, notes)


def targets(tr: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of these results (`benchmarks.report`)."""
  rows = []
  at = [r for r in tr["rows"] if r["seq_len"] == 2048 and r["variant"] != "transformer"]
  for r in at:
    rows.append(
      [
        f"train tokens/s >= 1.2x Transformer++ at T=2048 ({r['variant']}, "
        f"d={r['d_model']}, L={r['num_layers']})",
        f"{r['speedup_vs_transformer']:.2f}x",
        common.yes(r["speedup_vs_transformer"] >= 1.2),
      ]
    )
  big = [r for r in tr["rows"] if r["d_model"] >= 512 and r["variant"] != "transformer"]
  peak = res.get("bench_peak", {}).get("results")
  dtype = tr["peak_dtype"]
  standalone = peak["matmul"][dtype]["flops_per_s"] if peak and dtype in peak["matmul"] else None
  for r in big:
    also = ""
    if standalone:
      also = (
        f" (vs the bench_peak peak {standalone / 1e9:.0f} GFLOP/s: "
        f"{r['mfu'] * r['peak_flops_per_s'] / standalone:.1%})"
      )
    rows.append(
      [
        f"MFU >= 50% of measured {dtype} peak at d>=512 ({r['variant']}, "
        f"d={r['d_model']}, T={r['seq_len']})",
        f"{r['mfu']:.1%} vs the peak timed in the same rounds "
        f"({r['peak_flops_per_s'] / 1e9:.0f} GFLOP/s){also}",
        common.yes(r["mfu"] >= 0.5),
      ]
    )
  return rows


def markdown(t: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  rows = [
    [
      r["d_model"],
      r["num_layers"],
      r["seq_len"],
      r["batch"],
      r["variant"],
      r["tokens_per_s"],
      f"{r['mfu']:.1%}",
      f"{r['speedup_vs_transformer']:.2f}x",
      f"{r['compile_s']:.1f}",
      f"{r['peak_flops_per_s'] / 1e9:.0f}",
    ]
    for r in t["rows"]
  ]
  return (
    f"## 2. Train step (`bench_train`, {t['dtype']}, remat={t['remat']}; MFU vs the "
    f"{t['peak_dtype']} matmul peak timed in the same rounds)\n\n"
    + common.md_table(
      [
        "d",
        "L",
        "T",
        "B",
        "variant",
        "tokens/s",
        "MFU",
        "vs Transformer++",
        "compile s",
        "peak GFLOP/s",
      ],
      rows,
    )
  )


if __name__ == "__main__":
  main()
