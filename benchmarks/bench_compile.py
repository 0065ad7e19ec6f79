"""Train-step compile time vs depth. The blocks run under `lax.scan` over a stacked 'layers'
axis, so the compiled program has one copy of the block whatever the depth, and compile time
should stay nearly flat.

    python -m benchmarks.bench_compile [--preset toy|cpu|accel]

Reports trace+lower time and XLA compile time of the jitted train step (AOT, abstract
inputs: nothing runs) for each depth, MatMul-free and Transformer++, with the remat policy
given by --remat. Each depth is a new shape, so nothing is reused from a cache.
"""

from __future__ import annotations

from benchmarks import common, setups

NAME = "bench_compile"

DEPTHS = {"toy": [1, 2], "cpu": [2, 8, 24], "accel": [2, 8, 24, 48]}
SHAPE = {"toy": (64, 256, 1, 32), "cpu": (256, 4096, 2, 256), "accel": (1024, 32000, 8, 2048)}
ROUNDS = {"toy": 1, "cpu": 2, "accel": 2}
KINDS = {"toy": ["mmfree"], "cpu": ["mmfree", "transformer"], "accel": ["mmfree", "transformer"]}


def run(preset: str, remat: str = "none", rounds: int | None = None) -> dict:
  d, vocab, batch, seq = SHAPE[preset]
  rounds = rounds or ROUNDS[preset]
  times = {}
  for _ in range(rounds):  # round-robin over depths: a load change hits every depth alike
    for kind in KINDS[preset]:
      for depth in DEPTHS[preset]:
        cfg = setups.model_config(kind, d, depth, vocab, remat=remat)
        _, lower_s, compile_s = setups.compile_step(setups.train_setup(cfg), batch, seq)
        times.setdefault((kind, depth), []).append((lower_s, compile_s))
  rows = []
  for kind in KINDS[preset]:
    for depth in DEPTHS[preset]:
      ts = times[(kind, depth)]
      lower_s, compile_s = min(t[0] for t in ts), min(t[1] for t in ts)
      rows.append(
        {
          "kind": kind,
          "num_layers": depth,
          "d_model": d,
          "remat": remat,
          "lower_s": lower_s,
          "compile_s": compile_s,
          "total_s": lower_s + compile_s,
          "rounds": len(ts),
        }
      )
      print(
        f"{kind:12s} L={depth:3d} lower {lower_s:6.2f} s  compile {compile_s:6.2f} s", flush=True
      )
  for kind in KINDS[preset]:
    at = [r for r in rows if r["kind"] == kind]
    for r in at:
      r["total_vs_shallowest"] = r["total_s"] / at[0]["total_s"]
  return {"rows": rows, "depths": DEPTHS[preset]}


def main(argv=None):
  def extra(p):
    p.add_argument("--remat", default="none")

  args = common.parse_args(NAME, __doc__, extra, argv)
  results = run(args.preset, args.remat)
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "jax.jit(train_step).lower(abstract state, batch) then .compile(); "
      "lower_s includes tracing; the minimum over round-robin rounds",
      "every (kind, depth) is a new shape: nothing comes from a cache",
    ],
  )


def targets(comp: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of these results (`benchmarks.report`)."""
  rows = []
  for kind in sorted({r["kind"] for r in comp["rows"]}):
    at = [r for r in comp["rows"] if r["kind"] == kind]
    deep = at[-1]
    rows.append(
      [
        f"compile time at L={deep['num_layers']} <= 1.5x L={at[0]['num_layers']} ({kind})",
        f"{deep['total_vs_shallowest']:.2f}x",
        common.yes(deep["total_vs_shallowest"] <= 1.5),
      ]
    )
  return rows


def markdown(cp: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  rows = [
    [
      x["kind"],
      x["num_layers"],
      x["lower_s"],
      x["compile_s"],
      x["total_s"],
      f"{x['total_vs_shallowest']:.2f}x",
    ]
    for x in cp["rows"]
  ]
  return (
    f"## 5. Compile time vs depth (`bench_compile`, d={cp['rows'][0]['d_model']}, "
    f"remat={cp['rows'][0]['remat']})\n\n"
    + common.md_table(
      ["model", "L", "trace+lower s", "XLA compile s", "total s", "vs shallowest"], rows
    )
  )


if __name__ == "__main__":
  main()
