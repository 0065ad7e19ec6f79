"""TPU memory fit and roofline ESTIMATES for the paper's recipes, compiled on a CPU host.

    python -m benchmarks.aot_tpu [--only mmfree/370m/v5e] [--refresh] [--jobs 2] [--dry_run]

For MatMul-free and Transformer++ at 370M / 1.3B / 2.7B (`mmfree_jax.config.paper_config`:
bf16 compute, fp32 params, AdamW) and three TPU slices, the real train step (the trainer's
`steps.make_train_step` under a `data x fsdp x tensor` mesh, the same shardings and donation)
is lowered and compiled for the TPU topology with libtpu (`pip install "jax[tpu]"`; no TPU
needed: `jax.experimental.topologies.get_topology_desc`). 256 x 2048 tokens per step.

Slices (GCP name -> libtpu topology name; a v5p "-8" slice counts TensorCores, 2 per chip):

    v5e-8 -> v5e:2x4 (8 chips)   v5p-8 -> v5p:2x2x1 (4 chips)   v6e-8 -> v6e:2x4 (8 chips)

Search, per (model, size, slice): the grid mesh x microbatches (gradient accumulation) x remat
policy is ranked by the analytic step-time ESTIMATE below, then compiled in that order until
one fits the chip's HBM (the compiler refuses a program that does not); that one is reported.
Points predicted (from the points compiled so far, temporaries linear in the rows per
microbatch) to need more than the HBM are skipped without compiling (a compile takes
minutes). Each compiled point is cached in `results/aot_tpu.json` (key = the point,
with the code version it was compiled from), so the script can be stopped and resumed, and run
in pieces with `--only`; `--refresh` recompiles the selected searches after a code change.

Reported per point: compiled per-chip memory (XLA memory_analysis: arguments, temporaries,
peak = arguments + outputs + temporaries - donated aliases) and XLA `cost_analysis()` FLOPs
and bytes AS REPORTED (XLA counts a while-loop body once: the scans over microbatches, layers
and time are undercounted, so they are not used). For MatMul-free the chosen point is
compiled again with `model.bitlinear_impl=int8`: the int8 column is only filled where that
program compiled and fits. The step-time ESTIMATE is `benchmarks.roofline` (a bound from
datasheet peaks; its HBM term counts only the weight and optimizer traffic), recomputed from
the current code when the table is printed; never a measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU from this host; run nothing
# Several compiles (ours in parallel, other users' tests) may load libtpu at once; only one
# could hold its lock file otherwise.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from benchmarks import common, roofline  # pylint: disable=g-import-not-at-top

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aot_tpu.json")
SIZES = ("370m", "1.3b", "2.7b")
KINDS = ("mmfree", "transformer")
REMATS = ("none", "dots_no_batch", "full")
SKIP_FACTOR = 1.0  # do not compile a point predicted to need more than the HBM
CHIPS = roofline.SLICES
GLOBAL_BATCH, SEQ_LEN = roofline.GLOBAL_BATCH, roofline.SEQ_LEN


def tpu_attention(model_cfg) -> str:
  """What `model.attention_impl` runs in the step compiled for TPU at SEQ_LEN (`ops.attention`
  resolves 'auto' from the mesh's TPU devices): 'splash', 'xla' or 'naive'."""
  from mmfree_jax.ops import attention

  return attention.resolve_attention_impl(
    model_cfg.attention_impl,
    model_cfg.compute_dtype,
    model_cfg.head_dim,
    seq=SEQ_LEN,
    platform="tpu",
  )


def _code_version() -> str:
  """`git describe --always --dirty` of the checkout, stored with each compiled point."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    return (
      subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
      ).stdout.strip()
      or "?"
    )
  except (OSError, subprocess.SubprocessError):
    return "?"


def model_config(kind: str, size: str, remat: str, overrides: dict | None = None):
  from mmfree_jax import config as config_lib

  cfg = config_lib.paper_config(size, kind)
  cfg.model.remat = remat
  for key, value in (overrides or {}).items():
    cfg.model[key] = value
  return cfg, config_lib.validate(cfg)


def param_count(model_cfg) -> int:
  from mmfree_jax import accounting

  return accounting.param_count(model_cfg)


# ------------------------------------------------------------------------------ compilation

_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)([KMGT]?)"
# libtpu's two ways of refusing a program that does not fit the HBM
_OOM_USED = re.compile(rf"Used {_SIZE} of {_SIZE} hbm.*?[Ee]xceeded hbm capacity by {_SIZE}", re.S)
_OOM_TEMPS = re.compile(
  rf"memory required for HLO temporaries \({_SIZE}\) exceeds available "
  rf"HBM \({_SIZE}\)"
)


def parse_oom(msg: str) -> dict | None:
  """`{used_bytes, capacity_bytes, exceeded_bytes}` from a TPU compiler OOM, else None.

  The 'HLO temporaries' form counts temporaries only: the excess it gives is a lower bound
  (the arguments come on top)."""
  size = lambda v, u: float(v) * _UNIT[u]
  m = _OOM_USED.search(msg)
  if m:
    return {
      "used_bytes": size(*m.group(1, 2)),
      "capacity_bytes": size(*m.group(3, 4)),
      "exceeded_bytes": size(*m.group(5, 6)),
      "oom_counts": "all",
    }
  m = _OOM_TEMPS.search(msg)
  if m:
    used, cap = size(*m.group(1, 2)), size(*m.group(3, 4))
    return {
      "used_bytes": used,
      "capacity_bytes": cap,
      "exceeded_bytes": used - cap,
      "oom_counts": "temporaries",
    }
  return None


def _compiled_stats(compiled) -> dict:
  """A compiled step's memory (bytes, with the peak = arguments + outputs + temps - aliased)
  and XLA's cost analysis (flops, bytes accessed; -1 where it has none)."""
  mem = compiled.memory_analysis()
  stats = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "generated_code_bytes": int(mem.generated_code_size_in_bytes),
  }
  stats["peak_bytes"] = (
    stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"] - stats["alias_bytes"]
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
    "memory": stats,
    "xla_flops": float(cost.get("flops", -1)),
    "xla_bytes_accessed": float(cost.get("bytes accessed", -1)),
  }


def compile_point(
  kind: str,
  size: str,
  chip_name: str,
  mesh_shape: dict,
  micro: int,
  remat: str,
  overrides: dict | None = None,
) -> dict:
  """Lowers and compiles the sharded train step for the TPU topology; memory and XLA costs."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import AxisType

  from mmfree_jax.parallel import sharding
  from mmfree_jax.train import optim, steps
  from mmfree_jax.train import state as state_lib

  chip = CHIPS[chip_name]
  cfg, model_cfg = model_config(kind, size, remat, overrides)
  topo = topologies.get_topology_desc(platform="tpu", topology_name=chip.topology)
  axes = ("data", "fsdp", "tensor")
  mesh = jax.make_mesh(
    tuple(mesh_shape[a] for a in axes), axes, axis_types=(AxisType.Auto,) * 3, devices=topo.devices
  )
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  schedule = optim.learning_rate_schedule(cfg.optim, cfg.train.steps)
  state_shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  abstract_state = state_lib.abstract_train_state(model_cfg, tx, state_shardings)
  step = jax.jit(
    steps.make_train_step(
      model_cfg,
      state_lib.model_graphdef(model_cfg),
      tx,
      schedule,
      microbatches=micro,
      mesh=mesh,
      rules=rules,
    ),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  window = jax.ShapeDtypeStruct((GLOBAL_BATCH, SEQ_LEN + 1), jnp.int32, sharding=batch_sharding)
  t0 = time.perf_counter()
  lowered = step.lower(abstract_state, {"tokens": window, "segment_ids": window})
  t1 = time.perf_counter()
  out = {
    "device_kind": topo.devices[0].device_kind,
    "lower_s": t1 - t0,
    "model": {
      k: getattr(model_cfg, k)
      for k in ("scan_type", "bitlinear_impl", "attention_impl", "dtype", "param_dtype", "remat")
      if hasattr(model_cfg, k)
    },
  }
  if kind == "transformer":  # what 'auto' resolved to in this step
    out["model"]["attention"] = tpu_attention(model_cfg)
  try:
    compiled = lowered.compile()
  except Exception as e:  # the TPU compiler refuses a program that does not fit
    msg = str(e)
    out["compile_s"] = time.perf_counter() - t1
    oom = parse_oom(msg)
    if oom:
      out.update(status="oom", **oom)
    else:
      out.update(status="error", error=f"{type(e).__name__}: {msg[:600]}")
    return out
  out["compile_s"] = time.perf_counter() - t1
  out.update(status="fits", **_compiled_stats(compiled))
  return out


def _worker_main(argv) -> int:
  """`--_point JSON`: compile one point in this process, print its JSON as the last line."""
  spec = json.loads(argv[0])
  result = compile_point(**spec)
  print("AOT_RESULT " + json.dumps(result), flush=True)
  return 0


def run_point_subprocess(spec: dict, timeout_s: int) -> dict:
  """One compile per process: libtpu's compiler memory is returned when the process ends."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  try:
    proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.aot_tpu", "--_point", json.dumps(spec)],
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout_s,
    )
  except subprocess.TimeoutExpired:
    return {"status": "error", "error": f"compile timed out after {timeout_s} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("AOT_RESULT "):
      return json.loads(line[len("AOT_RESULT ") :])
  return {"status": "error", "error": f"exit {proc.returncode}: {proc.stderr[-600:]}"}


# ---------------------------------------------------------------------------------- search


def _key(kind, size, chip, mesh, micro, remat) -> str:
  return f"{kind}/{size}/{chip}/d{mesh['data']}f{mesh['fsdp']}t{mesh['tensor']}/mb{micro}/{remat}"


class Cache:
  """The compiled points, `{key: result}`, in one JSON file shared by resumed/parallel runs."""

  def __init__(self, path: str, code: str, refresh: bool = False):
    self.path, self.code, self.refresh = path, code, refresh
    self.lock = threading.Lock()
    self.fresh = set()  # keys compiled by this run
    self.points = {}
    if os.path.exists(path):
      with open(path) as f:
        self.points = json.load(f).get("points", {})

  def get(self, key):
    """A cached point; errors (a crashed or timed-out compile) are retried, not cached."""
    if self.refresh and key not in self.fresh:
      return None
    point = self.points.get(key)
    return None if point is None or point.get("status") == "error" else point

  def put(self, key, value):
    value["code"] = self.code
    with self.lock:
      self.fresh.add(key)
      self.points[key] = value
    self.save()

  def save(self, extra: dict | None = None):
    with self.lock:
      self._save(extra)

  def _save(self, extra):
    payload = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        payload = json.load(f)
    on_disk = payload.get("points", {})
    on_disk.update(self.points)  # other processes (--only pieces) may have written points
    self.points = on_disk
    payload["points"] = on_disk
    extra = dict(extra or {})
    if "searches" in extra:  # merge: parallel searches each add their own entry
      extra["searches"] = {**payload.get("searches", {}), **extra["searches"]}
    payload.update(extra)
    payload["benchmark"] = "aot_tpu"  # benchmarks.report indexes result files by this
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = self.path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)


# Prior for the temporaries per token per layer, in units of d_model bytes, before a point of
# the same model is compiled (370M MatMul-free on v5e: remat none 20.4 GiB at 2 rows/chip,
# dots_no_batch 7.5 GiB at 4 rows/chip); compiled points replace it.
PRIOR_SAVED_BYTES = {"none": 200, "dots_no_batch": 40, "full": 12}


def _prior_peak(model_cfg, n_params, mesh, rows, remat) -> float:
  state = 16 * n_params / (mesh["fsdp"] * mesh["tensor"])  # params, moments, grads (fp32)
  act = PRIOR_SAVED_BYTES[remat] * model_cfg.d_model * model_cfg.num_layers * rows * SEQ_LEN
  logits = 3 * 4 * model_cfg.vocab_size * rows * SEQ_LEN
  if (
    model_cfg.kind == "transformer" and remat == "none" and tpu_attention(model_cfg) != "splash"
  ):  # saved T x T probabilities (XLA attention)
    act += 6 * model_cfg.num_layers * model_cfg.num_heads * SEQ_LEN**2 * rows
  return state + (act + logits) / mesh["tensor"]


def _predicted_peak(cache: Cache, kind, size, chip_name, mesh, micro, remat) -> float | None:
  """Peak bytes predicted from a compiled point of the same model/mesh/remat (temporaries
  scale with the rows per microbatch, arguments stay), else from another slice's point of
  the same size; None without one (then the prior decides)."""
  rows = GLOBAL_BATCH // micro // (mesh["data"] * mesh["fsdp"])
  best = None
  for key, p in cache.points.items():
    if (
      p.get("status") not in ("fits", "oom")
      or (cache.refresh and key not in cache.fresh)
      or key.endswith(INT8_SUFFIX)
    ):
      continue
    k_kind, k_size, k_chip, k_mesh, k_mb, k_remat = key.split("/")
    if (k_kind, k_remat) != (kind, remat):
      continue
    k_micro = int(k_mb[2:])
    dd, ff, tt = (int(x) for x in re.findall(r"\d+", k_mesh))
    k_rows = GLOBAL_BATCH // k_micro // (dd * ff)
    same = (k_size, k_chip, k_mesh) == (size, chip_name, _mesh_str(mesh))
    if p["status"] == "fits":
      args, temp = p["memory"]["argument_bytes"], p["memory"]["temp_bytes"]
    else:
      args, temp = 0.0, p["used_bytes"]
    pred = args + temp * rows / k_rows
    if same:
      return pred
    if best is None and k_size == size:
      best = pred * (tt / mesh["tensor"])
  return best


def _mesh_str(mesh):
  return f"d{mesh['data']}f{mesh['fsdp']}t{mesh['tensor']}"


def _compile_into(cache: Cache, key: str, spec: dict, extra: dict, timeout: int, log) -> dict:
  log(f"compiling {key} ...")
  point = run_point_subprocess(spec, timeout)
  point.update(extra)
  cache.put(key, point)
  log(
    f"  {key}: {point['status']} in {point.get('compile_s', 0):.0f} s"
    + (
      f", peak {point['memory']['peak_bytes'] / 2**30:.2f} GiB" if point["status"] == "fits" else ""
    )
  )
  return point


def _candidates(kind: str, size: str, chip_name: str, n_params: int) -> list[tuple]:
  """(estimated step s, mesh, microbatches, remat) of every point, best first; ties
  (compute-bound points) go to fewer microbatches, then less recomputation."""
  sl, out = CHIPS[chip_name], []
  for mesh in roofline.mesh_candidates(sl.chips):
    dp = mesh["data"] * mesh["fsdp"]
    for rows in (1, 2, 4, 8, 16, 32, 64):
      if GLOBAL_BATCH % (rows * dp):
        continue
      micro = GLOBAL_BATCH // (rows * dp)
      for remat in REMATS:
        _, model_cfg = model_config(kind, size, remat)
        est = roofline.estimate(model_cfg, n_params, sl, mesh, micro, remat)
        out.append((est["step_s"], mesh, micro, remat))
  return sorted(out, key=lambda c: (round(c[0], 6), c[2], REMATS.index(c[3])))


def search(
  kind: str, size: str, chip_name: str, cache: Cache, *, jobs_timeout: int, dry_run: bool, log=print
) -> dict:
  """Compiles the points of `_candidates` in order until one fits; for MatMul-free, that
  point again with `bitlinear_impl=int8` (key + "/int8")."""
  chip = CHIPS[chip_name]
  _, model_cfg0 = model_config(kind, size, "none")
  n_params = param_count(model_cfg0)
  tried = []
  for est_s, mesh, micro, remat in _candidates(kind, size, chip_name, n_params):
    key = _key(kind, size, chip_name, mesh, micro, remat)
    point = cache.get(key)
    if point is None:
      pred = _predicted_peak(cache, kind, size, chip_name, mesh, micro, remat)
      if pred is None:
        rows = GLOBAL_BATCH // micro // (mesh["data"] * mesh["fsdp"])
        _, model_cfg = model_config(kind, size, remat)
        pred = _prior_peak(model_cfg, n_params, mesh, rows, remat)
      if pred > SKIP_FACTOR * chip.chip.hbm_bytes:
        tried.append({"key": key, "status": "skipped", "predicted_peak_bytes": pred})
        continue
      if dry_run:
        log(f"would compile {key} (estimate {est_s:.3f} s)")
        return {"chosen": None, "tried": tried}
      spec = dict(
        kind=kind, size=size, chip_name=chip_name, mesh_shape=mesh, micro=micro, remat=remat
      )
      extra = dict(mesh=mesh, microbatches=micro, remat=remat, n_params=n_params)
      point = _compile_into(cache, key, spec, extra, jobs_timeout, log)
    tried.append({"key": key, "status": point["status"]})
    if point["status"] == "fits":
      if kind == "mmfree" and cache.get(key + INT8_SUFFIX) is None:
        extra = {k: cache.points[key][k] for k in ("mesh", "microbatches", "remat", "n_params")}
        _compile_into(
          cache, key + INT8_SUFFIX, dict(spec_of(key), overrides=INT8), extra, jobs_timeout, log
        )
      return {"chosen": key, "tried": tried}
  return {"chosen": None, "tried": tried}


INT8 = {"bitlinear_impl": "int8"}
INT8_SUFFIX = "/int8"


def spec_of(key: str) -> dict:
  """The compile spec of a point key `kind/size/chip/d?f?t?/mb?/remat`."""
  kind, size, chip_name, mesh, mb, remat = key.split("/")[:6]
  d, f, t = (int(x) for x in re.findall(r"\d+", mesh))
  return dict(
    kind=kind,
    size=size,
    chip_name=chip_name,
    micro=int(mb[2:]),
    remat=remat,
    mesh_shape={"data": d, "fsdp": f, "tensor": t},
  )


def _fitted_row(cache: Cache, kind: str, size: str, chip_name: str, key: str) -> dict:
  """The chosen point's compiled memory and its roofline (recomputed by the current code),
  the int8 program's compile, and the like-for-like comparison with the paper."""
  p, sl = cache.points[key], CHIPS[chip_name]
  _, model_cfg = model_config(kind, size, p["remat"])
  est = roofline.estimate(model_cfg, p["n_params"], sl, p["mesh"], p["microbatches"], p["remat"])
  row = dict(
    fits=True,
    key=key,
    mesh=p["mesh"],
    microbatches=p["microbatches"],
    remat=p["remat"],
    memory=p["memory"],
    compile_s=p["compile_s"],
    xla_flops=p["xla_flops"],
    xla_bytes_accessed=p["xla_bytes_accessed"],
    xla_flops_over_analytic=p["xla_flops"] / est["flops_analytic_hw"],
    n_params=p["n_params"],
    tokens_per_chip_step=GLOBAL_BATCH * SEQ_LEN / sl.chips,
  )
  int8_tok = est.pop("int8_tokens_per_s_chip", None)
  est.pop("int8_step_s", None)
  if kind == "mmfree":
    q = cache.points.get(key + INT8_SUFFIX)
    row["int8"] = {"status": q["status"] if q else "not compiled"}
    if q and q["status"] == "fits":  # an estimate only for a program that compiled
      row["int8"].update(
        memory=q["memory"],
        tokens_per_s_chip=int8_tok,
        model=q.get("model", {}),
        code=q.get("code", "?"),
      )
    row["vs_paper"] = roofline.vs_paper(
      model_cfg, size, sl.chip, est["tokens_per_s_chip"], p["remat"]
    )
  row["estimate"] = est
  return row


def summarize(cache: Cache) -> list[dict]:
  """One row per (model, size, slice): the chosen point or the closest miss."""
  rows = []
  searches = cache_searches(cache)
  for kind, size, chip_name in [(k, s, c) for k in KINDS for s in SIZES for c in CHIPS]:
    s = searches.get((kind, size, chip_name))
    chip = CHIPS[chip_name]
    row = {
      "kind": kind,
      "size": size,
      "slice": chip.slice_name,
      "chips": chip.chips,
      "topology": chip.topology,
      "hbm_bytes": chip.chip.hbm_bytes,
    }
    if s is None:  # never searched (or a search that was stopped before it finished)
      row.update(
        fits=None,
        tried=[
          {"key": k, "status": p["status"]}
          for k, p in cache.points.items()
          if k.startswith(f"{kind}/{size}/{chip_name}/")
        ],
      )
    elif s["chosen"]:
      row.update(tried=s["tried"], **_fitted_row(cache, kind, size, chip_name, s["chosen"]))
    else:
      misses = [cache.points[t["key"]] for t in s["tried"] if t["status"] == "oom"]
      row.update(tried=s["tried"], fits=False)
      if misses:
        best = min(misses, key=lambda p: p["exceeded_bytes"])
        row.update(closest_miss=best, exceeded_bytes=best["exceeded_bytes"])
    rows.append(row)
  return rows


def cache_searches(cache: Cache) -> dict:
  return {tuple(k.split("/")): v for k, v in cache_searches_raw(cache).items()}


def cache_searches_raw(cache: Cache) -> dict:
  if not os.path.exists(cache.path):
    return {}
  with open(cache.path) as f:
    return json.load(f).get("searches", {})


def save_search(cache: Cache, kind, size, chip_name, result):
  searches = cache_searches_raw(cache)
  searches[f"{kind}/{size}/{chip_name}"] = result
  cache.save({"searches": searches})


def print_table(rows: list[dict]) -> None:
  print(
    f"{'model':12s} {'slice':6s} {'mesh d/f/t':10s} {'mb':>3s} {'remat':14s} "
    f"{'args GiB':>8s} {'temp GiB':>8s} {'peak GiB':>8s} {'est tok/s/chip':>14s} "
    f"{'bound':>7s}  (ESTIMATE)"
  )
  for r in rows:
    name = f"{r['kind']}-{r['size']}"
    if r["fits"] is None:
      print(f"{name:12s} {r['slice']:6s} not searched yet")
      continue
    if not r["fits"]:
      by = r.get("exceeded_bytes")
      print(
        f"{name:12s} {r['slice']:6s} does not fit"
        + (f" (closest: over HBM by {by / 2**30:.2f} GiB)" if by else " (nothing compiled)")
      )
      continue
    m, e = r["memory"], r["estimate"]
    mesh = f"{r['mesh']['data']}/{r['mesh']['fsdp']}/{r['mesh']['tensor']}"
    print(
      f"{name:12s} {r['slice']:6s} {mesh:10s} {r['microbatches']:3d} {r['remat']:14s} "
      f"{m['argument_bytes'] / 2**30:8.2f} {m['temp_bytes'] / 2**30:8.2f} "
      f"{m['peak_bytes'] / 2**30:8.2f} {e['tokens_per_s_chip']:14,.0f} {e['bound']:>7s}"
    )


def _parse_args(argv) -> argparse.Namespace:
  """The command line of `main` (its internal `--_point` worker form excepted)."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.aot_tpu",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--only",
    default="",
    help="comma-separated filters kind/size/chip, '*' for any part, e.g. "
    "'mmfree/370m/v5e,transformer/*/v5p'",
  )
  parser.add_argument("--jobs", type=int, default=1, help="searches run in parallel")
  parser.add_argument("--timeout_s", type=int, default=1800, help="per compile")
  parser.add_argument("--results", default=RESULTS_PATH)
  parser.add_argument("--dry_run", action="store_true", help="print what would compile")
  parser.add_argument(
    "--refresh", action="store_true", help="recompile the selected searches (ignore cached points)"
  )
  parser.add_argument(
    "--table", action="store_true", help="only print the cached table (writes nothing)"
  )
  return parser.parse_args(argv)


def _results_payload(rows: list[dict]) -> dict:
  """What the results file holds: the summary rows, the shapes and chips they are for, the
  paper's reference and the notes on reading the estimates."""
  return {
    "rows": rows,
    "global_batch": GLOBAL_BATCH,
    "seq_len": SEQ_LEN,
    "chips": {
      k: dict(
        dataclasses.asdict(v.chip), slice_name=v.slice_name, topology=v.topology, chips=v.chips
      )
      for k, v in CHIPS.items()
    },
    "paper_h100_tokens_per_s": roofline.PAPER_H100_TOKENS_PER_S,
    "paper_gpu": roofline.PAPER_GPU,
    "unix_time": time.time(),
    "notes": [
      "every step time / tokens/s is an ESTIMATE from datasheet peaks "
      "(benchmarks.roofline: max of compute, known HBM traffic, ICI), not "
      "a measurement; vs_paper compares like with like (bound vs bound, "
      "or both chips at the paper's MFU)",
      "xla_flops/xla_bytes_accessed are XLA cost_analysis as reported: "
      "loop bodies (microbatch, layer and time scans) are counted once",
      "memory is XLA's compiled memory_analysis per chip for the TPU target",
    ],
  }


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--_point":
    return _worker_main(argv[1:])
  args = _parse_args(argv)
  cache = Cache(args.results, _code_version(), refresh=args.refresh)
  if args.table:  # reading: the cached points as they are, nothing written
    print_table(summarize(cache))
    return 0
  try:
    import libtpu  # noqa: F401  (jax[tpu] brings it)
  except ImportError:
    print(
      "aot_tpu needs libtpu to compile for TPU: pip install 'jax[tpu]==<your jax>'", file=sys.stderr
    )
    return 2
  filters = [f.split("/") for f in args.only.split(",") if f] or [["*", "*", "*"]]

  def wanted(k, s, c):
    return any(all(p in ("*", v) for p, v in zip(flt + ["*"] * 3, (k, s, c))) for flt in filters)

  todo = [(k, s, c) for k in KINDS for s in SIZES for c in CHIPS if wanted(k, s, c)]

  def one(item):
    kind, size, chip_name = item
    result = search(
      kind,
      size,
      chip_name,
      cache,
      jobs_timeout=args.timeout_s,
      dry_run=args.dry_run,
      log=lambda m: print(f"[{kind}/{size}/{chip_name}] {m}", flush=True),
    )
    if not args.dry_run:
      save_search(cache, kind, size, chip_name, result)
    return result

  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    list(pool.map(one, todo))
  rows = summarize(cache)
  if args.dry_run:  # compiled nothing: the file stays as it is
    print_table(rows)
    return 0
  cache.save(_results_payload(rows))
  print_table(rows)
  return 0


# --------------------------------------------------------------------------------- report


def _gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f}"


def _mesh_text(m: dict) -> str:
  return f"{m['data']}/{m['fsdp']}/{m['tensor']}"


def targets(aot: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of the table (`benchmarks.report`)."""
  rows = []
  for r in aot.get("rows", []):
    if r["slice"] in ("v5e-8", "v5p-8") and r["fits"] is not None:
      how = (
        f"peak {_gib(r['memory']['peak_bytes'])} GiB / chip (mesh {_mesh_text(r['mesh'])}, "
        f"{r['microbatches']} microbatches, remat {r['remat']})"
        if r["fits"]
        else f"over HBM by {_gib(r.get('exceeded_bytes'))} GiB at the closest point"
        if r.get("exceeded_bytes")
        else "no point compiled"
      )
      rows.append(
        [
          f"paper recipe fits {r['slice']} at 256x2048 tokens/step "
          f"({r['kind']} {r['size']}, XLA TPU compile on CPU)",
          how,
          common.yes(r["fits"]),
        ]
      )
  for r in aot.get("rows", []):
    if r["fits"] and r["slice"] == "v5p-8" and "vs_paper" in r:
      v = r["vs_paper"]
      rows.append(
        [
          f"v5p chip vs the paper's measured H100 tokens/s, like for like "
          f"(mmfree {r['size']}): both at the paper's MFU ({v['paper_mfu']:.1%}); "
          f"target >= {roofline.TARGET_RATIO}x",
          f"{v['at_paper_mfu']:.2f}x at equal MFU; {v['bound_vs_bound']:.2f}x "
          f"roofline vs roofline (H100 bound {v['h100_bound_tokens_per_s']:,.0f} "
          "tok/s, compute only) - estimates from datasheet peaks, not measurements",
          common.yes(v["at_paper_mfu"] >= roofline.TARGET_RATIO),
        ]
      )
  return rows


def _section_table(aot: dict) -> list[str]:
  table = [
    "| model | slice | fits | mesh d/f/t | micro-batches | remat | args GiB | temp GiB "
    "| peak GiB | XLA GFLOP (loops once) | analytic GFLOP/chip | EST. step s | "
    "EST. tok/s/chip | bound | EST. int8 tok/s/chip | compiles |",
    "|" + "---|" * 16,
  ]
  for r in aot["rows"]:
    if r["fits"] is None:
      continue
    n_compiled = sum(1 for t in r["tried"] if t["status"] in ("fits", "oom"))
    n_skipped = sum(1 for t in r["tried"] if t["status"] == "skipped")
    tried = f"{n_compiled} (+{n_skipped} skipped)"
    if not r["fits"]:
      by = r.get("exceeded_bytes")
      table.append(
        f"| {r['kind']} {r['size']} | {r['slice']} | **no**: "
        + (f"over HBM by {_gib(by)} GiB (closest point)" if by else "not compiled yet")
        + " |"
        + " |" * 12
        + f" {tried} |"
      )
      continue
    m, e = r["memory"], r["estimate"]
    int8 = r.get("int8", {}).get("tokens_per_s_chip")
    table.append(
      f"| {r['kind']} {r['size']} | {r['slice']} | yes | {_mesh_text(r['mesh'])} | "
      f"{r['microbatches']} | {r['remat']} | {_gib(m['argument_bytes'])} | "
      f"{_gib(m['temp_bytes'])} | {_gib(m['peak_bytes'])} | {r['xla_flops'] / 1e9:,.0f} | "
      f"{e['flops_analytic_hw'] / 1e9:,.0f} | {e['step_s']:.3f} | "
      f"{e['tokens_per_s_chip']:,.0f} | {e['bound']} | "
      + (
        f"{int8:,.0f} (peak {_gib(r['int8']['memory']['peak_bytes'])} GiB)"
        if int8
        else r.get("int8", {}).get("status", "-")
      )
      + f" | {tried} |"
    )
  return table


def _section_notes(aot: dict) -> list[str]:
  lines = []
  not_run = [f"{r['kind']} {r['size']} on {r['slice']}" for r in aot["rows"] if r["fits"] is None]
  codes = sorted(
    {
      aot["points"][r["key"]].get("code", "?")
      for r in aot["rows"]
      if r.get("fits") and r.get("key") in aot.get("points", {})
    }
    | {r["int8"]["code"] for r in aot["rows"] if "code" in r.get("int8", {})}
  )
  models = sorted(
    {
      json.dumps(aot["points"][r["key"]].get("model", {}), sort_keys=True)
      for r in aot["rows"]
      if r.get("fits") and r.get("key") in aot["points"]
    }
  )
  if codes:
    lines += [
      "",
      "Compiled from code " + "; ".join(codes) + " with model choices " + "; ".join(models) + ".",
    ]
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
    "`--refresh` recompiles these)",
  }
  if attention:
    lines += [
      "",
      "Transformer++ attention in these compiled steps: "
      + "; ".join(f"{described.get(k, k)}: {', '.join(v)}" for k, v in sorted(attention.items()))
      + ".",
    ]
  if not_run:
    lines += [
      "",
      "Not compiled yet (one compile took 19-30+ minutes on this shared, loaded "
      "2-core host; `python -m benchmarks.aot_tpu --only kind/size/chip` resumes): "
      + ", ".join(not_run)
      + ".",
    ]
  lines += [
    "",
    "Paper's training throughput per H100 (the target's reference, tokens/s/GPU): "
    + ", ".join(f"{k} {v / 1e3:.0f}k" for k, v in aot["paper_h100_tokens_per_s"].items())
    + " (measured). The roofline assumes perfect overlap and peak-rate kernels; it "
    "bounds what a real run reaches from above, so it is compared with the paper only "
    "like for like: the same roofline on an H100, or both chips at the paper's MFU "
    "(the targets table).",
  ]
  return lines


def markdown(aot: dict, res: dict) -> str:
  """The RESULTS.md section of the table (`benchmarks.report`)."""
  if not aot.get("rows"):
    return ""
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
    "compiled with `model.bitlinear_impl=int8` (its tokens/s estimate, and that "
    "program's compiled peak). "
    "XLA FLOPs are `cost_analysis()` as reported: it counts each while-loop body once "
    "(microbatch, layer and time scans), so it is far below the analytic count; the "
    "estimate uses the analytic FLOPs (6N + attention + remat recompute, per chip).",
    "",
    "Datasheet values per chip (`mmfree_jax.hardware`): "
    + "; ".join(
      f"{c['slice_name']} = `{c['topology']}` ({c['chips']} chips): bf16 "
      f"{c['bf16_flops'] / 1e12:.0f} TFLOP/s, int8 {c['int8_ops'] / 1e12:.0f} TOP/s, HBM "
      f"{c['hbm_bytes'] / 1e9:.0f} GB at {c['hbm_bytes_per_s'] / 1e9:.0f} GB/s, ICI "
      f"{c['ici_bytes_per_s'] / 1e9:.0f} GB/s"
      for c in chips.values()
    )
    + ".",
    "",
  ]
  return "\n".join(lines + _section_table(aot) + _section_notes(aot))


if __name__ == "__main__":
  sys.exit(main())
