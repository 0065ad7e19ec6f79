"""The longest single training sequence that fits a TPU slice, compiled on this CPU host.

    python -m benchmarks.aot_long_context [--only mmfree/4] [--timeout_s 1800]

Issue 27 item 5, for the 370M recipes (`mmfree_jax.config.paper_config`: bf16 compute, fp32
params + AdamW) on v5p-8 (`v5p:2x2x1`, 4 chips of 95 GB): the real train step
(`steps.make_train_step`, the trainer's shardings and donation) with one sequence per data
shard, `remat=full`, the chunked loss (`train.loss_chunk_tokens` = `LOSS_CHUNK_PER_CHIP`
positions per context shard: no `[tokens, vocab]` logits) and the sequence split over
`context` chips: `context` = all 4 chips (mesh data 1, context 4), or 1 (mesh fsdp 4: each
chip holds its own whole sequence, the parameters and optimizer state sharded 4 ways).

Search, per (model, context): compiled per-chip memory is close to linear in the sequence, so
two compiles at `PROBE_TOKENS_PER_CHIP` fit `peak = a + b * tokens`; the longest length under
`TARGET_FRACTION` of the HBM (rounded down to `ROUND_PER_CHIP` per chip) is then compiled to
verify. A probe the compiler refuses still counts: libtpu's OOM message gives the bytes the
program needed. Each compile runs in its own process (libtpu's memory is returned at exit);
points are cached in `results/aot_long_context.json` with the code version, so a stopped run
resumes. Memory is XLA's compiled `memory_analysis` for the TPU target; nothing is run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from benchmarks import aot_tpu, common  # pylint: disable=g-import-not-at-top

RESULTS_PATH = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "results", "aot_long_context.json"
)
SIZE, CHIP, REMAT = "370m", "v5p", "full"
SEARCHES = (("mmfree", 4), ("transformer", 1), ("mmfree", 1), ("transformer", 4))
PROBE_TOKENS_PER_CHIP = (65536, 131072)
LOSS_CHUNK_PER_CHIP = 2048
ROUND_PER_CHIP = 8192
TARGET_FRACTION = 0.97  # of the HBM: XLA's estimate and the compiler's limit differ slightly
TARGET_TOKENS = 2**20  # issue 27: the MatMul-free 370M fits a >= 1M-token sequence on v5p-8
TARGET_RATIO = 4.0  # ... and >= 4x the longest Transformer++ sequence on the same slice


def mesh_shape(context: int) -> dict:
  """All chips on `context`, or (context 1) each chip its own sequence with fsdp params."""
  chips = aot_tpu.CHIPS[CHIP].chips
  if context == 1:
    return {"data": 1, "fsdp": chips, "context": 1, "tensor": 1}
  return {"data": chips // context, "fsdp": 1, "context": context, "tensor": 1}


def compile_point(kind: str, context: int, seq: int) -> dict:
  """Lowers and compiles the train step of one `seq`-token sequence per data shard."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies

  from mmfree_jax.parallel import mesh as mesh_lib
  from mmfree_jax.parallel import sharding
  from mmfree_jax.train import optim, steps
  from mmfree_jax.train import state as state_lib

  cfg, model_cfg = aot_tpu.model_config(kind, SIZE, REMAT)
  devices = topologies.get_topology_desc(aot_tpu.CHIPS[CHIP].topology, "tpu").devices
  shape = mesh_shape(context)
  mesh = mesh_lib.make_mesh(shape, devices)
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
    steps.make_train_step(
      model_cfg,
      state_lib.model_graphdef(model_cfg),
      tx,
      optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
      loss_chunk_tokens=LOSS_CHUNK_PER_CHIP * context,
      mesh=mesh,
      rules=rules,
    ),
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  rows = shape["data"] * shape["fsdp"]
  window = jax.ShapeDtypeStruct((rows, seq + 1), jnp.int32, sharding=batch_sharding)
  abstract = state_lib.abstract_train_state(model_cfg, tx, shardings)
  t0 = time.perf_counter()
  lowered = step.lower(abstract, {"tokens": window, "segment_ids": window})
  out = {"mesh": shape, "rows": rows, "seq": seq, "lower_s": round(time.perf_counter() - t0, 1)}
  out["model"] = {k: getattr(model_cfg, k) for k in ("scan_type", "attention_impl", "remat")}
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # the TPU compiler refuses a program that does not fit
    out["compile_s"] = round(time.perf_counter() - t1, 1)
    oom = aot_tpu.parse_oom(str(e))
    status = {"status": "oom", **oom} if oom else {"status": "error", "error": str(e)[:600]}
    return {**out, **status}
  out["compile_s"] = round(time.perf_counter() - t1, 1)
  return {**out, "status": "fits", "memory": common.memory_stats(compiled)}


def run_point_subprocess(kind: str, context: int, seq: int, timeout_s: int) -> dict:
  """One compile per process (libtpu's compiler memory is returned when it ends)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  spec = json.dumps({"kind": kind, "context": context, "seq": seq})
  cmd = [sys.executable, "-m", "benchmarks.aot_long_context", "--_point", spec]
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"status": "error", "error": f"compile timed out after {timeout_s} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("AOT_RESULT "):
      return json.loads(line[len("AOT_RESULT ") :])
  return {"status": "error", "error": f"exit {proc.returncode}: {proc.stderr[-600:]}"}


def peak_bytes(point: dict) -> float | None:
  """Per-chip bytes a point needs: its compiled peak, or what the compiler's refusal names."""
  if point.get("status") == "fits":
    return float(point["memory"]["peak_bytes"])
  if point.get("status") == "oom" and point.get("oom_counts") == "all":
    return float(point["used_bytes"])
  return None


def extrapolate(points: list[dict], context: int, hbm: float) -> dict:
  """The line `peak = base + slope * tokens_per_chip` through two probes, and the longest
  sequence under `TARGET_FRACTION * hbm`, rounded down to `ROUND_PER_CHIP` tokens per chip
  (at least one step). (The Transformer++ split over context also holds one layer's gathered
  `[seq, kv]` K/V whole on each chip: linear in the sequence too.)"""
  (t0, p0), (t1, p1) = [(p["seq"] / context, peak_bytes(p)) for p in points]
  slope = (p1 - p0) / (t1 - t0)
  base = p0 - slope * t0
  per_chip = max(int((TARGET_FRACTION * hbm - base) / slope) // ROUND_PER_CHIP, 1)
  return {"base_bytes": base, "slope_bytes": slope, "seq": per_chip * ROUND_PER_CHIP * context}


class Points:
  """The compiled points `{kind/context/seq: result}` in the results file."""

  def __init__(self, path: str):
    self.path = path
    self.data = {"benchmark": "aot_long_context", "points": {}, "searches": {}}
    self.written = {"points": set(), "searches": set()}  # keys this process wrote
    self.save()

  def get(self, kind, context, seq, timeout_s, log) -> dict:
    key = f"{kind}/{context}/{seq}"
    self.save()  # what other runs (`--only` pieces) compiled since
    point = self.data["points"].get(key)
    if point is None or point["status"] == "error":
      log(f"compiling {key} ...")
      point = run_point_subprocess(kind, context, seq, timeout_s)
      point["code"] = aot_tpu._code_version()  # pylint: disable=protected-access
      self.data["points"][key] = point
      self.written["points"].add(key)
      self.save()
      log(
        f"  {key}: {point['status']} in {point.get('compile_s', 0):.0f} s, needs "
        f"{(peak_bytes(point) or 0) / 2**30:.2f} GiB/chip"
      )
    return point

  def save(self):
    """Writes the file: what is on disk (other runs' points too), with this run's own keys."""
    if os.path.exists(self.path):
      with open(self.path) as f:
        disk = json.load(f)
      for part, mine in self.written.items():
        ours = {k: self.data[part][k] for k in mine}
        self.data[part] = {**disk.get(part, {}), **ours}
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = self.path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)


def search(points: Points, kind: str, context: int, timeout_s: int, log=print) -> dict:
  """Two probes, the extrapolated longest sequence, one compile to verify it (and one step
  of `ROUND_PER_CHIP` per chip down if the compiler refuses it)."""
  hbm = aot_tpu.CHIPS[CHIP].chip.hbm_bytes
  probes = [points.get(kind, context, t * context, timeout_s, log) for t in PROBE_TOKENS_PER_CHIP]
  if any(peak_bytes(p) is None for p in probes):
    return {"kind": kind, "context": context, "fits_seq": None, "probes": probes}
  line = extrapolate(probes, context, hbm)
  seq, verified = line["seq"], None
  for _ in range(2):
    verified = points.get(kind, context, seq, timeout_s, log)
    if verified["status"] == "fits" or seq <= ROUND_PER_CHIP * context:
      break
    seq -= ROUND_PER_CHIP * context
  fits = [p["seq"] for p in probes + [verified] if p["status"] == "fits"]
  result = {"kind": kind, "context": context, "mesh": mesh_shape(context), **line}
  result.update(fits_seq=max(fits) if fits else None, verified=verified, hbm_bytes=hbm)
  points.data["searches"][f"{kind}/{context}"] = result
  points.written["searches"].add(f"{kind}/{context}")
  points.save()
  return result


def estimated_step_s(kind: str, seq: int) -> float:
  """ESTIMATE, compute bound: the step's analytic FLOPs (6N + causal attention at `seq`, plus
  remat=full's recomputed forward) over the slice's datasheet bf16 peak; never measured."""
  from mmfree_jax import accounting

  _, model_cfg = aot_tpu.model_config(kind, SIZE, REMAT)
  per_token = accounting.train_flops_per_token(model_cfg, seq)
  per_token += accounting.forward_flops_per_token(model_cfg, seq)  # remat=full's recompute
  sl = aot_tpu.CHIPS[CHIP]
  return per_token * seq / (sl.chips * sl.chip.bf16_flops)


def _refusal(point: dict) -> str:
  """A verifying compile that did not fit: the bytes it needed, or the compiler's error."""
  if not point:
    return "verifying compile not finished"
  if point.get("status") == "oom":
    return f"over HBM ({_gib(peak_bytes(point))} needed)"
  return "compile error: " + point.get("error", "?").split(" :: ")[0][:160]


def _gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f}"


def _searches(result: dict) -> list[dict]:
  return [s for k, s in sorted((result or {}).get("searches", {}).items())]


def _longest(result: dict, kind: str) -> int | None:
  found = [s["fits_seq"] for s in _searches(result) if s["kind"] == kind and s["fits_seq"]]
  return max(found) if found else None


def targets(result: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows (`benchmarks.report`)."""
  del res
  mmfree, transformer = _longest(result, "mmfree"), _longest(result, "transformer")
  rows = []
  if mmfree:
    rows.append(
      [
        "370M MatMul-free fits a >= 1M-token single sequence on v5p-8 (context parallelism, "
        "chunked loss; XLA TPU compile on CPU)",
        f"{mmfree:,} tokens",
        common.yes(mmfree >= TARGET_TOKENS),
      ]
    )
  if mmfree and transformer:
    rows.append(
      [
        f"... and >= {TARGET_RATIO:g}x the longest 370M Transformer++ sequence on v5p-8",
        f"{mmfree / transformer:.2f}x ({transformer:,} tokens)",
        common.yes(mmfree / transformer >= TARGET_RATIO),
      ]
    )
  return rows


def markdown(result: dict, res: dict) -> str:
  """The RESULTS.md section (`benchmarks.report`)."""
  del res
  searches = _searches(result)
  if not searches:
    return ""
  rows = []
  for s in searches:
    v = s.get("verified") or {}
    m = v.get("memory", {})
    mesh = "/".join(str(s["mesh"][a]) for a in ("data", "fsdp", "context", "tensor"))
    rows.append(
      [
        f"{s['kind']} {SIZE}",
        mesh,
        f"{s['fits_seq']:,}" if s["fits_seq"] else "-",
        f"{s['seq']:,}",
        f"{s['slope_bytes'] / 1024:.1f}",
        _gib(s["base_bytes"]),
        _gib(m.get("argument_bytes")),
        _gib(m.get("temp_bytes")),
        _gib(m.get("peak_bytes")) if m else _refusal(v),
        f"{v.get('compile_s', 0):.0f}",
        f"{estimated_step_s(s['kind'], s['fits_seq']):,.1f}" if s["fits_seq"] else "-",
      ]
    )
  header = [
    "model",
    "mesh d/f/c/t",
    "longest compiled seq",
    "extrapolated seq",
    "KiB/token/chip",
    "fixed GiB",
    "args GiB",
    "temp GiB",
    "peak GiB",
    "compile s",
    "EST. step s at the longest",
  ]
  hbm = aot_tpu.CHIPS[CHIP].chip.hbm_bytes
  return "\n".join(
    [
      "## 9c. Long context: the longest single sequence per step on v5p-8 (`aot_long_context`)",
      "",
      f"The 370M train step (bf16 compute, fp32 params + AdamW, remat {REMAT}, chunked loss of "
      f"{LOSS_CHUNK_PER_CHIP} positions per chip) with one sequence per data shard, compiled "
      f"for v5p-8 (4 chips, {hbm / 1e9:.0f} GB HBM each) with libtpu on this CPU host. "
      "Context 4: the sequence split over all 4 chips; context 1: each chip its own sequence "
      "(params fsdp-sharded). Per-chip memory is XLA's compiled memory analysis; the line "
      "`fixed + KiB/token/chip x tokens per chip` through two probe compiles gives the "
      f"extrapolated length at {TARGET_FRACTION:.0%} of the HBM, which is then compiled "
      "(its memory and compile time are the columns; the longest compiled length is the "
      "longest that compiled and fits). **Step times are ESTIMATES**, compute bound: analytic "
      "FLOPs (6N, causal attention at that length, remat's recomputed forward) over the "
      "4 chips' datasheet bf16 peak; never measured.",
      "",
      common.md_table(header, rows),
      "",
      "Compiled from code "
      + ", ".join(sorted({p.get("code", "?") for p in (result.get("points") or {}).values()}))
      + " (`git describe` of each point's compile; the searches ran while main moved).",
    ]
  )


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--_point":
    result = compile_point(**json.loads(argv[1]))
    print("AOT_RESULT " + json.dumps(result), flush=True)
    return 0
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.aot_long_context", description=__doc__
  )
  parser.add_argument("--only", default="", help="kind/context filters, e.g. 'mmfree/4,*/1'")
  parser.add_argument("--timeout_s", type=int, default=3600, help="per compile")
  parser.add_argument("--results", default=RESULTS_PATH)
  args = parser.parse_args(argv)
  filters = [f.split("/") for f in args.only.split(",") if f] or [["*", "*"]]
  points = Points(args.results)
  for kind, context in SEARCHES:
    if any(all(p in ("*", v) for p, v in zip(f, (kind, str(context)))) for f in filters):
      log = lambda m, k=kind, c=context: print(f"[{k}/{c}] {m}", flush=True)
      s = search(points, kind, context, args.timeout_s, log)
      log(f"longest compiled: {s['fits_seq']}")
  print(markdown(points.data, {}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
