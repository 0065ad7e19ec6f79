"""Machine peaks measured in one run: fp32 and bf16 matmul FLOP/s, and copy bandwidth (GB/s).

python -m benchmarks.bench_peak [--preset toy|cpu|accel]
"""

from __future__ import annotations

from benchmarks import common

NAME = "bench_peak"


def run(preset: str) -> dict:
  sizes = {"toy": (256,), "cpu": (512, 1024, 2048), "accel": (2048, 4096, 8192)}[preset]
  rounds = {"toy": 2, "cpu": 5, "accel": 10}[preset]
  copy_mb = {"toy": 16, "cpu": 256, "accel": 2048}[preset]
  peaks = common.matmul_peaks(sizes, ("float32", "bfloat16"), rounds)
  bw = common.copy_bandwidth(copy_mb, rounds)
  return {
    "matmul": peaks,
    "copy": bw,
    "bf16_over_fp32": peaks["bfloat16"]["flops_per_s"] / peaks["float32"]["flops_per_s"],
  }


def main(argv=None):
  args = common.parse_args(NAME, __doc__, None, argv)
  results = run(args.preset)
  for dtype, r in results["matmul"].items():
    print(f"{dtype:9s} {r['flops_per_s'] / 1e9:8.1f} GFLOP/s (n={r['best_n']})")
  print(f"copy      {results['copy']['gb_per_s']:8.1f} GB/s")
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "matmul: chained n x n matmuls in one jit; best size, median of rounds; "
      "fp32 and bf16 timed round-robin",
      "copy: x+1 in place (donated) over a buffer larger than the CPU caches; "
      "bytes = read + write; read: max(x)",
    ],
  )


def markdown(p: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  m = p["matmul"]
  return "## 1. Machine peaks (`bench_peak`)\n\n" + common.md_table(
    ["quantity", "value"],
    [
      [
        "fp32 matmul",
        f"{m['float32']['flops_per_s'] / 1e9:.1f} GFLOP/s (n={m['float32']['best_n']})",
      ],
      [
        "bf16 matmul",
        f"{m['bfloat16']['flops_per_s'] / 1e9:.1f} GFLOP/s (n={m['bfloat16']['best_n']})",
      ],
      ["copy bandwidth (in place, read+write)", f"{p['copy']['gb_per_s']:.1f} GB/s"],
      ["read bandwidth (max reduction)", f"{p['copy']['read_gb_per_s']:.1f} GB/s"],
    ],
  )


if __name__ == "__main__":
  main()
