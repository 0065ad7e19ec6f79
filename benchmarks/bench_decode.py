"""Decode throughput and memory vs context length: MatMul-free (constant recurrent state) vs
Transformer++ (KV cache), batch 1 by default.

    python -m benchmarks.bench_decode [--preset toy|cpu|accel]

Each variant is `model.init_state` + `mmfree_jax.decode` in a jitted `lax.fori_loop` of
`steps` greedy decode steps (one dispatch per loop). The Transformer++ cache is made for
`context + steps` positions with `index = context`, i.e. as after a prefill of `context`
tokens (the step's cost does not depend on the cached values, and a 32k-token prefill is not
what is measured). The MatMul-free state is the same size at any context (the compiled loop
is the same program); it is timed at each context anyway.

Both models run as `generate` runs them: their weights frozen once per loop
(`infer.prepare_for_decoding`: one block per layer, so steps do not slice the stacked
weights; the MatMul-free BitLinears also quantize their weights there, once, instead of at
every token),
and the Transformer++ cache donated and carried from call to call, so the loop updates it in
place. Its row
records `cache_moves_in_hlo`: copies and transposes of a cache-sized array in the optimized
HLO of the loop (0 = every step reads the cache where it lies and writes one position).

Also `mmfree_exported`: the same MatMul-free model exported once with
`packed_model.export_packed(fmt='float32')` (ternary codes as fp32 + one scale per matrix),
the inference form that does not re-quantize the latent weights at every token, and
`mmfree_packed`: the same export at 2 bits per weight (`fmt='2bit'`, lookup-table matvec).

The (frozen) parameters pass through `lax.optimization_barrier` at every step so that XLA
cannot hoist per-token work out of the loop: every step pays for what a step of `generate`
pays for. The MatMul-free row's own bound reads its latent-sized weights (fp32) and state
once per token at the copy bandwidth timed in the same rounds.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mmfree_jax
from benchmarks import common, setups
from mmfree_jax.infer import prepare_for_decoding
from mmfree_jax.nn import packed as packed_model

NAME = "bench_decode"

CONTEXTS = {
  "toy": [64, 256],
  "cpu": [1024, 2048, 4096, 8192, 16384, 32768],
  "accel": [1024, 4096, 16384, 32768, 131072],
}
SHAPE = {"toy": (64, 2, 256), "cpu": (256, 4, 4096), "accel": (1024, 24, 32000)}
STEPS = {"toy": 4, "cpu": 16, "accel": 64}
ROUNDS = {"toy": 2, "cpu": 3, "accel": 5}


def _tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def model_decode_loop(model, steps: int, *, freeze: bool = False, donate_state: bool = False):
  """`loop(params, tokens [B,1], state) -> (tokens, state)`: `steps` greedy decode steps.

  freeze: prepare the model for decoding (`infer.prepare_for_decoding`: its plan's weights
  once per loop, before the steps), as `generate` does. donate_state: the state argument is
  donated (updated in place; pass the returned state to the next call).
  """
  graphdef, params = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(2,) if donate_state else ())
  def loop(params, tokens, state):
    model = nnx.merge(graphdef, params)
    if freeze:
      model = prepare_for_decoding(model)
    step_graphdef, step_params = nnx.split(model)

    def body(_, carry):
      tokens, state, params = carry
      params = jax.lax.optimization_barrier(params)
      logits, state = mmfree_jax.decode(nnx.merge(step_graphdef, params), tokens, state)
      tokens = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
      return tokens, state, params

    tokens, state, _ = jax.lax.fori_loop(0, steps, body, (tokens, state, step_params))
    return tokens, state

  return loop, params


def cache_moves(hlo_text: str, max_len: int) -> list[str]:
  """The copy and transpose instructions of an optimized HLO whose result has a `max_len`
  axis: what a decode step spends moving (rather than reading) its KV cache."""
  return [
    line.strip()
    for line in hlo_text.splitlines()
    if re.search(r"= \S+ (copy|transpose)\(", line)
    and re.search(rf"[\[,]{max_len}[\],]", line.split("(")[0])
  ]


def carried(compiled, params, tokens, state, context: int):
  """A thunk that runs a donating loop and keeps its returned state for the next call, with
  `index` reset to `context` (each call times the same positions)."""
  box = [state]

  def run():
    out = compiled(params, tokens, box[0])
    box[0] = out[1]._replace(index=jnp.asarray(context, jnp.int32))
    return out

  return run


def packed_decode_loop(spec, steps: int):
  step = functools.partial(packed_model.decode, spec=spec)

  @jax.jit
  def loop(params, tokens, state):
    def body(_, carry):
      tokens, state, params = carry
      params = jax.lax.optimization_barrier(params)
      logits, state = step(params, tokens, state)
      tokens = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
      return tokens, state, params

    tokens, state, _ = jax.lax.fori_loop(0, steps, body, (tokens, state, params))
    return tokens, state

  return loop


def _context_rows(
  times: dict,
  mems: dict,
  context: int,
  batch: int,
  steps: int,
  tf_bound: float,
  mm_bound: float,
  cache_moves_in_hlo: int,
) -> list[dict]:
  """One result row per variant at one context (printed as it is made).

  times: `common.interleaved_times` by variant; mems: (memory stats, state bytes) by variant;
  tf_bound / mm_bound: the Transformer++'s / latent MatMul-free step's bandwidth-bound
  tokens/s.
  """
  rows = []
  tf_tok_s = batch * steps / times["transformer"]["median_s"]
  for name, t in times.items():
    tok_s = batch * steps / t["median_s"]
    mem, state_bytes = mems[name]
    rows.append(
      {
        "variant": name,
        "context": context,
        "batch": batch,
        "steps": steps,
        "tokens_per_s": tok_s,
        "ms_per_token": 1e3 * t["median_s"] / steps,
        "state_bytes": state_bytes,
        "peak_bytes": mem.get("peak_bytes"),
        "temp_bytes": mem.get("temp_bytes"),
        "speedup_vs_transformer": tok_s / tf_tok_s,
        "transformer_bandwidth_bound_tokens_per_s": tf_bound,
        "speedup_vs_transformer_bound": tok_s / tf_bound,
        **(
          {"own_bound_tokens_per_s": mm_bound, "fraction_of_own_bound": tok_s / mm_bound}
          if name == "mmfree"
          else {}
        ),
        **({"cache_moves_in_hlo": cache_moves_in_hlo} if name == "transformer" else {}),
      }
    )
    print(
      f"ctx={context:6d} {name:16s} {tok_s:9.1f} tok/s  state "
      f"{common.fmt_bytes(state_bytes):>10s}  peak "
      f"{common.fmt_bytes(mem.get('peak_bytes', 0)):>10s}"
      f"  x{tok_s / tf_tok_s:.2f}",
      flush=True,
    )
  return rows


def run(preset: str, batch: int = 1, contexts: list[int] | None = None) -> dict:
  d, num_layers, vocab = SHAPE[preset]
  steps = STEPS[preset]
  tokens = jnp.zeros((batch, 1), jnp.int32)
  mm_cfg = setups.model_config("mmfree", d, num_layers, vocab)
  tf_cfg = setups.model_config("transformer", d, num_layers, vocab)
  mm_model = mmfree_jax.build_model(mm_cfg, 0)
  tf_model = mmfree_jax.build_model(tf_cfg, 0)
  mm_loop, mm_params = model_decode_loop(mm_model, steps, freeze=True)  # as generate runs it
  tf_loop, tf_params = model_decode_loop(tf_model, steps, freeze=True, donate_state=True)
  ex_params, ex_spec = packed_model.export_packed(mm_model, "float32")
  ex_loop = packed_decode_loop(ex_spec, steps)
  pk_params, pk_spec = packed_model.export_packed(mm_model, "2bit")  # the default method
  pk_loop = packed_decode_loop(pk_spec, steps)

  mm_state = mm_model.init_state(batch)
  ex_state = packed_model.init_state(ex_spec, batch)
  mm_compiled = mm_loop.lower(mm_params, tokens, mm_state).compile()
  ex_compiled = ex_loop.lower(ex_params, tokens, ex_state).compile()
  pk_compiled = pk_loop.lower(pk_params, tokens, ex_state).compile()
  copy, copy_bytes = common.copy_probe({"toy": 16, "cpu": 256, "accel": 2048}[preset])
  bws = []
  tf_weight_bytes = _tree_bytes(nnx.state(tf_model, nnx.Param))
  mm_weight_bytes = _tree_bytes(nnx.state(mm_model, nnx.Param))
  rows = []
  for context in contexts or CONTEXTS[preset]:
    tf_state = tf_model.init_state(batch, context + steps)
    tf_state = tf_state._replace(index=jnp.asarray(context, jnp.int32))
    tf_compiled = tf_loop.lower(tf_params, tokens, tf_state).compile()
    tf_moves = cache_moves(tf_compiled.as_text(), context + steps)
    state_bytes = _tree_bytes(tf_state)
    fns = {
      "mmfree": functools.partial(mm_compiled, mm_params, tokens, mm_state),
      "mmfree_exported": functools.partial(ex_compiled, ex_params, tokens, ex_state),
      "mmfree_packed": functools.partial(pk_compiled, pk_params, tokens, ex_state),
      "transformer": carried(tf_compiled, tf_params, tokens, tf_state, context),
    }
    mems = {
      "mmfree": (common.memory_stats(mm_compiled), _tree_bytes(mm_state)),
      "mmfree_exported": (common.memory_stats(ex_compiled), _tree_bytes(ex_state)),
      "mmfree_packed": (common.memory_stats(pk_compiled), _tree_bytes(ex_state)),
      "transformer": (common.memory_stats(tf_compiled), state_bytes),
    }
    times = common.interleaved_times({**fns, "_copy": copy}, ROUNDS[preset], warmup=1)
    bw = {"gb_per_s": copy_bytes / times.pop("_copy")["median_s"] / 1e9}  # same rounds
    bws.append(bw["gb_per_s"])
    # What an ideal KV-cache decode could reach: every step reads the weights and the cache
    # filled so far (bytes at the measured copy bandwidth), nothing else.
    kv_bytes = state_bytes * context / (context + steps)
    tf_bound = bw["gb_per_s"] * 1e9 / (tf_weight_bytes + kv_bytes)
    # The latent MatMul-free step's own ideal: read its latent weights and state once.
    mm_bound = bw["gb_per_s"] * 1e9 / (mm_weight_bytes + _tree_bytes(mm_state))
    rows += _context_rows(times, mems, context, batch, steps, tf_bound, mm_bound, len(tf_moves))
    del tf_state, tf_compiled, fns
  return {
    "d_model": d,
    "num_layers": num_layers,
    "vocab": vocab,
    "rows": rows,
    "copy_gb_per_s": float(np.median(bws)),
  }


def main(argv=None):
  def extra(p):
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--contexts", default="", help="comma-separated (default: the preset's)")

  args = common.parse_args(NAME, __doc__, extra, argv)
  contexts = [int(c) for c in args.contexts.split(",") if c]
  results = run(args.preset, args.batch, contexts or None)
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "jitted fori_loop of greedy decode steps; params through an optimization "
      "barrier per step (no hoisting of per-token weight work)",
      "Transformer++ cache sized context+steps with index=context (no prefill); "
      "weights frozen once per loop (per-layer blocks) and the cache donated and "
      "carried between calls, as in generate; cache_moves_in_hlo = copies and "
      "transposes of cache-sized arrays in its optimized HLO",
      "peak = XLA compiled memory of the decode loop (params + state + temps)",
      "transformer bound = copy GB/s (timed in the same rounds) / (weight bytes "
      "+ filled KV bytes): an ideal KV-cache step; speedup_vs_transformer_bound "
      "compares against it",
    ],
  )


def targets(dec: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of these results (`benchmarks.report`)."""
  rows = []
  for variant in ("mmfree", "mmfree_exported", "mmfree_packed"):
    at = [r for r in dec["rows"] if r["variant"] == variant]
    if not at:
      continue
    peaks = [r["peak_bytes"] for r in at]
    flat = max(peaks) == min(peaks) and len({r["state_bytes"] for r in at}) == 1
    rows.append(
      [
        f"decode memory flat in context ({variant}, {at[0]['context']}..{at[-1]['context']})",
        f"state {common.fmt_bytes(at[0]['state_bytes'])}, peak "
        f"{common.fmt_bytes(min(peaks))}..{common.fmt_bytes(max(peaks))}",
        common.yes(flat),
      ]
    )
    ctx16 = [r for r in at if r["context"] == 16384]
    if ctx16:
      s = ctx16[0]["speedup_vs_transformer"]
      b = ctx16[0]["speedup_vs_transformer_bound"]
      rows.append(
        [
          f"decode >= 5x Transformer++ tokens/s at 16k context ({variant})",
          f"{s:.1f}x measured ({b:.1f}x an ideal bandwidth-bound KV-cache decode)",
          common.yes(s >= 5),
        ]
      )
  own = [r for r in dec["rows"] if "fraction_of_own_bound" in r]
  if own:
    low = min(r["fraction_of_own_bound"] for r in own)
    rows.append(
      [
        "MatMul-free latent-model decode >= 0.7x its own bandwidth bound at every "
        "context (weights quantized once, as generate runs it)",
        f"{low:.2f}x..{max(r['fraction_of_own_bound'] for r in own):.2f}x "
        f"({own[0]['context']}..{own[-1]['context']})",
        common.yes(low >= 0.7),
      ]
    )
  tf16 = [r for r in dec["rows"] if r["variant"] == "transformer" and r["context"] == 16384]
  if tf16:
    b = tf16[0]["speedup_vs_transformer_bound"]
    moves = tf16[0].get("cache_moves_in_hlo")
    rows.append(
      [
        "Transformer++ decode at 16k context >= 0.7x its ideal bandwidth bound",
        f"{b:.2f}x"
        + ("" if moves is None else f" ({moves} cache copies/transposes in its optimized HLO)"),
        common.yes(b >= 0.7),
      ]
    )
  return rows


def markdown(d: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  rows = [
    [
      x["context"],
      x["variant"],
      x["tokens_per_s"],
      x["ms_per_token"],
      common.fmt_bytes(x["state_bytes"]),
      common.fmt_bytes(x["peak_bytes"] or 0),
      f"{x['speedup_vs_transformer']:.2f}x",
      f"{x['speedup_vs_transformer_bound']:.2f}x",
    ]
    for x in d["rows"]
  ]
  footer = (
    f"ideal KV-cache bound: copy bandwidth {d['copy_gb_per_s']:.1f} GB/s / "
    "(Transformer++ weight bytes + filled cache bytes) per token"
  )
  moves = [x["cache_moves_in_hlo"] for x in d["rows"] if "cache_moves_in_hlo" in x]
  if moves:
    footer += (
      "; copies/transposes of a cache-sized array in the optimized HLO of the "
      f"Transformer++ decode loop, per context: {', '.join(map(str, moves))}"
    )
  return (
    f"## 6. Decode vs context (`bench_decode`, d={d['d_model']}, L={d['num_layers']}, "
    f"vocab {d['vocab']}, batch {d['rows'][0]['batch']})\n\n"
    + common.md_table(
      [
        "context",
        "variant",
        "tokens/s",
        "ms/token",
        "state",
        "compiled peak",
        "vs Transformer++ (measured)",
        "vs ideal KV-cache bound",
      ],
      rows,
    )
    + "\n\n"
    + footer
  )


if __name__ == "__main__":
  main()
