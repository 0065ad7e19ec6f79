"""RESULTS.md sections for the accelerator results: the TPU fit/roofline table compiled on CPU
(`aot_tpu.json`) and the device check (`accel_check_<device>.json`, absent until someone runs
`python -m benchmarks.accel_check` on a GPU/TPU). `benchmarks.report` calls these."""

from __future__ import annotations

import json

RESULT_NAMES = ("aot_tpu", "accel_check")  # the `benchmark` keys of their JSON files
TARGET_RATIO = 1.3  # MatMul-free tokens/s per v5p chip over the paper's per H100


def _yes(ok):
  return "n/a" if ok is None else ("**yes**" if ok else "no")


def _gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f}"


def _mesh(m: dict) -> str:
  return f"{m['data']}/{m['fsdp']}/{m['tensor']}"


def targets(res: dict) -> list[list]:
  rows = []
  aot = res.get("aot_tpu")
  if aot:
    for r in aot.get("rows", []):
      if r["slice"] in ("v5e-8", "v5p-8") and r["fits"] is not None:
        how = (f"peak {_gib(r['memory']['peak_bytes'])} GiB / chip (mesh {_mesh(r['mesh'])}, "
               f"{r['microbatches']} microbatches, remat {r['remat']})" if r["fits"] else
               f"over HBM by {_gib(r.get('exceeded_bytes'))} GiB at the closest point"
               if r.get("exceeded_bytes") else "no point compiled")
        rows.append([f"paper recipe fits {r['slice']} at 256x2048 tokens/step "
                     f"({r['kind']} {r['size']}, XLA TPU compile on CPU)", how, _yes(r["fits"])])
    for r in aot.get("rows", []):
      if r["fits"] and r["slice"] == "v5p-8" and "vs_paper" in r:
        v = r["vs_paper"]
        rows.append([f"v5p chip vs the paper's measured H100 tokens/s, like for like "
                     f"(mmfree {r['size']}): both at the paper's MFU ({v['paper_mfu']:.1%}); "
                     f"target >= {TARGET_RATIO}x",
                     f"{v['at_paper_mfu']:.2f}x at equal MFU; {v['bound_vs_bound']:.2f}x "
                     f"roofline vs roofline (H100 bound {v['h100_bound_tokens_per_s']:,.0f} "
                     "tok/s, compute only) - estimates from datasheet peaks, not measurements",
                     _yes(v["at_paper_mfu"] >= TARGET_RATIO)])
  accel = res.get("accel_check")
  if accel and not accel["results"].get("smoke"):
    pass  # device targets are read off its section
  else:
    rows.append(["on a device: MatMul-free >= 1.3x paper per-GPU, int8 >= 1.3x bf16 step, "
                 "Pallas recurrence >= 2.5x associative", "no accelerator run exists yet "
                 "(`python -m benchmarks.accel_check` is ready)", _yes(None)])
  return rows


def sections(res: dict) -> list[str]:
  out = []
  aot = res.get("aot_tpu")
  if aot and aot.get("rows"):
    chips = aot["chips"]
    lines = [
        "## 9. TPU memory fit and roofline ESTIMATES, compiled on CPU (`aot_tpu`)",
        "",
        f"The real sharded train step (paper recipe: bf16 compute, fp32 params + AdamW, "
        f"{aot['global_batch']} x {aot['seq_len']} tokens per step) compiled for each TPU slice "
        "with libtpu on this CPU host; per-chip memory is XLA's compiled memory analysis. The "
        "search ranks mesh (data/fsdp/tensor) x microbatches x remat by the estimate and "
        "compiles in that order until a point fits. **Step times and tokens/s are ESTIMATES** "
        "(`benchmarks.roofline`: max of compute = analytic FLOPs / datasheet bf16 peak, the "
        "HBM traffic known without measuring (weights, optimizer state; activations not "
        "modelled, so a lower bound) / datasheet bandwidth, ICI model / half the datasheet ICI "
        "bandwidth), never measured. The int8 column is filled only where the same point "
        "compiled with `model.bitlinear_impl=int8`. "
        "XLA FLOPs are `cost_analysis()` as reported: it counts each while-loop body once "
        "(microbatch, layer and time scans), so it is far below the analytic count; the "
        "estimate uses the analytic FLOPs (6N + attention + remat recompute, per chip).",
        "",
        "Datasheet values per chip (`mmfree_jax.hardware`): " + "; ".join(
            f"{c['slice_name']} = `{c['topology']}` ({c['chips']} chips): bf16 "
            f"{c['bf16_flops'] / 1e12:.0f} TFLOP/s, int8 {c['int8_ops'] / 1e12:.0f} TOP/s, HBM "
            f"{c['hbm_bytes'] / 1e9:.0f} GB at {c['hbm_bytes_per_s'] / 1e9:.0f} GB/s, ICI "
            f"{c['ici_bytes_per_s'] / 1e9:.0f} GB/s" for c in chips.values()) + ".",
        "",
    ]
    table = ["| model | slice | fits | mesh d/f/t | micro-batches | remat | args GiB | temp GiB "
             "| peak GiB | XLA GFLOP (loops once) | analytic GFLOP/chip | EST. step s | "
             "EST. tok/s/chip | bound | EST. int8 tok/s/chip | compiles |",
             "|" + "---|" * 16]
    not_run = [f"{r['kind']} {r['size']} on {r['slice']}" for r in aot["rows"]
               if r["fits"] is None]
    for r in aot["rows"]:
      if r["fits"] is None:
        continue
      n_compiled = sum(1 for t in r["tried"] if t["status"] in ("fits", "oom"))
      n_skipped = sum(1 for t in r["tried"] if t["status"] == "skipped")
      tried = f"{n_compiled} (+{n_skipped} skipped)"
      if not r["fits"]:
        by = r.get("exceeded_bytes")
        table.append(f"| {r['kind']} {r['size']} | {r['slice']} | **no**: "
                     + (f"over HBM by {_gib(by)} GiB (closest point)" if by else
                        "not compiled yet") + " |" + " |" * 12 + f" {tried} |")
        continue
      m, e = r["memory"], r["estimate"]
      int8 = r.get("int8", {}).get("tokens_per_s_chip")
      table.append(
          f"| {r['kind']} {r['size']} | {r['slice']} | yes | {_mesh(r['mesh'])} | "
          f"{r['microbatches']} | {r['remat']} | {_gib(m['argument_bytes'])} | "
          f"{_gib(m['temp_bytes'])} | {_gib(m['peak_bytes'])} | {r['xla_flops'] / 1e9:,.0f} | "
          f"{e['flops_analytic_hw'] / 1e9:,.0f} | {e['step_s']:.3f} | "
          f"{e['tokens_per_s_chip']:,.0f} | {e['bound']} | "
          + (f"{int8:,.0f}" if int8 else r.get("int8", {}).get("status", "-"))
          + f" | {tried} |")
    lines += table
    codes = sorted({aot["points"][r["key"]].get("code", "?") for r in aot["rows"]
                    if r.get("fits") and r.get("key") in aot.get("points", {})})
    models = sorted({json.dumps(aot["points"][r["key"]].get("model", {}), sort_keys=True)
                     for r in aot["rows"] if r.get("fits") and r.get("key") in aot["points"]})
    if codes:
      lines += ["", "Compiled from code " + "; ".join(codes) + " with model choices "
                + "; ".join(models) + "."]
    attention = {}  # what the compiled Transformer++ steps ran, -> rows
    for r in aot["rows"]:
      if r["kind"] == "transformer" and r.get("fits") and r.get("key") in aot["points"]:
        name = aot["points"][r["key"]].get("model", {}).get("attention", "pre-splash")
        attention.setdefault(name, []).append(f"{r['size']} {r['slice']}")
    described = {
        "splash": "the Pallas splash attention kernel (`kernels.attention_tpu`, Mosaic; what "
                  "`attention_impl=auto` compiles to on TPU)",
        "xla": "XLA's `jax.nn.dot_product_attention`",
        "pre-splash": "XLA's `jax.nn.dot_product_attention` (compiled before the TPU splash "
                      "path existed; `attention_impl=auto` now compiles to the splash kernel: "
                      "`--refresh` recompiles these)"}
    if attention:
      lines += ["", "Transformer++ attention in these compiled steps: " + "; ".join(
          f"{described.get(k, k)}: {', '.join(v)}" for k, v in sorted(attention.items()))
                + "."]
    if not_run:
      lines += ["", "Not compiled yet (one compile took 19-30+ minutes on this shared, loaded "
                "2-core host; `python -m benchmarks.aot_tpu --only kind/size/chip` resumes): "
                + ", ".join(not_run) + "."]
    lines += ["", "Paper's training throughput per H100 (the target's reference, tokens/s/GPU): "
              + ", ".join(f"{k} {v / 1e3:.0f}k" for k, v in
                          aot["paper_h100_tokens_per_s"].items())
              + " (measured). The roofline assumes perfect overlap and peak-rate kernels; it "
              "bounds what a real run reaches from above, so it is compared with the paper only "
              "like for like: the same roofline on an H100, or both chips at the paper's MFU "
              "(the targets table)."]
    out.append("\n".join(lines))
  accel = res.get("accel_check")
  if accel and not accel["results"].get("smoke"):
    r = accel["results"]
    dev = r["device"]
    lines = [f"## 10. Device check (`accel_check`, {dev['device_count']} x {dev['device_kind']})",
             "", "| variant | tokens/s | MFU (bf16 datasheet) | compiled peak GiB | vs best "
             "Transformer++ |", "|---|---|---|---|---|"]
    for t in r.get("train", []):
      if "tokens_per_s" in t:
        mfu = t.get("mfu_vs_bf16_datasheet")
        lines.append(f"| {t['variant']} | {t['tokens_per_s']:,.0f} | "
                     + (f"{mfu:.1%}" if mfu is not None else "-")
                     + f" | {_gib(t.get('compiled_peak_bytes'))} | "
                     f"{t.get('vs_best_transformer', float('nan')):.2f}x |")
      else:
        lines.append(f"| {t['variant']} | {t.get('error') or t.get('skipped')} | | | |")
    out.append("\n".join(lines))
  else:
    out.append("## 10. Device check (`accel_check`)\n\nNo accelerator run exists yet. On a GPU "
               "or TPU host, `python -m benchmarks.accel_check` (< 8 minutes) checks kernel "
               "parity on the device and measures train tokens/s, MFU and peak memory at the "
               "370M shape for every scan_type / bitlinear_impl and Transformer++, and decode "
               "at 1k/16k context; it writes `results/accel_check_<device>.json`, from which "
               "this section is rebuilt.")
  return out
