"""Packed ternary inference: weight bytes and batch-1 decode tokens/s for BitLinear weights
stored as 2-bit (4/byte) or base-3 (5/byte) packed codes (read by table lookup, by unpacking,
or as bit planes by popcount), int8 codes, bf16 or fp32 codes
(`packed_model.export_packed`), and the latent-weight model as `generate` runs it
(`infer.prepare_for_decoding` once per loop: per-layer fp32 weights quantized once, then
`mmfree_jax.decode` steps); against the memory-bandwidth bound
`copy GB/s / bytes read per token` with the copy bandwidth measured in this run.

    python -m benchmarks.bench_packed [--preset toy|cpu|accel]

Every variant uses int8 activation codes and gives bit-identical logits (exact integer
accumulation); the benchmark checks that on the first decoded tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mmfree_jax
from benchmarks import common, setups
from benchmarks.bench_decode import model_decode_loop, packed_decode_loop
from mmfree_jax.nn import packed as packed_model

NAME = "bench_packed"

SHAPE = {"toy": (64, 2, 256), "cpu": (1024, 4, 32000), "accel": (2048, 24, 32000)}
STEPS = {"toy": 2, "cpu": 8, "accel": 32}
ROUNDS = {"toy": 2, "cpu": 3, "accel": 5}
# name -> (format, matvec method); None = the latent-weight model
VARIANTS = {
  "latent_fp32 (as generate: frozen once)": None,
  "float32": ("float32", "lut"),
  "bfloat16": ("bfloat16", "lut"),
  "int8": ("int8", "lut"),
  "2bit_popcount": ("2bit", "popcount"),
  "2bit_lut": ("2bit", "lut"),
  "2bit_unpack": ("2bit", "unpack"),
  "base3_lut": ("base3", "lut"),
  "base3_unpack": ("base3", "unpack"),
}

TOY_VARIANTS = (
  "latent_fp32 (as generate: frozen once)",
  "float32",
  "2bit_popcount",
  "2bit_lut",
  "base3_unpack",
)


def run(preset: str) -> dict:
  d, num_layers, vocab = SHAPE[preset]
  steps = STEPS[preset]
  cfg = setups.model_config("mmfree", d, num_layers, vocab)
  model = mmfree_jax.build_model(cfg, 0)
  params_tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  n_bitlinear = int(
    sum(
      np.prod(x.shape)
      for path, x in jax.tree_util.tree_leaves_with_path(params_tree)
      if getattr(path[-1], "key", None) == "kernel"
    )
  )
  tokens = jnp.zeros((1, 1), jnp.int32)
  fns, info, first = {}, {}, {}
  variants = VARIANTS if preset != "toy" else {k: VARIANTS[k] for k in TOY_VARIANTS}
  for name, variant in variants.items():
    if variant is None:
      loop, params = model_decode_loop(model, steps, freeze=True)
      state = model.init_state(1)
      weight_bytes = code_bytes = 4 * n_bitlinear
    else:
      params, spec = packed_model.export_packed(model, *variant)
      loop = packed_decode_loop(spec, steps)
      state = packed_model.init_state(spec, 1)
      weight_bytes = packed_model.bitlinear_weight_bytes(params)
      code_bytes = packed_model.bitlinear_weight_bytes(params, include_scales=False)
    compiled = loop.lower(params, tokens, state).compile()
    fns[name] = functools.partial(compiled, params, tokens, state)
    first[name] = np.asarray(fns[name]()[0])
    # bytes a decode step must read: BitLinear weights, one embedding row, norms, state
    other = d * 4 + (6 * num_layers + 2) * d * 4 + 2 * num_layers * d * 4
    info[name] = {
      "weight_bytes": weight_bytes,
      "bytes_per_token": weight_bytes + other,
      "bits_per_weight": 8.0 * code_bytes / n_bitlinear,
      "bits_per_weight_with_scales": 8.0 * weight_bytes / n_bitlinear,
    }
  copy, copy_bytes = common.copy_probe({"toy": 16, "cpu": 256, "accel": 2048}[preset])
  times = common.interleaved_times({**fns, "_copy": copy}, ROUNDS[preset], warmup=0)
  bw = {"gb_per_s": copy_bytes / times.pop("_copy")["median_s"] / 1e9}  # same rounds
  ref = first["float32"]
  rows = []
  base = times["float32"]["median_s"]
  for name, t in times.items():
    tok_s = steps / t["median_s"]
    bound = bw["gb_per_s"] * 1e9 / info[name]["bytes_per_token"]
    row = {
      "variant": name,
      **info[name],
      "tokens_per_s": tok_s,
      "ms_per_token": 1e3 * t["median_s"] / steps,
      "bandwidth_bound_tokens_per_s": bound,
      "fraction_of_bound": tok_s / bound,
      "speedup_vs_float32_codes": base / t["median_s"],
      "same_tokens_as_float32": bool(np.array_equal(first[name], ref)),
    }
    rows.append(row)
    print(
      f"{name:28s} {row['bits_per_weight']:5.2f} bit/w  "
      f"{common.fmt_bytes(row['weight_bytes']):>10s}  {tok_s:8.1f} tok/s  "
      f"bound {bound:8.1f}  x{row['speedup_vs_float32_codes']:.2f} vs fp32 codes",
      flush=True,
    )
  return {
    "d_model": d,
    "num_layers": num_layers,
    "vocab": vocab,
    "bitlinear_params": n_bitlinear,
    "copy_gb_per_s": bw["gb_per_s"],
    "rows": rows,
  }


def main(argv=None):
  args = common.parse_args(NAME, __doc__, None, argv)
  results = run(args.preset)
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "batch 1, jitted fori_loop of greedy steps, params through an optimization barrier per step",
      "bytes/token = BitLinear weights (+scales) + one embedding row + norm "
      "scales + state; bound = copy GB/s (an in-place copy timed in the same "
      "rounds) / bytes per token",
      "popcount (the default): codes held as +1/-1 bit planes (2 bits/weight; "
      "base-3 loads into the same planes), AND + popcount against the int8 "
      "activations' 8 bit planes; lut: per-group table of partial sums indexed "
      "by each packed byte; unpack: codes unpacked to int8 then an "
      "int32-accumulating dot",
    ],
  )


def targets(pk: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of these results (`benchmarks.report`)."""
  packed = [r for r in pk["rows"] if r["variant"].startswith(("2bit", "base3"))]
  best = max(packed, key=lambda r: r["tokens_per_s"])
  latent = [r for r in pk["rows"] if r["variant"].startswith("latent")][0]["tokens_per_s"]
  return [
    [
      "packed weights <= 2 bits/weight",
      ", ".join(
        f"{r['variant']}: {r['bits_per_weight']:.2f}"
        for r in packed
        if r["variant"].endswith("lut")
      ),
      common.yes(all(r["bits_per_weight"] <= 2.0 for r in packed)),
    ],
    [
      f"packed batch-1 decode >= 3x the fp32-codes path at d={pk['d_model']} "
      f"(best: {best['variant']})",
      f"{best['speedup_vs_float32_codes']:.2f}x fp32 codes, "
      f"{best['tokens_per_s'] / latent:.1f}x the latent-fp32 model",
      common.yes(best["speedup_vs_float32_codes"] >= 3),
    ],
  ]


def markdown(pk: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  rows = [
    [
      x["variant"],
      f"{x['bits_per_weight']:.2f}",
      common.fmt_bytes(x["weight_bytes"]),
      x["tokens_per_s"],
      x["bandwidth_bound_tokens_per_s"],
      f"{x['fraction_of_bound']:.1%}",
      f"{x['speedup_vs_float32_codes']:.2f}x",
      "yes" if x["same_tokens_as_float32"] else "NO",
    ]
    for x in pk["rows"]
  ]
  return (
    f"## 7. Packed ternary decode, batch 1 (`bench_packed`, d={pk['d_model']}, "
    f"L={pk['num_layers']}, vocab {pk['vocab']}, {pk['bitlinear_params']:,} BitLinear "
    f"weights; copy bandwidth {pk['copy_gb_per_s']:.1f} GB/s)\n\n"
    + common.md_table(
      [
        "weights",
        "bits/weight",
        "weight bytes",
        "tokens/s",
        "bandwidth bound tokens/s",
        "of bound",
        "vs fp32 codes",
        "same tokens",
      ],
      rows,
    )
  )


if __name__ == "__main__":
  main()
