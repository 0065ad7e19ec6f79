"""One-command accelerator check: kernel parity, train throughput/MFU/memory, decode speed.

    python -m benchmarks.accel_check            # on a GPU or TPU host; < 8 minutes
    python -m benchmarks.accel_check --smoke    # tiny shapes on any backend (CI runs it)

On the device it
1. prints the device (kind, count, memory) and its datasheet peaks (`mmfree_jax.hardware`,
   matched by the exact device kind);
2. checks every `model.scan_type` against `sequential`, every `model.bitlinear_impl` against
   `autodiff` and every attention implementation against `naive` ON THE DEVICE, forward and
   gradients, fp32 and bf16 inputs, with the tolerances stated in the JSON;
3. times the train step (the library's step: AdamW, clipping) at the 370M shape (d 1024,
   L 24, vocab 32000, T 2048, bf16, remat dots_no_batch), most valuable variant first: the
   Pallas recurrence, the default Transformer++, int8 BitLinear, the associative scan, then
   the rest; tokens/s, MFU against the bf16 datasheet peak, compiled peak memory and the
   measured peak of the variant's own process;
4. times greedy decode (batch 1) at 1k and 16k context for both models;
and writes `benchmarks/results/accel_check_<device>.json` after every row.

Each section has a hard budget (`--parity_s`, `--train_s`, `--decode_s`; 480 s in all) and
runs in child processes (`benchmarks.budget`): a train variant per process (its memory peak
is its own), parity and decode one process per section. A process still running at its
section's deadline is killed and its row says so; rows never started are reported as
skipped; a variant that fails (out of memory, a kernel that does not lower) is reported with
its error and the others go on. Decode always gets its own budget. On a CPU host without
`--smoke` it refuses: CPU numbers are what `python -m benchmarks.run_all` measures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import budget as budget_lib
from benchmarks import common, setups
from mmfree_jax import accounting, hardware, registry
from mmfree_jax import config as config_lib
from mmfree_jax.kernels import dispatch
from mmfree_jax.ops import attention, recurrence
from mmfree_jax.ops import bitlinear as bitlinear_lib

NAME = "accel_check"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # d_model, num_layers, vocab, seq_len, decode contexts, decode steps
  "device": dict(d=1024, layers=24, vocab=32000, seq=2048, contexts=(1024, 16384), steps=64),
  "smoke": dict(d=64, layers=2, vocab=256, seq=64, contexts=(64,), steps=4),
}
BUDGET_S = {"parity": 90.0, "train": 300.0, "decode": 90.0}
# Parity tolerances: max |kernel - reference| / max(|reference|, 1).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def datasheet(kind: str) -> dict | None:
  """The chip table's entry for this exact device kind (`mmfree_jax.hardware`), or None."""
  chip = hardware.lookup(kind)
  if chip is None:
    return None
  return {
    "bf16_flops": chip.bf16_flops,
    "int8_ops": chip.int8_ops,
    "hbm_bytes_per_s": chip.hbm_bytes_per_s,
    "hbm_bytes": chip.hbm_bytes,
    "source": chip.name,
  }


def device_info() -> dict:
  dev = jax.devices()[0]
  info = {
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "jax_version": jax.__version__,
    "datasheet": datasheet(dev.device_kind),
  }
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
      return sum(
        jnp.sum(
          o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        )
        for o in outs
      )

    return loss

  argnums = tuple(range(len(args)))
  out = jax.jit(fn)(*args)
  ref = jax.jit(ref_fn)(*args)
  grads = jax.jit(jax.grad(scalar(fn), argnums))(*args)
  ref_grads = jax.jit(jax.grad(scalar(ref_fn), argnums))(*args)
  fwd = max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
  bwd = max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
  tol = TOLERANCE[dtype_name]
  return {
    "dtype": dtype_name,
    "forward_rel_err": fwd,
    "grad_rel_err": bwd,
    "tolerance": tol,
    "ok": bool(fwd <= tol and bwd <= tol),
  }


def attention_impls() -> list[str]:
  """The attention implementations that are themselves here: not the alias `auto` nor the
  reference `naive`; cudnn only on a GPU, the splash kernel on a TPU and on CPU (interpreted:
  the smoke run checks its plumbing; on a GPU it would be XLA's under another name)."""
  backend = dispatch.platform_of(jax.default_backend())
  return [
    a
    for a in registry.ATTENTION_IMPLS
    if a not in ("auto", "naive")
    and (a != "cudnn" or backend == "gpu")
    and (a != "splash" or backend != "gpu")
  ]


# ---------------------------------------------------------------------------------- parity


def parity_keys(smoke: bool) -> list[str]:
  """`"<what> vs <reference>|<dtype>"` for every check, fp32 first (a wrong kernel shows
  there; bf16 adds rounding)."""
  keys = []
  for dname in ("float32", "bfloat16"):
    keys += [
      f"scan_type={s} vs sequential|{dname}" for s in registry.SCAN_TYPES if s != "sequential"
    ]
    keys += [
      f"bitlinear_impl={b} vs autodiff|{dname}" for b in registry.BITLINEAR_IMPLS if b != "autodiff"
    ]
    # smoke: fp32 only (each interpreted splash program costs ~7 s of CPU compile)
    if dname == "float32" or not smoke:
      keys += [f"attention_impl={a} vs naive|{dname}" for a in attention_impls()]
  return keys


@functools.lru_cache(maxsize=None)
def _parity_inputs(family: str, dname: str, smoke: bool):
  """(args, reference fn, shape) of one family of checks, seeded per family and dtype."""
  rng = np.random.default_rng(
    [("scan", "bitlinear", "attention").index(family), ("float32", "bfloat16").index(dname)]
  )
  dtype = jnp.dtype(dname)
  if family == "scan":
    b, t, d = (2, 37, 128) if smoke else (2, 1031, 384)
    f = jnp.asarray(1 / (1 + np.exp(-rng.normal(size=(b, t, d)) - 2)), dtype)
    i = jnp.asarray(0.1 * rng.normal(size=(b, t, d)), dtype)
    h0 = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    # the reference sees the same (rounded) inputs, in fp32
    ref = lambda f, i, h0: recurrence.get_recurrence("sequential")(
      f.astype(jnp.float32), i.astype(jnp.float32), h0
    )
    return (f, i, h0), ref, [b, t, d]
  if family == "bitlinear":
    n, t, d_in, d_out = (3, 17, 32, 64) if smoke else (4, 255, 512, 1024)
    x = jnp.asarray(rng.normal(size=(n, t, d_in)), dtype)
    w = jnp.asarray(0.05 * rng.normal(size=(d_in, d_out)), jnp.float32)
    g = jnp.asarray(1 + 0.1 * rng.normal(size=(d_in,)), jnp.float32)
    ref = functools.partial(bitlinear_lib.get_bitlinear("autodiff"), dtype=dtype)
    return (x, w, g), ref, [n, t, d_in, d_out]
  # causal attention over packed documents with grouped-query K/V, vs the naive T x T path
  shape = (1, 128, 2, 1, 16) if smoke else (2, 2048, 8, 4, 128)  # b, t, heads, kv, head_dim
  b, t, heads, kv_heads, hd = shape
  q = jnp.asarray(rng.normal(size=(b, t, heads, hd)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, hd)), dtype) for _ in range(2))
  seg = jnp.asarray(
    np.repeat([[1, 2, 3]], b, 0).repeat([t // 2, t // 4, t - 3 * t // 4], 1), jnp.int32
  )
  ref = lambda q, k, v: attention.causal_attention(
    *(a.astype(jnp.float32) for a in (q, k, v)), seg, impl="naive"
  )
  return (q, k, v, seg), ref, list(shape)


def parity_row(key: str, smoke: bool) -> dict:
  """One parity check, at the full fp32 matmul precision (TPU's default passes bf16 operands,
  which the 1e-5 tolerance would flag as a kernel error)."""
  check, dname = key.split("|")
  what, name = check.split(" vs ")[0].split("=")
  family = {"scan_type": "scan", "bitlinear_impl": "bitlinear", "attention_impl": "attention"}
  args, ref, shape = _parity_inputs(family[what], dname, smoke)
  if what == "scan_type":
    fn = recurrence.get_recurrence(name)
  elif what == "bitlinear_impl":
    fn = functools.partial(bitlinear_lib.get_bitlinear(name), dtype=jnp.dtype(dname))
  else:
    q, k, v, seg = args
    args = (q, k, v)
    fn = lambda q, k, v: attention.causal_attention(q, k, v, seg, impl=name)
  row = {"key": key, "check": check, "shape": shape}
  try:
    with jax.default_matmul_precision("highest"):
      row.update(_check_grads(fn, ref, args, dname))
  except Exception as e:
    row.update(dtype=dname, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
  detail = row.get("error") or (
    f"fwd {row['forward_rel_err']:.2e} grad {row['grad_rel_err']:.2e} (tol {row['tolerance']:.0e})"
  )
  print(f"parity {check:38s} {dname:8s} {'ok' if row['ok'] else 'FAIL':4s} {detail}", flush=True)
  return row


# ----------------------------------------------------------------------------------- train


def train_variants() -> list[tuple[str, str, dict]]:
  """(name, kind, model overrides), most valuable first: the Pallas recurrence (the
  MatMul-free claim), the default Transformer++ (its reference), int8 BitLinear (the int8
  claim), the associative scan (the Pallas-vs-associative claim); then every other
  scan_type, bitlinear_impl and attention implementation ('auto' aliases skipped)."""
  scans = [s for s in registry.SCAN_TYPES if s != "auto"]
  impls = [b for b in registry.BITLINEAR_IMPLS if b not in ("auto", "autodiff")]
  best_scan = "pallas" if "pallas" in scans else "sequential"
  attn = attention_impls() + ["naive"]
  mm = lambda s, b="autodiff": (
    (f"mmfree scan={s}" if b == "autodiff" else f"mmfree scan={s} bitlinear={b}"),
    "mmfree",
    {"scan_type": s, "bitlinear_impl": b},
  )
  tf = lambda a: (f"transformer attention={a}", "transformer", {"attention_impl": a})
  first = [mm(best_scan), tf(attn[0])]
  first += [mm(best_scan, "int8")] if "int8" in impls else []
  first += [mm("associative")] if "associative" in scans else []
  rest = [mm(best_scan, b) for b in impls] + [mm(s) for s in scans] + [tf(a) for a in attn]
  return first + [v for v in rest if v not in first]


def train_keys(smoke: bool) -> list[str]:
  variants = train_variants()
  if smoke:  # one of each model: the smoke run checks the plumbing, not the variants
    variants = [next(v for v in variants if v[1] == k) for k in ("mmfree", "transformer")]
  return [v[0] for v in variants]


def _supported_overrides(overrides: dict) -> dict:
  known = set(config_lib.base_model_config().keys())
  return {k: v for k, v in overrides.items() if k in known}


def train_row(key: str, smoke: bool) -> dict:
  """One train variant, timed in this process (its own: the device's peak memory is then
  this variant's)."""
  name, kind, overrides = next(v for v in train_variants() if v[0] == key)
  shape = SHAPES["smoke" if smoke else "device"]
  info = device_info()
  limit = info.get("bytes_limit") or 0
  batch = 2 if smoke else (8 if limit > 60e9 else 4 if limit > 24e9 else 2)
  seq = shape["seq"]
  peak = info["datasheet"]["bf16_flops"] if info["datasheet"] else None
  row = {
    "key": key,
    "variant": name,
    "kind": kind,
    "overrides": overrides,
    "batch": batch,
    "seq_len": seq,
  }
  try:
    cfg = setups.model_config(
      kind,
      shape["d"],
      shape["layers"],
      shape["vocab"],
      dtype="bfloat16",
      remat="dots_no_batch",
      **_supported_overrides(overrides),
    )
    setup = setups.train_setup(cfg)
    compiled, lower_s, compile_s = setups.compile_step(setup, batch, seq)
    mem = common.memory_stats(compiled)
    runner = setups.StepRunner(setup, compiled, setups.random_batch(batch, seq, cfg.vocab_size))
    times = common.interleaved_times({"step": runner}, rounds=2 if smoke else 4, warmup=1)
    step_s = times["step"]["median_s"]
    tok_s = batch * seq / step_s
    fpt = accounting.train_flops_per_token(cfg, seq)
    row.update(
      step_s=step_s,
      tokens_per_s=tok_s,
      flops_per_token=fpt,
      compile_s=lower_s + compile_s,
      compiled_peak_bytes=mem.get("peak_bytes"),
      compiled_temp_bytes=mem.get("temp_bytes"),
      mfu_vs_bf16_datasheet=(fpt * tok_s / peak) if peak else None,
    )
    try:
      stats = jax.devices()[0].memory_stats() or {}
      row["measured_peak_bytes"] = stats.get("peak_bytes_in_use")
    except Exception:  # not every backend reports memory stats
      row["measured_peak_bytes"] = None
    mfu = row["mfu_vs_bf16_datasheet"]
    print(
      f"train {name:40s} {tok_s:10,.0f} tok/s  MFU "
      + (f"{mfu:6.1%}" if mfu is not None else "  n/a ")
      + f"  peak {common.fmt_bytes(mem.get('peak_bytes', 0))}  compile "
      f"{row['compile_s']:.0f} s",
      flush=True,
    )
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(f"train {name}: FAILED {row['error']}", flush=True)
  return row


def add_transformer_ratios(rows: list[dict]) -> None:
  """`vs_best_transformer` on every timed row: its tokens/s over the best Transformer++'s."""
  tf = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and r["kind"] == "transformer"]
  for r in rows:
    if tf and r.get("tokens_per_s"):
      r["vs_best_transformer"] = r["tokens_per_s"] / max(tf)


# ---------------------------------------------------------------------------------- decode


def decode_keys(smoke: bool) -> list[str]:
  contexts = SHAPES["smoke" if smoke else "device"]["contexts"]
  return [f"{kind}|{c}" for c in contexts for kind in ("mmfree", "transformer")]


@functools.lru_cache(maxsize=None)
def _decode_setup(kind: str, smoke: bool):
  import mmfree_jax
  from benchmarks import bench_decode

  shape = SHAPES["smoke" if smoke else "device"]
  cfg = setups.model_config(kind, shape["d"], shape["layers"], shape["vocab"], dtype="bfloat16")
  model = mmfree_jax.build_model(cfg, 0)
  # as generate runs it: weights frozen once per loop, the KV cache donated and carried
  loop, params = bench_decode.model_decode_loop(
    model, shape["steps"], freeze=True, donate_state=kind == "transformer"
  )
  return model, loop, params


def decode_row(key: str, smoke: bool) -> dict:
  """Greedy decode of `steps` tokens at batch 1 after `context` positions."""
  from benchmarks import bench_decode

  kind, context = key.split("|")[0], int(key.split("|")[1])
  steps = SHAPES["smoke" if smoke else "device"]["steps"]
  row = {"key": key, "variant": kind, "context": context, "batch": 1, "steps": steps}
  try:
    model, loop, params = _decode_setup(kind, smoke)
    tokens = jnp.zeros((1, 1), jnp.int32)
    state = model.init_state(1, context + steps)
    if kind == "transformer":
      state = state._replace(index=jnp.asarray(context, jnp.int32))
    compiled = loop.lower(params, tokens, state).compile()
    if kind == "transformer":
      run = bench_decode.carried(compiled, params, tokens, state, context)
    else:
      run = lambda: compiled(params, tokens, state)
    t = common.interleaved_times({"d": run}, rounds=2 if smoke else 3, warmup=1)["d"]
    row.update(tokens_per_s=steps / t["median_s"], ms_per_token=1e3 * t["median_s"] / steps)
    print(f"decode {kind:12s} ctx {context:6d} {row['tokens_per_s']:10,.1f} tok/s", flush=True)
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(f"decode {kind} ctx {context}: FAILED {row['error']}", flush=True)
  return row


# ------------------------------------------------------------------------------------ main

SECTIONS = {
  "parity": (parity_keys, parity_row),
  "train": (train_keys, train_row),
  "decode": (decode_keys, decode_row),
}
ONE_PROCESS_PER_KEY = {"train"}  # a train variant's memory peak must be its own


def _child_main(section: str, smoke: bool, keys: list[str]) -> int:
  for key in keys[:1] if section in ONE_PROCESS_PER_KEY else keys:
    budget_lib.print_row(SECTIONS[section][1](key, smoke))
  return 0


def _launcher(section: str, smoke: bool):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  argv = ["-m", "benchmarks.accel_check", "--_child", section] + (["--smoke"] if smoke else [])
  return lambda keys, budget: budget_lib.child_rows(argv, keys, budget, cwd=ROOT, env=env)


def _write(path: str, results: dict, smoke: bool) -> None:
  notes = [
    "train: the library's train step (AdamW) at bf16, remat dots_no_batch; tokens/s "
    "from the median of timed steps; MFU = accounting.train_flops_per_token x "
    "tokens/s / the device's bf16 datasheet peak; each variant in its own process",
    "parity: relative max error = max|x - ref| / max(|ref|, 1), forward outputs and "
    "gradients of a fixed random projection of the outputs",
    "budgets: each section's rows say cut (killed at its deadline) or skipped",
  ]
  if smoke:
    notes.append("--smoke: tiny shapes; the numbers mean nothing, only that the check runs")
  payload = {
    "benchmark": NAME,
    "preset": "smoke" if smoke else "device",
    "machine": common.machine_info(),
    "notes": notes,
    "results": results,
    "unix_time": time.time(),
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=1, default=float)
  os.replace(path + ".tmp", path)


def run_sections(
  results: dict, budgets: dict, launchers: dict, keys: dict, write, clock=time.monotonic
) -> None:
  """Each section in turn under its own budget; `write()` after every row."""
  for section in ("parity", "train", "decode"):
    results[section] = []

    def on_row(row, section=section):
      results[section].append(row)
      if section == "train":
        add_transformer_ratios(results[section])
      write()

    budget_lib.run_section(
      keys[section], launchers[section], budget_lib.Budget(budgets[section], clock), on_row
    )


def _parse(argv):
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.accel_check",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--smoke", action="store_true", help="tiny shapes, any backend (the CI test runs this)"
  )
  parser.add_argument(
    "--out", default=None, help="default: benchmarks/results/accel_check_<device>.json"
  )
  for section, seconds in BUDGET_S.items():
    parser.add_argument(
      f"--{section}_s",
      type=float,
      default=seconds,
      help=f"hard budget of the {section} section (seconds)",
    )
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_keys", default="[]", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  if args._child:
    return _child_main(args._child, args.smoke, json.loads(args._keys))
  start = time.time()
  info = device_info()
  if info["backend"] == "cpu" and not args.smoke:
    print(
      "accel_check measures a GPU or TPU, but JAX sees only the CPU (backend 'cpu'). "
      "Install jax for the accelerator (pip install 'jax[cuda12]==<jax version>' or "
      "'jax[tpu]==<jax version>') on a machine that has one; CPU numbers come from "
      "`python -m benchmarks.run_all`. `--smoke` runs tiny shapes anywhere.",
      file=sys.stderr,
    )
    return 2
  sheet = info["datasheet"]
  print(
    f"device: {info['device_count']} x {info['device_kind']} ({info['backend']}), "
    f"jax {info['jax_version']}, memory limit "
    + (common.fmt_bytes(info['bytes_limit']) if info['bytes_limit'] else "n/a")
    + (
      f"; {sheet['source']} datasheet bf16 {sheet['bf16_flops'] / 1e12:.0f} TFLOP/s, "
      f"int8 {sheet['int8_ops'] / 1e12:.0f} TOP/s, HBM "
      f"{sheet['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
      if sheet
      else "; no datasheet peak known for this device kind (MFU n/a)"
    ),
    flush=True,
  )
  out = args.out or os.path.join(
    common.RESULTS_DIR, f"{NAME}_{device_slug(info['device_kind'])}.json"
  )
  results = {
    "device": info,
    "smoke": args.smoke,
    "shapes": SHAPES["smoke" if args.smoke else "device"],
    "budgets_s": {s: getattr(args, f"{s}_s") for s in BUDGET_S},
  }
  keys = {s: fns[0](args.smoke) for s, fns in SECTIONS.items()}
  launchers = {s: _launcher(s, args.smoke) for s in SECTIONS}
  run_sections(
    results, results["budgets_s"], launchers, keys, lambda: _write(out, results, args.smoke)
  )
  results["wall_s"] = time.time() - start
  _write(out, results, args.smoke)
  print(f"wrote {out}")
  failed = [r["key"] for r in results["parity"] if r.get("ok") is False or "error" in r]
  print(f"accel_check done in {results['wall_s']:.0f} s; parity failures: {failed or 'none'}")
  return 1 if failed else 0


# --------------------------------------------------------------------------------- report


def _gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f}"


def targets(r: dict | None, res: dict) -> list[list]:
  """The RESULTS.md targets rows (`benchmarks.report`): the device targets are read off the
  section; without a device run, a row saying so."""
  if r and not r.get("smoke"):
    return []
  return [
    [
      "on a device: MatMul-free >= 1.3x paper per-GPU, int8 >= 1.3x bf16 step, "
      "Pallas recurrence >= 2.5x associative",
      "no accelerator run exists yet (`python -m benchmarks.accel_check` is ready)",
      common.yes(None),
    ]
  ]


def markdown(r: dict | None, res: dict) -> str:
  """The RESULTS.md section of a device run (`benchmarks.report`), or how to make one."""
  if not r or r.get("smoke"):
    return (
      "## 10. Device check (`accel_check`)\n\nNo accelerator run exists yet. On a GPU "
      "or TPU host, `python -m benchmarks.accel_check` (< 8 minutes) checks kernel "
      "parity on the device and measures train tokens/s, MFU and peak memory at the "
      "370M shape for every scan_type / bitlinear_impl and Transformer++, and decode "
      "at 1k/16k context; it writes `results/accel_check_<device>.json`, from which "
      "this section is rebuilt."
    )
  dev = r["device"]
  lines = [
    f"## 10. Device check (`accel_check`, {dev['device_count']} x {dev['device_kind']})",
    "",
    "| variant | tokens/s | MFU (bf16 datasheet) | compiled peak GiB | measured "
    "peak GiB (own process) | vs best Transformer++ |",
    "|---|---|---|---|---|---|",
  ]
  for t in r.get("train", []):
    name = t.get("variant", t.get("key"))
    if "tokens_per_s" in t:
      mfu = t.get("mfu_vs_bf16_datasheet")
      lines.append(
        f"| {name} | {t['tokens_per_s']:,.0f} | "
        + (f"{mfu:.1%}" if mfu is not None else "-")
        + f" | {_gib(t.get('compiled_peak_bytes'))} | "
        f"{_gib(t.get('measured_peak_bytes'))} | "
        f"{t.get('vs_best_transformer', float('nan')):.2f}x |"
      )
    else:
      lines.append(f"| {name} | {t.get('error') or t.get('skipped')} | | | | |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
