"""Builds `benchmarks/RESULTS.md` from the JSON files in `benchmarks/results/`.

    python -m benchmarks.report [--results_dir DIR] [--markdown PATH]

(`python -m benchmarks.run_all` runs every benchmark and then this.) Each benchmark module
renders its own part: `targets(result, all_results)` gives its rows of the targets table and
`markdown(result, all_results)` its section; this module only loads the JSON and puts the
parts in order.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

from benchmarks import common

COMMAND = "python -m benchmarks.run_all --commit_results"
# Section order of RESULTS.md, and the order of their rows in the targets table.
SECTIONS = (
  "bench_peak",
  "bench_train",
  "bench_components",
  "bench_recurrence",
  "bench_memory",
  "bench_compile",
  "bench_decode",
  "bench_packed",
  "bench_data",
  "aot_tpu",
  "aot_multislice",
  "aot_long_context",
  "accel_check",
  "bench_inference",
  "ab_inference",
  "bench_checkpoint",
  "bench_checkpoint_storage",
  "bench_context",
)
TARGETS = (
  "bench_train",
  "bench_memory",
  "bench_compile",
  "bench_decode",
  "bench_packed",
  "bench_data",
  "bench_inference",
  "aot_tpu",
  "aot_multislice",
  "aot_long_context",
  "accel_check",
)
# no CPU machine block; rendered even when absent
ACCELERATOR = ("aot_tpu", "aot_multislice", "aot_long_context", "accel_check")
ALWAYS = ("accel_check",)  # says how to make the missing run


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


def _result(res: dict, name: str):
  """A benchmark's results (aot_tpu keeps its table at the top level of its file)."""
  payload = res.get(name)
  if payload is None:
    return None
  return payload.get("results", payload)


def _parts(res: dict, names: tuple, what: str) -> list:
  out = []
  for name in names:
    result = _result(res, name)
    if result is None and name not in ALWAYS:
      continue
    part = getattr(importlib.import_module(f"benchmarks.{name}"), what, None)
    if part is not None:
      out.append(part(result, res))
  return out


def _load_text(run: dict) -> str:
  """'name start→end', or each part's where a benchmark's parts ran separately."""
  name = run["benchmark"].replace("bench_", "")
  results = run.get("results")
  part_loads = results.get("part_loads") if isinstance(results, dict) else None
  if part_loads:
    return (
      f"{name} ("
      + ", ".join(f"{part} {a}→{b}" for part, (a, b) in sorted(part_loads.items()))
      + ")"
    )
  return (
    f"{name} {run['machine'].get('load_average_1m_start')}→"
    f"{run['machine'].get('load_average_1m_end')}"
  )


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
  runs as `generate` runs it: `infer.prepare_for_decoding` slices the stacked blocks into
  per-layer blocks
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
  the program holds one layer: compiling the 2.7B generate adds 41 MB of RSS, 316 MB with the
  layers unrolled.
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
  a time (`infer.plan_for`, `CPU_CONVERTS_DOT_OPERANDS`). Before, per-layer frozen
  copies sat next to the stacked weights and XLA converted every layer's up front: 22.2 GB
  resident at 0.11 tokens/s (batch 1), on this 23 GB machine. Scoring (perplexity, multiple
  choice) loops the same way under bf16 on CPU, for Transformer++ too (a bf16 forward held
  3x each layer's weights in temporaries), and so does the Transformer++ decode step: its
  per-layer KV caches keep the layers unrolled, where XLA:CPU drops an optimization barrier,
  so each layer's weights get an exact +0 taken from the previous layer's output
  (`infer.loops.ordered_after`), which orders the conversions (one probe, d=512, L=8, bf16:
  a decode
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
  weights are sliced per layer once per call (`infer.prepare_for_decoding`). The optimized
  HLO of the
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
  single-thread encode (the `encode` column: `prepare_encode.encode_chunk` alone, pinned to one
  core); reading JSON, writing ArrayRecord and hashing add little. It scales with `--num_proc` on a
  machine with free cores (the 2-process column here includes starting two spawned workers on
  2 shared cores). The loader's 370M target compares with a CPU train step, which consumes
  almost nothing; the H100 line puts the same loader next to an accelerator's consumption. Look
  at the load average of the run before reading absolute tokens/s.
"""


def make_markdown(res: dict, preset: str | None = None) -> str:
  cpu = {k: v for k, v in res.items() if k not in ACCELERATOR}
  if not cpu:
    return "# Benchmarks\n\nNo results yet: run `" + COMMAND + "`.\n"
  mach = next(iter(cpu.values()))["machine"]
  presets = sorted({v["preset"] for v in cpu.values()})
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
    + ", ".join(_load_text(v) for v in cpu.values())
    + ".",
    "",
    "## Targets",
    "",
    common.md_table(["target", "measured", "met"], sum(_parts(res, TARGETS, "targets"), [])),
  ]
  sections = [text for text in _parts(res, SECTIONS, "markdown") if text]
  return "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n\n" + NOTES


def main():
  parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
  parser.add_argument("--results_dir", default=common.RESULTS_DIR)
  parser.add_argument(
    "--markdown", default=os.path.join(os.path.dirname(common.RESULTS_DIR), "RESULTS.md")
  )
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
