"""Peak training memory from XLA's compiled memory analysis (nothing is executed):
MatMul-free with the plain autodiff BitLinear vs the memory-lean BitLinear
(`model.bitlinear_impl='lean'`), and vs Transformer++ at equal d/L, with and without remat.

    python -m benchmarks.bench_memory [--preset toy|cpu|accel]

Also a BitLinear-only case: a stack of BitLinears (scan over layers, no other layers), which
isolates what each BitLinear implementation keeps for the backward pass.

Compilation only needs shapes, so the CPU preset analyses the 370M shape (d=1024, L=24,
vocab 32000) at T=2048 on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import common, setups
from mmfree_jax import registry
from mmfree_jax.kernels import dispatch
from mmfree_jax.ops import bitlinear as bitlinear_lean

NAME = "bench_memory"

# (d_model, num_layers, vocab, batch, seq)
SHAPES = {
  "toy": [(64, 2, 256, 2, 64)],
  "cpu": [(1024, 24, 32000, 4, 2048)],
  "accel": [(1024, 24, 32000, 16, 2048), (2048, 24, 32000, 8, 2048)],
}
REMATS = {"toy": ["none"], "cpu": ["none", "dots_no_batch"], "accel": ["none", "dots_no_batch"]}
VARIANTS = {
  "mmfree_autodiff": ("mmfree", {"bitlinear_impl": "autodiff"}),
  "mmfree_lean": ("mmfree", {"bitlinear_impl": "lean"}),
  "transformer": ("transformer", {}),
}
TOY_VARIANTS = ("mmfree_autodiff", "mmfree_lean")  # the smoke test keeps compiles few
# BitLinear stack: (tokens, d, layers)
STACK = {"toy": (256, 64, 2), "cpu": (8192, 1024, 8), "accel": (32768, 2048, 8)}


def bitlinear_stack_memory(tokens: int, d: int, layers: int, impl: str) -> dict:
  """Compiled memory of grad(sum(y^2)) for `layers` BitLinears d->d applied in a scan."""
  fn = bitlinear_lean.get_bitlinear(impl)

  def loss(x, kernels, gammas):
    def body(x, kg):
      return fn(x, kg[0], kg[1]), None

    y, _ = jax.lax.scan(body, x, (kernels, gammas))
    return jnp.sum(jnp.square(y))

  args = (
    jax.ShapeDtypeStruct((tokens, d), jnp.float32),
    jax.ShapeDtypeStruct((layers, d, d), jnp.float32),
    jax.ShapeDtypeStruct((layers, d), jnp.float32),
  )
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  return common.memory_stats(compiled)


def run(preset: str, dtype: str = "float32") -> dict:
  rows = []
  for d, num_layers, vocab, batch, seq in SHAPES[preset]:
    for remat in REMATS[preset]:
      stats = {}
      variants = VARIANTS if preset != "toy" else {k: VARIANTS[k] for k in TOY_VARIANTS}
      for name, (kind, overrides) in variants.items():
        cfg = setups.model_config(kind, d, num_layers, vocab, remat=remat, dtype=dtype, **overrides)
        compiled, _, compile_s = setups.compile_step(setups.train_setup(cfg), batch, seq)
        stats[name] = common.memory_stats(compiled)
        stats[name]["compile_s"] = compile_s
      base = stats["mmfree_autodiff"]
      for name, s in stats.items():
        row = {
          "variant": name,
          "d_model": d,
          "num_layers": num_layers,
          "vocab": vocab,
          "batch": batch,
          "seq_len": seq,
          "remat": remat,
          "dtype": dtype,
          **s,
          "peak_vs_autodiff": s["peak_bytes"] / base["peak_bytes"],
          "temp_vs_autodiff": s["temp_bytes"] / base["temp_bytes"],
        }
        rows.append(row)
        print(
          f"d={d} L={num_layers} B={batch} T={seq} remat={remat:13s} {name:16s} peak "
          f"{common.fmt_bytes(s['peak_bytes']):>10s} temp "
          f"{common.fmt_bytes(s['temp_bytes']):>10s}"
          f"  ({row['peak_vs_autodiff']:.2f}x autodiff)",
          flush=True,
        )
  tokens, d, layers = STACK[preset]
  stack = {
    impl: bitlinear_stack_memory(tokens, d, layers, impl)
    for impl in registry.native_bitlinear_impls(dispatch.default_platform())
  }
  stack_summary = {
    "tokens": tokens,
    "d": d,
    "layers": layers,
    "stats": stack,
    "temp_lean_over_autodiff": stack["lean"]["temp_bytes"] / stack["autodiff"]["temp_bytes"],
    "peak_lean_over_autodiff": stack["lean"]["peak_bytes"] / stack["autodiff"]["peak_bytes"],
  }
  print(
    f"BitLinear stack N={tokens} d={d} x{layers}: temp autodiff "
    f"{common.fmt_bytes(stack['autodiff']['temp_bytes'])}, lean "
    f"{common.fmt_bytes(stack['lean']['temp_bytes'])}"
  )
  return {"rows": rows, "bitlinear_stack": stack_summary}


def main(argv=None):
  def extra(p):
    p.add_argument("--dtype", default="float32")

  args = common.parse_args(NAME, __doc__, extra, argv)
  results = run(args.preset, args.dtype)
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "jax.jit(train_step).lower(...).compile().memory_analysis(); nothing runs",
      "peak = arguments + outputs + temporaries - aliased (donated state)",
      "temp = activations kept for backward + scratch (params/optimizer state are arguments)",
    ],
  )


def targets(mem: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of these results (`benchmarks.report`)."""
  rows = []
  for r in mem["rows"]:
    if r["variant"] == "mmfree_lean":
      red = 1 - r["peak_vs_autodiff"]
      rows.append(
        [
          f"lean BitLinear >= 40% lower peak train memory than autodiff "
          f"(d={r['d_model']}, L={r['num_layers']}, B={r['batch']}, T={r['seq_len']}, "
          f"remat={r['remat']})",
          f"{red:.0%} lower peak ({1 - r['temp_vs_autodiff']:.0%} lower temporaries)",
          common.yes(red >= 0.4),
        ]
      )
  st = mem["bitlinear_stack"]
  rows.append(
    [
      f"  (BitLinear-only stack, N={st['tokens']}, d={st['d']}, {st['layers']} layers)",
      f"{1 - st['peak_lean_over_autodiff']:.0%} lower peak "
      f"({1 - st['temp_lean_over_autodiff']:.0%} lower temporaries)",
      common.yes(1 - st["peak_lean_over_autodiff"] >= 0.4),
    ]
  )
  return rows


def markdown(m: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  mib = lambda b: b / 2**20
  rows = [
    [
      x["d_model"],
      x["num_layers"],
      x["batch"],
      x["seq_len"],
      x["remat"],
      x["variant"],
      f"{mib(x['peak_bytes']):,.0f}",
      f"{mib(x['temp_bytes']):,.0f}",
      f"{mib(x['argument_bytes']):,.0f}",
      f"{x['peak_vs_autodiff']:.2f}",
    ]
    for x in m["rows"]
  ]
  st = m["bitlinear_stack"]
  return (
    "## 4. Peak training memory, XLA compiled memory analysis (`bench_memory`)\n\n"
    + common.md_table(
      [
        "d",
        "L",
        "B",
        "T",
        "remat",
        "variant",
        "peak MiB",
        "temp MiB",
        "args MiB",
        "peak / autodiff",
      ],
      rows,
    )
    + f"\n\nBitLinear-only stack (N={st['tokens']}, d={st['d']}, {st['layers']} layers): "
    f"temp autodiff {mib(st['stats']['autodiff']['temp_bytes']):.1f} MiB, lean "
    f"{mib(st['stats']['lean']['temp_bytes']):.1f} MiB "
    f"({st['temp_lean_over_autodiff']:.2f}x)"
  )


if __name__ == "__main__":
  main()
