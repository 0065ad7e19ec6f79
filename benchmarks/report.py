"""Builds `benchmarks/RESULTS.md` from the JSON files in `benchmarks/results/`.

    python -m benchmarks.report [--results_dir DIR] [--markdown PATH]

(`python -m benchmarks.run_all` runs every benchmark and then this.)
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks import common, report_accel

COMMAND = "python -m benchmarks.run_all"


def _load(results_dir: str) -> dict:
  out = {}
  if not os.path.isdir(results_dir):
    return out
  for name in sorted(os.listdir(results_dir)):
    if name.endswith(".json"):
      with open(os.path.join(results_dir, name)) as f:
        data = json.load(f)
      out[data["benchmark"]] = data
  return out


def _table(header: list[str], rows: list[list]) -> str:
  def cell(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def _mib(b):
  return None if b is None else b / 2**20


def _gflops(x):
  return x / 1e9


def _packed_name(r: dict) -> str:
  """A bench_inference packed27 entry as '<format>, <dtype> embedding[, <matvec method>]'."""
  method = f", {r['method']}" if "method" in r else ""
  return f"{r['format']}, {r['embedding_dtype']} embedding{method}"


def _yes(ok: bool | None) -> str:
  return "n/a" if ok is None else ("**yes**" if ok else "no")


def targets(res: dict) -> list[list]:
  rows = []
  tr = res.get("bench_train", {}).get("results")
  if tr:
    at = [r for r in tr["rows"] if r["seq_len"] == 2048 and r["variant"] != "transformer"]
    for r in at:
      rows.append([f"train tokens/s >= 1.2x Transformer++ at T=2048 ({r['variant']}, "
                   f"d={r['d_model']}, L={r['num_layers']})",
                   f"{r['speedup_vs_transformer']:.2f}x", _yes(r["speedup_vs_transformer"] >= 1.2)])
    big = [r for r in tr["rows"] if r["d_model"] >= 512 and r["variant"] != "transformer"]
    standalone = _standalone_peak(res, tr["peak_dtype"])
    for r in big:
      also = ""
      if standalone:
        also = (f" (vs the bench_peak peak {_gflops(standalone):.0f} GFLOP/s: "
                f"{r['mfu'] * r['peak_flops_per_s'] / standalone:.1%})")
      rows.append([f"MFU >= 50% of measured {tr['peak_dtype']} peak at d>=512 ({r['variant']}, "
                   f"d={r['d_model']}, T={r['seq_len']})",
                   f"{r['mfu']:.1%} vs the peak timed in the same rounds "
                   f"({_gflops(r['peak_flops_per_s']):.0f} GFLOP/s){also}", _yes(r["mfu"] >= 0.5)])
  mem = res.get("bench_memory", {}).get("results")
  if mem:
    for r in mem["rows"]:
      if r["variant"] == "mmfree_lean":
        red = 1 - r["peak_vs_autodiff"]
        rows.append([f"lean BitLinear >= 40% lower peak train memory than autodiff "
                     f"(d={r['d_model']}, L={r['num_layers']}, B={r['batch']}, T={r['seq_len']}, "
                     f"remat={r['remat']})",
                     f"{red:.0%} lower peak ({1 - r['temp_vs_autodiff']:.0%} lower temporaries)",
                     _yes(red >= 0.4)])
    st = mem["bitlinear_stack"]
    rows.append([f"  (BitLinear-only stack, N={st['tokens']}, d={st['d']}, {st['layers']} layers)",
                 f"{1 - st['peak_lean_over_autodiff']:.0%} lower peak "
                 f"({1 - st['temp_lean_over_autodiff']:.0%} lower temporaries)",
                 _yes(1 - st["peak_lean_over_autodiff"] >= 0.4)])
  comp = res.get("bench_compile", {}).get("results")
  if comp:
    for kind in sorted({r["kind"] for r in comp["rows"]}):
      at = [r for r in comp["rows"] if r["kind"] == kind]
      deep = at[-1]
      rows.append([f"compile time at L={deep['num_layers']} <= 1.5x L={at[0]['num_layers']} ({kind})",
                   f"{deep['total_vs_shallowest']:.2f}x", _yes(deep["total_vs_shallowest"] <= 1.5)])
  dec = res.get("bench_decode", {}).get("results")
  if dec:
    for variant in ("mmfree", "mmfree_exported", "mmfree_packed"):
      at = [r for r in dec["rows"] if r["variant"] == variant]
      if not at:
        continue
      peaks = [r["peak_bytes"] for r in at]
      flat = max(peaks) == min(peaks) and len({r["state_bytes"] for r in at}) == 1
      rows.append([f"decode memory flat in context ({variant}, {at[0]['context']}..{at[-1]['context']})",
                   f"state {common.fmt_bytes(at[0]['state_bytes'])}, peak "
                   f"{common.fmt_bytes(min(peaks))}..{common.fmt_bytes(max(peaks))}", _yes(flat)])
      ctx16 = [r for r in at if r["context"] == 16384]
      if ctx16:
        s = ctx16[0]["speedup_vs_transformer"]
        b = ctx16[0]["speedup_vs_transformer_bound"]
        rows.append([f"decode >= 5x Transformer++ tokens/s at 16k context ({variant})",
                     f"{s:.1f}x measured ({b:.1f}x an ideal bandwidth-bound KV-cache decode)",
                     _yes(s >= 5)])
    own = [r for r in dec["rows"] if "fraction_of_own_bound" in r]
    if own:
      low = min(r["fraction_of_own_bound"] for r in own)
      rows.append(["MatMul-free latent-model decode >= 0.7x its own bandwidth bound at every "
                   "context (weights quantized once, as generate runs it)",
                   f"{low:.2f}x..{max(r['fraction_of_own_bound'] for r in own):.2f}x "
                   f"({own[0]['context']}..{own[-1]['context']})", _yes(low >= 0.7)])
    tf16 = [r for r in dec["rows"] if r["variant"] == "transformer" and r["context"] == 16384]
    if tf16:
      b = tf16[0]["speedup_vs_transformer_bound"]
      moves = tf16[0].get("cache_moves_in_hlo")
      rows.append(["Transformer++ decode at 16k context >= 0.7x its ideal bandwidth bound",
                   f"{b:.2f}x" + ("" if moves is None else
                                  f" ({moves} cache copies/transposes in its optimized HLO)"),
                   _yes(b >= 0.7)])
  pk = res.get("bench_packed", {}).get("results")
  if pk:
    packed = [r for r in pk["rows"] if r["variant"].startswith(("2bit", "base3"))]
    best = max(packed, key=lambda r: r["tokens_per_s"])
    rows.append(["packed weights <= 2 bits/weight",
                 ", ".join(f"{r['variant']}: {r['bits_per_weight']:.2f}" for r in packed
                           if r["variant"].endswith("lut")),
                 _yes(all(r["bits_per_weight"] <= 2.0 for r in packed))])
    rows.append([f"packed batch-1 decode >= 3x the fp32-codes path at d={pk['d_model']} "
                 f"(best: {best['variant']})",
                 f"{best['speedup_vs_float32_codes']:.2f}x fp32 codes, "
                 f"{best['tokens_per_s'] / _latent(pk):.1f}x the latent-fp32 model",
                 _yes(best["speedup_vs_float32_codes"] >= 3)])
  dt = res.get("bench_data", {}).get("results")
  if dt:
    t = dt["targets"]
    rows.append(["prepared-shard loader (1 grain worker) >= 20x the tokens/s of a 370M train step "
                 "on this machine (seq 2048, batch 256; step = measured peak x best MFU, an upper "
                 "bound)", f"{t['loader_1_worker_over_370m_step']:,.0f}x", _yes(
                     t["loader_1_worker_over_370m_step"] >= 20)])
    best = max(dt["prepare"], key=lambda r: r["prepare_1proc_tokens_per_s"])
    rows.append(["`prepare` >= 1M tokens/s per process with a BPE tokenizer",
                 f"{best['prepare_1proc_tokens_per_s']:,.0f} tokens/s ({best['spec']}; encode "
                 f"alone {best['encode_tokens_per_s']:,.0f})",
                 _yes(best["prepare_1proc_tokens_per_s"] >= 1e6)])
  inf = res.get("bench_inference", {}).get("results") or {}
  for key, r in inf.get("packed27", {}).items():
    fmt = _packed_name(r)
    rows.append([f"packed 2.7B on disk <= 0.75 GB ({fmt})",
                 f"{r['file_bytes'] / 1e9:.3f} GB", _yes(r["file_bytes"] <= 0.75e9)])
    # sampled during the timed (second) call: no load or compiler peak in it
    steady = [run["rss_max_while_generating"] for run in r["runs"] if run["prompt_len"] == 1]
    prefill = [run for run in r["runs"] if run["prompt_len"] > 1]
    rows.append([f"packed 2.7B resident memory while generating <= 1.2 GB ({fmt})",
                 f"{max(steady) / 1e9:.2f} GB RSS decoding at batch 1 and 8 "
                 f"({(max(steady) - r['rss_before_load']) / 1e9:.2f} GB above the bare "
                 f"runtime's {r['rss_before_load'] / 1e9:.2f})" + "".join(
                     f"; {run['rss_max_while_generating'] / 1e9:.2f} GB with a "
                     f"{run['prompt_len']}-token prefill" for run in prefill)
                 + ("" if r.get("cuda_plugin_loaded", True) else
                    "; the README's install (with requirements-accel's CUDA plugin: +0.11)"),
                 _yes(max(steady) <= 1.2e9)])
  for r in inf.get("batched", {}).get("rows", []):
    rows.append([f"batched generation of 32 prompts >= 10x one at a time ({r['model']})",
                 f"{r['speedup']:.1f}x", _yes(r["speedup"] >= 10)])
  return rows


def _standalone_peak(res, dtype):
  p = res.get("bench_peak", {}).get("results")
  return p["matmul"][dtype]["flops_per_s"] if p and dtype in p["matmul"] else None


def _latent(pk):
  return [r for r in pk["rows"] if r["variant"].startswith("latent")][0]["tokens_per_s"]


def sections(res: dict) -> list[str]:
  out = []
  p = res.get("bench_peak", {}).get("results")
  if p:
    m = p["matmul"]
    out.append("## 1. Machine peaks (`bench_peak`)\n\n" + _table(
        ["quantity", "value"],
        [["fp32 matmul", f"{_gflops(m['float32']['flops_per_s']):.1f} GFLOP/s (n={m['float32']['best_n']})"],
         ["bf16 matmul", f"{_gflops(m['bfloat16']['flops_per_s']):.1f} GFLOP/s (n={m['bfloat16']['best_n']})"],
         ["copy bandwidth (in place, read+write)", f"{p['copy']['gb_per_s']:.1f} GB/s"],
         ["read bandwidth (max reduction)", f"{p['copy']['read_gb_per_s']:.1f} GB/s"]]))
  t = res.get("bench_train", {}).get("results")
  if t:
    rows = [[r["d_model"], r["num_layers"], r["seq_len"], r["batch"], r["variant"],
             r["tokens_per_s"], f"{r['mfu']:.1%}", f"{r['speedup_vs_transformer']:.2f}x",
             f"{r['compile_s']:.1f}", f"{_gflops(r['peak_flops_per_s']):.0f}"]
            for r in t["rows"]]
    out.append(f"## 2. Train step (`bench_train`, {t['dtype']}, remat={t['remat']}; MFU vs the "
               f"{t['peak_dtype']} matmul peak timed in the same rounds)\n\n"
               + _table(["d", "L", "T", "B", "variant", "tokens/s", "MFU", "vs Transformer++",
                         "compile s", "peak GFLOP/s"], rows))
  c = res.get("bench_components", {}).get("results")
  if c:
    sh, sm = c["shape"], c["summary"]
    rows = [[x["component"], x["ms"], x["count_mmfree"], x["count_transformer"]]
            for x in c["components"]]
    rows += [[k, v, "", ""] for k, v in sm["step_ms"].items()]
    rows += [[f"sum of counted components: {k}", v, "", ""] for k, v in sm["estimate_ms"].items()]
    out.append(f"### Train step by component (`bench_components`, d={sh['d_model']}, "
               f"L={sh['num_layers']}, T={sh['seq_len']}, B={sh['batch']}, vocab {sh['vocab']}; "
               "fwd+bwd ms, median of round-robin rounds)\n\n"
               + _table(["component", "ms", "x per mmfree step", "x per Transformer++ step"],
                        rows)
               + "\n\nstep time / Transformer++ step time: "
               + ", ".join(f"{k} {v:.2f}" for k, v in sm["over_transformer"].items()))
  r = res.get("bench_recurrence", {}).get("results")
  if r:
    seqs = sorted({x["seq_len"] for x in r["rows"]})
    types = list(dict.fromkeys(x["scan_type"] for x in r["rows"]))
    get = {(x["scan_type"], x["seq_len"]): x for x in r["rows"]}
    rows = [[st] + [f"{1e3 * get[(st, s)]['fwd_bwd_s']:.2f} ms / {_mib(get[(st, s)]['temp_bytes']):.1f} MiB"
                    for s in seqs] for st in types]
    x0 = r["rows"][0]
    out.append(f"## 3. Recurrence fwd+bwd time / compiled temp memory vs T (`bench_recurrence`, "
               f"batch {x0['batch']}, dim {x0['dim']}, chunk {r['chunk_size']})\n\n"
               + _table(["scan_type"] + [f"T={s}" for s in seqs], rows)
               + "\n\nfastest: " + ", ".join(f"T={k}: {v}" for k, v in r["fastest_by_seq_len"].items())
               + (f"\n\ntotal time over all T relative to the fastest: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["total_time_vs_best"].items())
                  + f". **Recommended default `scan_type` on {r['backend']}: "
                    f"`{r['recommended']}`** (least total time; within 5% of it, least memory)"
                  if "recommended" in r else ""))
  m = res.get("bench_memory", {}).get("results")
  if m:
    rows = [[x["d_model"], x["num_layers"], x["batch"], x["seq_len"], x["remat"], x["variant"],
             f"{_mib(x['peak_bytes']):,.0f}", f"{_mib(x['temp_bytes']):,.0f}",
             f"{_mib(x['argument_bytes']):,.0f}", f"{x['peak_vs_autodiff']:.2f}"] for x in m["rows"]]
    st = m["bitlinear_stack"]
    out.append("## 4. Peak training memory, XLA compiled memory analysis (`bench_memory`)\n\n"
               + _table(["d", "L", "B", "T", "remat", "variant", "peak MiB", "temp MiB",
                         "args MiB", "peak / autodiff"], rows)
               + f"\n\nBitLinear-only stack (N={st['tokens']}, d={st['d']}, {st['layers']} layers): "
                 f"temp autodiff {_mib(st['stats']['autodiff']['temp_bytes']):.1f} MiB, lean "
                 f"{_mib(st['stats']['lean']['temp_bytes']):.1f} MiB "
                 f"({st['temp_lean_over_autodiff']:.2f}x)")
  cp = res.get("bench_compile", {}).get("results")
  if cp:
    rows = [[x["kind"], x["num_layers"], x["lower_s"], x["compile_s"], x["total_s"],
             f"{x['total_vs_shallowest']:.2f}x"] for x in cp["rows"]]
    out.append(f"## 5. Compile time vs depth (`bench_compile`, d={cp['rows'][0]['d_model']}, "
               f"remat={cp['rows'][0]['remat']})\n\n"
               + _table(["model", "L", "trace+lower s", "XLA compile s", "total s",
                         "vs shallowest"], rows))
  d = res.get("bench_decode", {}).get("results")
  if d:
    rows = [[x["context"], x["variant"], x["tokens_per_s"], x["ms_per_token"],
             common.fmt_bytes(x["state_bytes"]), common.fmt_bytes(x["peak_bytes"] or 0),
             f"{x['speedup_vs_transformer']:.2f}x",
             f"{x['speedup_vs_transformer_bound']:.2f}x"] for x in d["rows"]]
    footer = (f"ideal KV-cache bound: copy bandwidth {d['copy_gb_per_s']:.1f} GB/s / "
              "(Transformer++ weight bytes + filled cache bytes) per token")
    moves = [x["cache_moves_in_hlo"] for x in d["rows"] if "cache_moves_in_hlo" in x]
    if moves:
      footer += ("; copies/transposes of a cache-sized array in the optimized HLO of the "
                 f"Transformer++ decode loop, per context: {', '.join(map(str, moves))}")
    out.append(f"## 6. Decode vs context (`bench_decode`, d={d['d_model']}, L={d['num_layers']}, "
               f"vocab {d['vocab']}, batch {d['rows'][0]['batch']})\n\n"
               + _table(["context", "variant", "tokens/s", "ms/token", "state", "compiled peak",
                         "vs Transformer++ (measured)", "vs ideal KV-cache bound"], rows)
               + "\n\n" + footer)
  pk = res.get("bench_packed", {}).get("results")
  if pk:
    rows = [[x["variant"], f"{x['bits_per_weight']:.2f}", common.fmt_bytes(x["weight_bytes"]),
             x["tokens_per_s"], x["bandwidth_bound_tokens_per_s"],
             f"{x['fraction_of_bound']:.1%}", f"{x['speedup_vs_float32_codes']:.2f}x",
             "yes" if x["same_tokens_as_float32"] else "NO"] for x in pk["rows"]]
    out.append(f"## 7. Packed ternary decode, batch 1 (`bench_packed`, d={pk['d_model']}, "
               f"L={pk['num_layers']}, vocab {pk['vocab']}, {pk['bitlinear_params']:,} BitLinear "
               f"weights; copy bandwidth {pk['copy_gb_per_s']:.1f} GB/s)\n\n"
               + _table(["weights", "bits/weight", "weight bytes", "tokens/s",
                         "bandwidth bound tokens/s", "of bound", "vs fp32 codes",
                         "same tokens"], rows))
  dt = res.get("bench_data", {}).get("results")
  if dt:
    prep_rows = [[r["spec"], r["vocab_size"], f"{r['tokens']:,}", f"{r['chars_per_token']:.2f}",
                  r["encode_tokens_per_s"], r["prepare_1proc_tokens_per_s"],
                  r.get("prepare_2proc_tokens_per_s", "")]
                 for r in dt["prepare"]]
    load_rows = [[r["shape"], r["seq_len"], r["batch"], r["workers"], r["tokens_per_s"],
                  r["step_tokens_per_s"], f"{r['loader_over_step']:,.1f}x",
                  f"{r['first_batch_s']:.2f}"] for r in dt["loader"]]
    big = dt["step_370m"]
    out.append(
        "## 8. Data: `prepare` and the prepared-shard loader (`bench_data`)\n\n"
        + _table(["tokenizer", "vocab", "tokens", "chars/token", "encode tokens/s (1 core)",
                  "prepare tokens/s (1 process)", "prepare tokens/s (2 processes)"], prep_rows)
        + "\n\n" + _table(["shape", "seq", "batch", "grain workers", "loader tokens/s",
                           "step consumes tokens/s", "loader / step", "first batch s"],
                          load_rows)
        + f"\n\nStep consumption: tiny (d=256, L=4) timed in the same run; 370M: "
          f"{_gflops(big['cpu_fp32_peak_flops_per_s']):.0f} GFLOP/s measured fp32 peak x MFU "
          f"{big['mfu']:.1%} ({big['mfu_source']}) / {big['flops_per_token'] / 1e9:.2f} GFLOP "
          f"per token = {big['cpu_tokens_per_s']:,.0f} tokens/s (an upper bound; not a timed "
          f"step). For scale: one H100 at 50% MFU would consume "
          f"{big['h100_tokens_per_s_at_50pct_mfu']:,.0f} tokens/s of a 370M step (arithmetic); "
          f"the 1-worker loader here is {dt['targets']['loader_1_worker_370m_over_h100_50pct']:.1f}x "
          "that.")
  return out


def _load_text(run: dict) -> str:
  """'name start→end', or each part's where a benchmark's parts ran separately."""
  name = run["benchmark"].replace("bench_", "")
  results = run.get("results")
  part_loads = results.get("part_loads") if isinstance(results, dict) else None
  if part_loads:
    return f"{name} (" + ", ".join(f"{part} {a}→{b}"
                                   for part, (a, b) in sorted(part_loads.items())) + ")"
  return (f"{name} {run['machine'].get('load_average_1m_start')}→"
          f"{run['machine'].get('load_average_1m_end')}")


def _inference_section(inf: dict | None) -> list[str]:
  """`bench_inference`: packed sizes (eval_shape), the 2.7B packed directory, batched generation."""
  if not inf:
    return []
  parts = []
  if "shapes" in inf:
    rows = [[r["size"], f"{r['params'] / 1e9:.2f}B", f"{r['latent_bf16_bytes'] / 1e9:.2f}",
             f"{r['2bit_bytes'] / 1e9:.3f}", f"{r['base3_bytes'] / 1e9:.3f}",
             f"{r['2bit_int8_embedding_bytes'] / 1e9:.3f}", f"{r['2bit_vs_bf16']:.1f}x",
             f"{r['2bit_embedding_share']:.0%}"]
            for r in inf["shapes"]["rows"]]
    parts.append(_table(["size", "params", "latent bf16 GB", "2bit GB", "base3 GB",
                         "2bit, int8 embedding GB", "bf16 / 2bit",
                         "embedding share of 2bit"], rows))
  if "packed27" in inf:
    # latent27 runs reset the peak after the model's (eager, random) init: generate's own peak
    row = lambda model, file_gb, loaded, run: [
        model, file_gb, f"{loaded / 1e9:.2f}", f"{run['rss_max_while_generating'] / 1e9:.2f}",
        f"{run.get('generate_peak_rss', run['peak_rss_bytes']) / 1e9:.2f}", run["batch"],
        run["prompt_len"], f"{run['tokens_per_s']:.3g}"]
    rows = [row(f"packed {_packed_name(r)}",
                f"{r['file_bytes'] / 1e9:.3f}", r["rss_after_load"], run)
            for r in inf["packed27"].values() for run in r["runs"]]
    lat = inf.get("latent27")
    if lat:
      rows += [row("latent bf16", "", lat["rss_after_build"], run) for run in lat["runs"]]
    parts.append(_table(["2.7B model", "file GB", "RSS after load GB",
                         "RSS while generating GB", "process peak RSS GB", "batch",
                         "prompt tokens", "tokens/s"], rows))
  if "batched" in inf:
    b = inf["batched"]
    rows = [[r["model"], r["tokens"], r["batched_tokens_per_s"], r["one_at_a_time_tokens_per_s"],
             f"{r['speedup']:.1f}x"] for r in b["rows"]]
    parts.append(f"{b['prompts']} prompts of {min(b['prompt_lengths'])}-"
                 f"{max(b['prompt_lengths'])} tokens, {b['max_new_tokens']} new tokens each "
                 f"(d={b['d_model']}, L={b['num_layers']}, vocab {b['vocab']}):\n\n"
                 + _table(["model", "tokens", "batched tokens/s", "one at a time tokens/s",
                           "speedup"], rows))
  return ["## 11. Packed inference (`bench_inference`)\n\n" + "\n\n".join(parts)]


NOTES = """## Notes on reading these numbers

- **MFU** counts 6N matmul FLOPs per token (+ causal attention for Transformer++) against a
  matmul peak timed round-robin with the train steps of each shape; `bench_peak` times the
  same matmul alone, and can come out higher (the targets table gives MFU against both).
- **Transformer++ training** uses plain softmax attention over the full `T x T` scores (no
  fused attention kernel on CPU); at T=2048 attention dominates its step.
- **Lean BitLinear memory**: at the model level (remat=none) most of what remains is the
  MLGRU/GLU element-wise intermediates that autodiff keeps around the BitLinears (sigmoid,
  SiLU, gate products), which no BitLinear implementation can drop; the BitLinear-only stack
  shows what the BitLinear itself keeps. With a remat policy (`dots_no_batch`) those are
  recomputed and both BitLinears need the same memory; lean is still the faster step.
- **Decode**: `vs ideal KV-cache bound` compares against a Transformer++ decode that only
  reads the weights and the filled cache once at the measured copy bandwidth (read+write bytes
  of an in-place `x + 1`; a read-only stream, a `max` or a matrix-vector product over 16 MiB,
  measured 0.3-0.9x of that rate on this shared machine). The latent-weight MatMul-free decode
  runs as `generate` runs it: `freeze_weights` slices the stacked blocks into per-layer blocks
  and quantizes every BitLinear's weights once, before the loop (before this round every token
  re-quantized all fp32 latent weights: 0.22x the fp32-codes export at d=1024, now 0.5x). Its
  own bound reads all its fp32 parameters and state once per token; at d=256 a step is ~60
  small ops whose per-op overhead on XLA:CPU, not bytes, sets the time (the fp32-codes export,
  same bytes, sits at the same fraction), and at d=1024 (section 7) the remaining gap to the
  fp32-codes export is in the non-matmul ops (the optimized HLO has no weight copy in the loop
  and the same dots), not diagnosed further.
- **Packed weights on XLA:CPU**: bf16 and int8 matrix-vector products have no fast kernels
  (slower than fp32 here), and element-wise unpacking to int8 costs more than the bytes it
  saves. Two packed forms beat fp32: the lookup table (one scalar gather per packed byte,
  groups summed by a dot with a ones vector) and, faster, bit planes (`popcount`, the default
  since this round): each matrix held as a +1 plane and a -1 plane, 32 inputs to a uint32
  word, and `x @ w` as sum over the int8 activations' 8 two's-complement bit planes of
  `c_b * (popcount(P & X_b) - popcount(N & X_b))`, which XLA:CPU fuses into one vectorized
  loop per block of output columns (this machine has AVX-512 VPOPCNTDQ). One CPU probe on the
  2.7B's gate_proj (2560 x 13824), 1 row: popcount 1.0 ms, base-3 LUT 2.1, 2-bit LUT 2.5,
  fp32 codes 5.9; at 8 rows 7-12 ms against 10 for 2-bit unpack-and-multiply (the old
  many-rows path); at 256 rows 1.1-1.7x slower than that (prefill), which the popcount path
  accepts to hold one form of the codes. Both remain compute-bound, well below the bandwidth
  bound; reaching it needs a fused kernel (Pallas/Triton on a GPU, or a hand-written CPU
  kernel as in bitnet.cpp / T-MAC).
- **Packed inference** (`bench_inference`): sizes come from `jax.eval_shape` of the export
  (nothing allocated; embedding in bf16 unless a column says int8, norms and scales fp32; the
  13B shape d=5120, L=40 is assumed). The 2.7B rows load a directory of random ternary codes
  written by `export.write_packed` and generate in a fresh process; RSS includes the JAX/XLA
  runtime and the compiler's peak; each (batch, prompt) runs in its own process, and "RSS
  while generating" is sampled during the timed second call. These rows ran in a venv made by
  the README's install command (requirements.txt + requirements-nodeps.txt), as a CPU user
  serves: `requirements-accel.txt`, which the test command adds, brings the CUDA plugin, and
  jax loads it into every process even under JAX_PLATFORMS=cpu, 0.11 GB more RSS (the same
  code in that venv, same session: 2bit 1.29, base3 1.17, 2bit + int8 embedding 1.21, base3 +
  int8 1.08 GB). 2-bit with a bf16 embedding at batch 1, 1.17 GB: imports 0.24 + CPU client
  and allocator ~0.04 + codes and embedding 0.82 + compiled program and jit caches ~0.07.
  Two changes of this round took ~0.07 GB each off every row: `generate` hands the heap the
  compiler freed back to the OS after a call that compiled (glibc `malloc_trim`; glibc kept it
  resident before, and its tunables did not help), and the packed loader and `generate` no
  longer import orbax, tensorstore or grain (0.30 -> 0.24 GB of imports in a probe). The
  bit-packed formats stack their
  layers and scan over them (the popcount and LUT products read a layer's codes in place), so
  the program holds one layer: compiling the 2.7B generate adds 41 MB of RSS, 316 MB with the layers unrolled.
  Loading hands 64-byte aligned arrays to `device_put(may_alias=True)`, which keeps them
  without a copy (load peak 1.59 -> 1.18 GB); with the default `popcount` method it converts
  the stored 2-bit or base-3 bytes to bit planes one layer at a time (load peak ~1.4 GB, the
  conversion's compiled programs included). Neither product pads the codes (a pad is a copy,
  which XLA:CPU ran for every layer up front: 0.65 GB of temporaries at batch 1); popcount
  goes over blocks of output columns at every row count (1 MiB of per-word sums per block),
  while the LUT past `LUT_MAX_ROWS` rows (2) unpacks 2 MiB blocks of columns and multiplies
  (base-3 bytes are now unpacked by a 256-entry table: 2.5x faster than the divisions by
  powers of 3, which had kept base-3 on the LUT to 16 rows; its load-time conversion to bit
  planes takes 2.9x less time). This round's popcount product made the 2.7B decode 2.2-3.6x
  faster than last round's LUT at batch 1 (2-bit 17.6 vs 4.89 tok/s, base-3 17.6 vs 6.15)
  and 2.6-11x at batch 8 (2-bit 20.0 vs 7.5), and a 64-token prefill 1.4-2.7x faster. Its
  cost is base-3 in memory: the planes take 2 bits/weight, so base-3 loads to the same
  1.19 GB as 2-bit (1.05 with the LUT last round; `load_packed(method="lut")` keeps that),
  and converting base-3 bytes at load takes ~10 s for the 2.7B (2-bit: ~4). The 1.2 GB
  resident target is met by every format while decoding (1.19 with a bf16 embedding, 1.11
  with int8), and with a 64-token prefill (1.20 / 1.12). The
  int8 embedding (per-row absmax codes, opt-in and lossy: `--embedding_dtype int8`) is also
  what brings 2-bit under the 0.75 GB file target (0.741 GB): 2-bit codes alone are 0.66 GB
  and a bf16 embedding adds 0.16. The latent bf16 2.7B's weights are a pseudo-random pattern
  placed leaf by leaf (as a restore places them; a threefry init peaks at ~23 GB of RNG
  temporaries) and its peak is generate's own (reset after that): XLA:CPU upcasts bf16 dot
  operands to fp32, so on CPU under bf16 the freeze keeps the latent kernels (scales only)
  and a loop over the layers, its carry behind an optimization barrier, converts one layer at
  a time (`keeps_latent_weights`). Before, per-layer frozen
  copies sat next to the stacked weights and XLA converted every layer's up front: 22.2 GB
  resident at 0.11 tokens/s (batch 1), on this 23 GB machine. Scoring (perplexity, multiple
  choice) loops the same way under bf16 on CPU, for Transformer++ too (a bf16 forward held
  3x each layer's weights in temporaries), and so does the Transformer++ decode step: its
  per-layer KV caches keep the layers unrolled, where XLA:CPU drops an optimization barrier,
  so each layer's weights get an exact +0 taken from the previous layer's output
  (`ordered_after`), which orders the conversions (one probe, d=512, L=8, bf16: a decode
  step's temporaries 167 -> 17 MB, 22.5 -> 10.5-11.0 ms; fp32 13 ms).
  Batched generation feeds shorter prompts their
  remaining prompt tokens inside the shared loop (one program for both model kinds), so its
  gain shrinks as prompt lengths spread. This run: latent 4939 batched vs 1244 one at a time
  (4.0x); packed 2-bit 4398 vs 3057 (1.4x; last round 2263 vs 826, 2.7x). Both packed numbers
  rose, one prompt at a time most (the popcount product), and popcount's work grows with the
  rows while the old unpack-and-multiply path's did not, so the packed ratio fell. Its ceiling
  here is set by XLA:CPU, not by the loop:
  a frozen-weight decode step of this d=256 model takes 2.0 ms at batch 1 and 10.1 ms at batch
  32 (timed round-robin in one run, load ~1.5), i.e. at most 32 x 2.0 / 10.1 = 6.3x more tokens/s
  from batching, before prompt spread; batch-32 matmuls run at 5-20% of the 218 GFLOP/s square
  matmul peak (a [32, 256] x [256, 4096] head: 1.24 ms) and the element-wise work grows with
  the batch too. 10x needs a device (or a CPU GEMM path) where a 32-row step costs little more
  than a 1-row one.
- **Transformer++ decode with a KV cache** (as `generate` runs it): one cache array per layer
  (`[batch * kv_heads, head_dim, max_len]`, heads-major, positions minor), layers unrolled,
  the new position written with `dynamic_update_slice` in place on the loop-carried (in the
  benchmark also donated) buffer, and `kv_cache_attention` reading the cache as stored; the
  weights are sliced per layer once per call (`freeze_weights`). The optimized HLO of the
  decode loop holds no copy or transpose of a cache-sized array (the count is in the section
  footer; `tests/test_decode.py` checks it with XLA's memory analysis). What XLA:CPU forced:
  a stacked `[layers, ...]` cache is sliced per layer with a copy; any reshape between the
  in-place update and the dot (XLA fuses a dot's batch and head axes and drops size-1 ones)
  duplicates the update into a full copy, hence the fused row axis; and matrix-vector products
  over `[max_len, head_dim]` rows (64 floats) ran ~1.35x slower than over `[head_dim, max_len]`
  rows, hence positions minor for K as for V. A profile of the 16k loop has the 8 attention
  matmuls on top, then the `lm_head` matrix-vector product, and nothing that moves the cache.
  Not at the bound yet: grouped K/V heads (group > 1), whose attention matmuls become small
  matrix-matrix products that XLA:CPU hands to YNNPACK, several times slower per byte (one
  K/V head at 16k: ~0.25x of its own bound, measured once outside this table). At 16k this
  run gave 0.54x (0.67x last round, same code): the bound divides by the in-place copy rate
  (40 GB/s counting reads and writes), and reading is slower here: the 8 attention products
  of the 16k cache alone (128 MiB, one probe outside this table) read at 26-28 GB/s, 0.65-0.7x
  of that rate, so the loop is near what a read stream reaches on this machine; the 0.7x
  target is within its noise, not met in this run.
- **Data** (`bench_data`): `prepare` throughput is bounded by the tokenizer library's
  single-thread encode (the `encode` column: `prepare.encode_chunk` alone, pinned to one core);
  reading JSON, writing ArrayRecord and hashing add little. It scales with `--num_proc` on a
  machine with free cores (the 2-process column here includes starting two spawned workers on
  2 shared cores). The loader's 370M target compares with a CPU train step, which consumes
  almost nothing; the H100 line puts the same loader next to an accelerator's consumption. Look
  at the load average of the run before reading absolute tokens/s.
"""


def make_markdown(res: dict, preset: str | None = None) -> str:
  res = dict(res)  # the accelerator results (no CPU machine block) get their own sections
  accel = {k: res.pop(k) for k in report_accel.RESULT_NAMES if k in res}
  if not res:
    return "# Benchmarks\n\nNo results yet: run `" + COMMAND + "`.\n"
  any_run = next(iter(res.values()))
  mach = any_run["machine"]
  presets = sorted({v["preset"] for v in res.values()})
  head = [
      "# Benchmarks",
      "",
      "Regenerate everything (results/*.json and this file) with one command:",
      "",
      "    " + COMMAND + "                  # CPU-sized defaults (each script < 3 min on 2 cores)",
      "    " + COMMAND + " --preset accel   # bigger shapes for a GPU/TPU",
      "",
      "One benchmark: `python -m benchmarks.bench_train [--preset toy|cpu|accel]` (see each "
      "script's docstring); `python -m benchmarks.report` rebuilds this file from the JSON.",
      "Every number is measured in the run that reports it; comparisons are ratios inside one "
      "run with the variants timed round-robin.",
      "",
      f"Machine: {mach.get('cpu_model')} ({mach.get('cpu_count')} cores visible), backend "
      f"{mach['backend']}, jax {mach['jax_version']}; preset {', '.join(presets)}.",
      "1-minute load average (start → end) per benchmark: "
      + ", ".join(_load_text(v) for v in res.values()) + ".",
      "",
      "## Targets",
      "",
      _table(["target", "measured", "met"], targets(res) + report_accel.targets(accel)),
  ]
  inference = _inference_section(res.get("bench_inference", {}).get("results"))
  return ("\n".join(head) + "\n\n"
          + "\n\n".join(sections(res) + report_accel.sections(accel) + inference)
          + "\n\n" + NOTES)


def main():
  parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
  parser.add_argument("--results_dir", default=common.RESULTS_DIR)
  parser.add_argument("--markdown", default=os.path.join(os.path.dirname(common.RESULTS_DIR),
                                                         "RESULTS.md"))
  args = parser.parse_args()
  write(args.results_dir, args.markdown)


def write(results_dir: str, markdown: str) -> str:
  text = make_markdown(_load(results_dir))
  with open(markdown, "w") as f:
    f.write(text)
  print(f"wrote {markdown}")
  return text


if __name__ == "__main__":
  main()
