"""One-command accelerator check: kernel parity, train throughput/MFU/memory, decode speed.

    python -m benchmarks.accel_check            # on a GPU or TPU host; < 8 minutes
    python -m benchmarks.accel_check --smoke    # tiny shapes on any backend (CI runs it)

On the device it
1. prints the device (kind, count, memory) and its datasheet peaks (bf16, int8, HBM);
2. checks every `model.scan_type` against `sequential` and every `model.bitlinear_impl`
   against `autodiff` ON THE DEVICE, forward and gradients, fp32 and bf16 inputs, with the
   tolerances stated in the JSON (the Pallas kernels take part through these registries);
3. times the train step (the library's step: AdamW, clipping) at the 370M shape (d 1024,
   L 24, vocab 32000, T 2048, bf16, remat dots_no_batch): MatMul-free for each scan_type
   and each bitlinear_impl, and Transformer++ for each attention implementation; tokens/s,
   MFU against the device's bf16 datasheet peak, compiled and measured peak memory;
4. times greedy decode (batch 1) at 1k and 16k context for both models;
and writes everything to `benchmarks/results/accel_check_<device>.json`.

A variant that fails (out of memory, a kernel that does not lower) is reported with its
error and the others go on; variants left when the time budget (`--budget_s`, default 420 s)
runs out are reported as skipped. On a CPU host without `--smoke` it refuses: CPU numbers are
what `python -m benchmarks.run_all` measures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, setups
from mmfree_jax import accounting, hardware
from mmfree_jax import config as config_lib
from mmfree_jax import registry
from mmfree_jax.kernels import dispatch
from mmfree_jax.ops import attention
from mmfree_jax.ops import bitlinear as bitlinear_lib
from mmfree_jax.ops import recurrence

NAME = "accel_check"

SHAPES = {  # d_model, num_layers, vocab, seq_len, decode contexts, decode steps
    "device": dict(d=1024, layers=24, vocab=32000, seq=2048, contexts=(1024, 16384), steps=64),
    "smoke": dict(d=64, layers=2, vocab=256, seq=64, contexts=(64,), steps=4),
}
# Parity tolerances: max |kernel - reference| / max(|reference|, 1).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def datasheet(kind: str) -> dict | None:
  """The chip table's entry for this exact device kind (`mmfree_jax.hardware`), or None."""
  chip = hardware.lookup(kind)
  if chip is None:
    return None
  return {"bf16_flops": chip.bf16_flops, "int8_ops": chip.int8_ops,
          "hbm_bytes_per_s": chip.hbm_bytes_per_s, "hbm_bytes": chip.hbm_bytes,
          "source": chip.name}


def device_info() -> dict:
  dev = jax.devices()[0]
  info = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "jax_version": jax.__version__,
          "datasheet": datasheet(dev.device_kind)}
  try:
    stats = dev.memory_stats() or {}
    info["bytes_limit"] = stats.get("bytes_limit")
  except Exception:  # not every backend reports memory stats
    info["bytes_limit"] = None
  return info


def device_slug(kind: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _check_grads(fn, ref_fn, args, dtype_name) -> dict:
  """Forward outputs and gradients of `sum(out * w)` of fn vs ref_fn, relative max error."""
  def scalar(f):
    def loss(*a):
      outs = jax.tree.leaves(f(*a))
      return sum(jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size, dtype=jnp.float32)
                                                           ).reshape(o.shape)) for o in outs)
    return loss

  argnums = tuple(range(len(args)))
  out = jax.jit(fn)(*args)
  ref = jax.jit(ref_fn)(*args)
  grads = jax.jit(jax.grad(scalar(fn), argnums))(*args)
  ref_grads = jax.jit(jax.grad(scalar(ref_fn), argnums))(*args)
  fwd = max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
  bwd = max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
  tol = TOLERANCE[dtype_name]
  return {"dtype": dtype_name, "forward_rel_err": fwd, "grad_rel_err": bwd, "tolerance": tol,
          "ok": bool(fwd <= tol and bwd <= tol)}


def attention_impls() -> list[str]:
  """The attention implementations that are themselves here: not the alias `auto` nor the
  reference `naive`; cudnn only on a GPU, the splash kernel on a TPU and on CPU (interpreted:
  the smoke run checks its plumbing; on a GPU it would be XLA's under another name)."""
  backend = dispatch.platform_of(jax.default_backend())
  return [a for a in registry.ATTENTION_IMPLS if a not in ("auto", "naive")
          and (a != "cudnn" or backend == "gpu") and (a != "splash" or backend != "gpu")]


def parity(smoke: bool) -> list[dict]:
  """Each scan_type vs `sequential`, each bitlinear_impl vs `autodiff`, each attention_impl vs
  `naive`, on the device."""
  rows = []
  batch, seq, dim = (2, 37, 128) if smoke else (2, 1031, 384)
  rng = np.random.default_rng(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    dname = jnp.dtype(dtype).name
    f = jnp.asarray(1 / (1 + np.exp(-rng.normal(size=(batch, seq, dim)) - 2)), dtype)
    i = jnp.asarray(0.1 * rng.normal(size=(batch, seq, dim)), dtype)
    h0 = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
    # the reference sees the same (rounded) inputs, in fp32
    ref = lambda f, i, h0: recurrence.get_recurrence("sequential")(
        f.astype(jnp.float32), i.astype(jnp.float32), h0)
    for name in registry.SCAN_TYPES:
      if name == "sequential":
        continue
      try:
        row = _check_grads(recurrence.get_recurrence(name), ref, (f, i, h0), dname)
      except Exception as e:
        row = {"dtype": dname, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
      rows.append({"check": f"scan_type={name} vs sequential", "shape": [batch, seq, dim],
                   **row})
    n, t, d_in, d_out = (3, 17, 32, 64) if smoke else (4, 255, 512, 1024)
    x = jnp.asarray(rng.normal(size=(n, t, d_in)), dtype)
    w = jnp.asarray(0.05 * rng.normal(size=(d_in, d_out)), jnp.float32)
    g = jnp.asarray(1 + 0.1 * rng.normal(size=(d_in,)), jnp.float32)
    ref_bl = functools.partial(bitlinear_lib.get_bitlinear("autodiff"), dtype=dtype)
    for name in registry.BITLINEAR_IMPLS:
      if name == "autodiff":
        continue
      try:
        row = _check_grads(functools.partial(bitlinear_lib.get_bitlinear(name), dtype=dtype),
                           ref_bl, (x, w, g), dname)
      except Exception as e:
        row = {"dtype": dname, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
      rows.append({"check": f"bitlinear_impl={name} vs autodiff", "shape": list(x.shape) +
                   [d_out], **row})
    # causal attention over packed documents with grouped-query K/V, vs the naive T x T path
    shape = (1, 128, 2, 1, 16) if smoke else (2, 2048, 8, 4, 128)  # b, t, heads, kv, head_dim
    b, t, heads, kv_heads, hd = shape
    q = jnp.asarray(rng.normal(size=(b, t, heads, hd)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, hd)), dtype) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1, 2, 3]], b, 0).repeat([t // 2, t // 4, t - 3 * t // 4], 1),
                      jnp.int32)
    ref_attn = lambda q, k, v: attention.causal_attention(
        *(a.astype(jnp.float32) for a in (q, k, v)), seg, impl="naive")
    # smoke: fp32 only (each interpreted splash program costs ~7 s of CPU compile)
    names = attention_impls() if dtype == jnp.float32 or not smoke else []
    for name in names:
      try:
        row = _check_grads(
            lambda q, k, v, name=name: attention.causal_attention(q, k, v, seg, impl=name),
            ref_attn, (q, k, v), dname)
      except Exception as e:
        row = {"dtype": dname, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
      rows.append({"check": f"attention_impl={name} vs naive", "shape": list(shape), **row})
  for r in rows:
    status = "ok" if r["ok"] else "FAIL"
    detail = r.get("error") or (f"fwd {r['forward_rel_err']:.2e} grad {r['grad_rel_err']:.2e} "
                                f"(tol {r['tolerance']:.0e})")
    print(f"parity {r['check']:38s} {r['dtype']:8s} {status:4s} {detail}", flush=True)
  return rows


def train_variants() -> list[tuple[str, str, dict]]:
  """(name, kind, model overrides): every scan_type and bitlinear_impl, and Transformer++ per
  attention implementation ('auto' entries are aliases of concrete ones and are skipped)."""
  scans = [s for s in registry.SCAN_TYPES if s != "auto"]
  impls = [b for b in registry.BITLINEAR_IMPLS if b != "auto"]
  best_scan = "pallas" if "pallas" in scans else "sequential"
  out = [(f"mmfree scan={s}", "mmfree", {"scan_type": s, "bitlinear_impl": "autodiff"})
         for s in scans]
  out += [(f"mmfree scan={best_scan} bitlinear={b}", "mmfree",
           {"scan_type": best_scan, "bitlinear_impl": b}) for b in impls if b != "autodiff"]
  attn = attention_impls() + ["naive"]
  out += [(f"transformer attention={a}", "transformer", {"attention_impl": a}) for a in attn]
  return out


def _supported_overrides(overrides: dict) -> dict:
  known = set(config_lib.base_model_config().keys())
  return {k: v for k, v in overrides.items() if k in known}


def train(smoke: bool, budget_end: float, peak: float | None) -> list[dict]:
  shape = SHAPES["smoke" if smoke else "device"]
  limit = device_info().get("bytes_limit") or 0
  batch = 2 if smoke else (8 if limit > 60e9 else 4 if limit > 24e9 else 2)
  seq = shape["seq"]
  rows = []
  variants = train_variants()
  if smoke:  # one of each model: the smoke run checks the plumbing, not the variants
    variants = [next(v for v in variants if v[1] == k) for k in ("mmfree", "transformer")]
  for name, kind, overrides in variants:
    row = {"variant": name, "kind": kind, "overrides": overrides, "batch": batch,
           "seq_len": seq}
    if time.time() > budget_end:
      rows.append({**row, "skipped": "time budget"})
      print(f"train {name}: skipped (time budget)", flush=True)
      continue
    try:
      cfg = setups.model_config(kind, shape["d"], shape["layers"], shape["vocab"],
                                dtype="bfloat16", remat="dots_no_batch",
                                **_supported_overrides(overrides))
      setup = setups.train_setup(cfg)
      compiled, lower_s, compile_s = setups.compile_step(setup, batch, seq)
      mem = common.memory_stats(compiled)
      runner = setups.StepRunner(setup, compiled, setups.random_batch(batch, seq, cfg.vocab_size))
      times = common.interleaved_times({"step": runner}, rounds=2 if smoke else 4, warmup=1)
      step_s = times["step"]["median_s"]
      tok_s = batch * seq / step_s
      fpt = accounting.train_flops_per_token(cfg, seq)
      row.update(step_s=step_s, tokens_per_s=tok_s, flops_per_token=fpt,
                 compile_s=lower_s + compile_s, compiled_peak_bytes=mem.get("peak_bytes"),
                 compiled_temp_bytes=mem.get("temp_bytes"),
                 mfu_vs_bf16_datasheet=(fpt * tok_s / peak) if peak else None)
      try:
        stats = jax.devices()[0].memory_stats() or {}
        row["measured_peak_bytes"] = stats.get("peak_bytes_in_use")
      except Exception:
        row["measured_peak_bytes"] = None
      del runner
      mfu = row["mfu_vs_bf16_datasheet"]
      print(f"train {name:40s} {tok_s:10,.0f} tok/s  MFU "
            + (f"{mfu:6.1%}" if mfu is not None else "  n/a ")
            + f"  peak {common.fmt_bytes(mem.get('peak_bytes', 0))}  compile "
            f"{row['compile_s']:.0f} s", flush=True)
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      print(f"train {name}: FAILED {row['error']}", flush=True)
    rows.append(row)
  mm = [r for r in rows if r.get("tokens_per_s") and r["kind"] == "mmfree"]
  tf = [r for r in rows if r.get("tokens_per_s") and r["kind"] == "transformer"]
  if tf:
    best_tf = max(r["tokens_per_s"] for r in tf)
    for r in mm + tf:
      r["vs_best_transformer"] = r["tokens_per_s"] / best_tf
  return rows


def decode(smoke: bool, budget_end: float) -> list[dict]:
  from benchmarks import bench_decode
  import mmfree_jax
  shape = SHAPES["smoke" if smoke else "device"]
  steps = shape["steps"]
  tokens = jnp.zeros((1, 1), jnp.int32)
  rows = []
  for kind in ("mmfree", "transformer"):
    cfg = setups.model_config(kind, shape["d"], shape["layers"], shape["vocab"],
                              dtype="bfloat16")
    model = mmfree_jax.build_model(cfg, 0)
    # as generate runs it: weights frozen once per loop, the KV cache donated and carried
    loop, params = bench_decode.model_decode_loop(model, steps, freeze=True,
                                                  donate_state=kind == "transformer")
    for context in shape["contexts"]:
      row = {"variant": kind, "context": context, "batch": 1, "steps": steps}
      if time.time() > budget_end:
        rows.append({**row, "skipped": "time budget"})
        continue
      try:
        state = model.init_state(1, context + steps)
        if kind == "transformer":
          state = state._replace(index=jnp.asarray(context, jnp.int32))
        compiled = loop.lower(params, tokens, state).compile()
        if kind == "transformer":
          run = bench_decode.carried(compiled, params, tokens, state, context)
        else:
          run = lambda: compiled(params, tokens, state)  # pylint: disable=cell-var-from-loop
        t = common.interleaved_times({"d": run}, rounds=2 if smoke else 3, warmup=1)["d"]
        row.update(tokens_per_s=steps / t["median_s"], ms_per_token=1e3 * t["median_s"] / steps)
        print(f"decode {kind:12s} ctx {context:6d} {row['tokens_per_s']:10,.1f} tok/s",
              flush=True)
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(f"decode {kind} ctx {context}: FAILED {row['error']}", flush=True)
      rows.append(row)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.accel_check", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, any backend (the CI test runs this)")
  parser.add_argument("--out", default=None,
                      help="default: benchmarks/results/accel_check_<device>.json")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="stop starting new variants after this many seconds")
  args = parser.parse_args(argv)
  start = time.time()
  info = device_info()
  if info["backend"] == "cpu" and not args.smoke:
    print("accel_check measures a GPU or TPU, but JAX sees only the CPU (backend 'cpu'). "
          "Install jax for the accelerator (pip install 'jax[cuda12]==<jax version>' or "
          "'jax[tpu]==<jax version>') on a machine that has one; CPU numbers come from "
          "`python -m benchmarks.run_all`. `--smoke` runs tiny shapes anywhere.",
          file=sys.stderr)
    return 2
  print(f"device: {info['device_count']} x {info['device_kind']} ({info['backend']}), "
        f"jax {info['jax_version']}, memory limit "
        + (common.fmt_bytes(info['bytes_limit']) if info['bytes_limit'] else "n/a")
        + (f"; datasheet bf16 {info['datasheet']['bf16_flops'] / 1e12:.0f} TFLOP/s, int8 "
           f"{info['datasheet']['int8_ops'] / 1e12:.0f} TOP/s, HBM "
           f"{info['datasheet']['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
           if info["datasheet"] else "; no datasheet peak known for this device (MFU n/a)"),
        flush=True)
  budget_end = start + args.budget_s
  peak = info["datasheet"]["bf16_flops"] if info["datasheet"] else None
  results = {"device": info, "smoke": args.smoke, "shapes": SHAPES["smoke" if args.smoke
                                                                   else "device"]}
  # fp32 parity at the full fp32 matmul precision (TPU's default passes bf16 operands, which
  # the 1e-5 tolerance would flag as a kernel error)
  def full_precision_parity():
    with jax.default_matmul_precision("highest"):
      return parity(args.smoke)

  sections = (("parity", full_precision_parity),
              ("train", lambda: train(args.smoke, budget_end, peak)),
              ("decode", lambda: decode(args.smoke, budget_end)))
  for section, fn in sections:
    try:
      results[section] = fn()
    except Exception:
      results[section] = {"error": traceback.format_exc(limit=3)[-1500:]}
      print(f"{section}: FAILED\n{results[section]['error']}", flush=True)
  results["wall_s"] = time.time() - start
  out = args.out or os.path.join(common.RESULTS_DIR,
                                 f"{NAME}_{device_slug(info['device_kind'])}.json")
  notes = ["train: the library's train step (AdamW) at bf16, remat dots_no_batch; tokens/s from "
           "the median of timed steps; MFU = train_flops_per_token x tokens/s / the device's "
           "bf16 datasheet peak",
           "parity: relative max error = max|x - ref| / max(|ref|, 1), forward outputs and "
           "gradients of a fixed random projection of the outputs"]
  if args.smoke:
    notes.append("--smoke: tiny shapes; the numbers mean nothing, only that the check runs")
  common.write_json(out, NAME, "smoke" if args.smoke else "device", results, notes)
  failed = [r["check"] for r in results.get("parity", []) if isinstance(r, dict)
            and not r.get("ok")] if isinstance(results.get("parity"), list) else ["parity"]
  print(f"accel_check done in {results['wall_s']:.0f} s; parity failures: {failed or 'none'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
