"""Decode memory and speed of two checkouts, A/B: new/old ratios of `bench_decode` and
`bench_inference` measured back to back on one machine.

    python -m benchmarks.ab_inference --base /path/to/old/checkout [--new .] [--repeats 2]

Each repeat runs both benchmarks on the base checkout, then on the new one (A B A B), each in
its own process with that checkout on `PYTHONPATH`; their JSON goes to a temporary folder.
A metric's ratio is the new side's median over the base side's; its noise is the largest
spread (max/min - 1) between the repeats of one side: a ratio within 1 ± noise is a change
this machine cannot tell from noise. Writes `--out` (`common.parse_args`: a temporary
folder; `--commit_results`: the committed `results/ab_inference.json`).

    python -m benchmarks.ab_inference --base DIR --hlo

adds to that file what no load can blur: per `bench_decode` variant (its cpu shapes, context
1024), each side's optimized HLO (instruction count, opcode histogram) and compiled memory.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import common

NAME = "ab_inference"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small but meaningful: decode at two contexts; the batched generate; the packed 2.7B (one
# directory of random 2-bit codes, written once, loaded and run by each side)
DECODE_ARGS = ["--preset", "cpu", "--contexts", "1024,4096"]
INFERENCE_ARGS = ["--preset", "cpu", "--parts", "batched"]
PACKED27_RUNS = ("1,1", "8,1")  # (batch, prompt tokens), each a fresh `--child packed27`


def _git_head(checkout: str) -> str:
  proc = subprocess.run(
    ["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
  )
  return proc.stdout.strip()


def _python(checkout: str, args: list[str]) -> str:
  """stdout of `python ARGS` in `checkout`, with it on `PYTHONPATH`."""
  env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, *args], cwd=checkout, env=env, capture_output=True, text=True, check=False
  )
  if proc.returncode != 0:
    raise RuntimeError(f"{args[:2]} in {checkout} failed:\n{proc.stderr[-3000:]}")
  return proc.stdout


def _run(checkout: str, module: str, args: list[str], out: str) -> dict:
  _python(checkout, ["-m", f"benchmarks.{module}", *args, "--out", out])
  with open(out) as f:
    return json.load(f)["results"]


def _packed27(checkout: str, directory: str) -> dict:
  """`bench_inference`'s packed27 result (format 2bit) for `PACKED27_RUNS` in `checkout`."""
  children = [
    json.loads(
      _python(
        checkout,
        ["-m", "benchmarks.bench_inference", "--child", "packed27", "--dir", directory]
        + ["--preset", "cpu", "--run", run],
      ).splitlines()[-1]
    )
    for run in PACKED27_RUNS
  ]
  return {
    "2bit": dict(
      children[0],
      runs=[c["runs"][0] for c in children],
      peak_rss_after_load=max(c["peak_rss_after_load"] for c in children),
    )
  }


def metrics(decode: dict, inference: dict) -> dict[str, float]:
  """The compared numbers of one run of each benchmark, by name."""
  out = {}
  for r in decode["rows"]:
    key = f"decode {r['variant']} ctx {r['context']}"
    out[f"{key} tokens/s"] = r["tokens_per_s"]
    out[f"{key} compiled peak bytes"] = r["peak_bytes"]
  for r in inference.get("batched", {}).get("rows", []):
    out[f"batched {r['model']} tokens/s"] = r["batched_tokens_per_s"]
    out[f"one-at-a-time {r['model']} tokens/s"] = r["one_at_a_time_tokens_per_s"]
  for fmt, p in inference.get("packed27", {}).items():
    out[f"packed 2.7B {fmt} RSS after load"] = p["rss_after_load"]
    out[f"packed 2.7B {fmt} peak RSS of the load"] = p["peak_rss_after_load"]
    for r in p["runs"]:
      key = f"packed 2.7B {fmt} batch {r['batch']} prompt {r['prompt_len']}"
      out[f"{key} tokens/s"] = r["tokens_per_s"]
      out[f"{key} RSS while generating"] = r["rss_max_while_generating"]
  return out


def compare(runs: dict[str, list[dict]]) -> list[dict]:
  """Per metric: medians, ratio new/base and the repeat spread of each side."""
  rows = []
  for name in runs["new"][0]:
    values = {side: [m[name] for m in runs[side] if name in m] for side in ("base", "new")}
    if not values["base"]:
      continue
    spread = {s: max(v) / min(v) - 1 for s, v in values.items()}
    base, new = (float(np.median(values[s])) for s in ("base", "new"))
    rows.append(
      {
        "metric": name,
        "base": base,
        "new": new,
        "ratio": new / base,
        "noise": max(spread.values()),
        "base_values": values["base"],
        "new_values": values["new"],
      }
    )
  return rows


def run(base: str, new: str, repeats: int) -> dict:
  runs = {"base": [], "new": []}
  loads = []
  with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
    directory = os.path.join(tmp, "packed27")
    write = "from benchmarks import bench_inference as b; b.write_random_packed(%r, 'cpu')"
    _python(new, ["-c", write % directory])
    for rep in range(repeats):
      for side, checkout in (("base", base), ("new", new)):
        load = common.machine_info()["load_average_1m_end"]
        dec = _run(checkout, "bench_decode", DECODE_ARGS, os.path.join(tmp, f"d{side}{rep}.json"))
        inf = _run(
          checkout, "bench_inference", INFERENCE_ARGS, os.path.join(tmp, f"i{side}{rep}.json")
        )
        inf["packed27"] = _packed27(checkout, directory)
        loads.append([side, rep, load, common.machine_info()["load_average_1m_end"]])
        runs[side].append(metrics(dec, inf))
        print(f"repeat {rep} {side}: done (load {loads[-1][2]} → {loads[-1][3]})", flush=True)
  return {
    "base_commit": _git_head(base),
    "new_commit": _git_head(new),
    "repeats": repeats,
    "decode_args": DECODE_ARGS,
    "inference_args": INFERENCE_ARGS,
    "packed27_runs": list(PACKED27_RUNS),
    "loads": loads,
    "rows": compare(runs),
  }


def hlo_stats() -> dict:
  """This process's checkout: per `bench_decode` variant (preset cpu shapes, context 1024,
  as its `run` builds them), the compiled decode loop's HLO opcode counts and memory."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  import mmfree_jax  # pylint: disable=import-outside-toplevel
  from benchmarks import bench_decode as bd  # pylint: disable=import-outside-toplevel
  from benchmarks import setups  # pylint: disable=import-outside-toplevel
  from mmfree_jax.nn import packed  # pylint: disable=import-outside-toplevel

  (d, layers, vocab), steps = bd.SHAPE["cpu"], bd.STEPS["cpu"]
  tokens = jnp.zeros((1, 1), jnp.int32)
  mm = mmfree_jax.build_model(setups.model_config("mmfree", d, layers, vocab), 0)
  tf = mmfree_jax.build_model(setups.model_config("transformer", d, layers, vocab), 0)
  lowered = {"mmfree": bd.model_decode_loop(mm, steps, freeze=True)}
  lowered["mmfree"] = lowered["mmfree"][0].lower(lowered["mmfree"][1], tokens, mm.init_state(1))
  for name, fmt in (("mmfree_exported", "float32"), ("mmfree_packed", "2bit")):
    params, spec = packed.export_packed(mm, fmt)
    state = packed.init_state(spec, 1)
    lowered[name] = bd.packed_decode_loop(spec, steps).lower(params, tokens, state)
  loop, params = bd.model_decode_loop(tf, steps, freeze=True, donate_state=True)
  state = tf.init_state(1, 1024 + steps)._replace(index=jnp.asarray(1024, jnp.int32))
  lowered["transformer"] = loop.lower(params, tokens, state)
  out = {}
  for name, low in lowered.items():
    compiled = low.compile()
    ops = collections.Counter(re.findall(r"= \S+ ([a-z\-]+)\(", compiled.as_text()))
    out[name] = {"ops": dict(ops), "memory": common.memory_stats(compiled)}
  return out


def compare_hlo(base: dict, new: dict) -> list[dict]:
  """Per variant: instruction counts, the opcodes whose counts differ, compiled peaks."""
  rows = []
  for name in new:
    a, b = base[name]["ops"], new[name]["ops"]
    rows.append(
      {
        "variant": name,
        "base_instructions": sum(a.values()),
        "new_instructions": sum(b.values()),
        "ops_changed": {
          op: [a.get(op, 0), b.get(op, 0)]
          for op in sorted(set(a) | set(b))
          if a.get(op) != b.get(op)
        },
        "base_peak_bytes": base[name]["memory"].get("peak_bytes"),
        "new_peak_bytes": new[name]["memory"].get("peak_bytes"),
      }
    )
  return rows


def _hlo_of(checkout: str) -> dict:
  return json.loads(_python(checkout, [os.path.abspath(__file__), "--hlo_child"]).splitlines()[-1])


def _value(metric: str, v: float) -> str:
  return common.fmt_bytes(v) if "bytes" in metric or "RSS" in metric else f"{v:,.1f}"


def markdown(ab: dict, res: dict) -> str:
  """The RESULTS.md subsection of these results (`benchmarks.report`)."""
  del res
  rows = [
    [
      r["metric"],
      _value(r["metric"], r["base"]),
      _value(r["metric"], r["new"]),
      f"{r['ratio']:.3f}",
      f"±{r['noise']:.1%}",
    ]
    for r in ab["rows"]
  ]
  return "\n".join(
    [
      f"### 11b. A/B: decode memory and speed, {ab['new_commit']} vs {ab['base_commit']} "
      f"(`ab_inference`, {ab['repeats']} repeats, A B A B)",
      "",
      f"`bench_decode {' '.join(ab['decode_args'])}` and `bench_inference "
      f"{' '.join(ab['inference_args'])}` plus its packed 2.7B (2bit, one directory of random "
      f"codes) at (batch, prompt) {', '.join(ab['packed27_runs'])}, each side in its own "
      "processes, base and new checkout back to back; medians; "
      "noise: the largest spread between the repeats of one side. The machine is shared with "
      "other jobs (1-minute load per run: "
      + ", ".join(f"{s} {a}→{b}" for s, _, a, b in ab["loads"])
      + "): timings are noisy, compiled peaks exact.",
      "",
      common.md_table(["metric", "base", "new", "new / base", "noise"], rows),
      "",
      _summary(ab["rows"]),
    ]
    + _hlo_markdown(ab.get("hlo"))
  )


def _summary(rows: list[dict]) -> str:
  """Memory: the largest deviation of a ratio from 1; timings: how many lie within noise."""
  memory = [r for r in rows if "bytes" in r["metric"] or "RSS" in r["metric"]]
  timed = [r for r in rows if r not in memory]
  within = [r for r in timed if abs(r["ratio"] - 1) <= r["noise"]]
  worst = max((abs(r["ratio"] - 1) for r in memory), default=0.0)
  return (
    f"Memory: every ratio within {worst:.1%} of 1. Speed: {len(within)} of {len(timed)} "
    "ratios within their noise; the others: "
    + (
      ", ".join(
        f"{r['metric']} {r['ratio']:.2f} (±{r['noise']:.0%})" for r in timed if r not in within
      )
      or "none"
    )
    + "."
  )


def _hlo_markdown(hlo: list[dict] | None) -> list[str]:
  if not hlo:
    return []
  rows = [
    [
      r["variant"],
      f"{r['base_instructions']:,} / {r['new_instructions']:,}",
      ", ".join(f"{op} {a}→{b}" for op, (a, b) in r["ops_changed"].items()) or "none",
      f"{r['base_peak_bytes']:,} / {r['new_peak_bytes']:,}",
    ]
    for r in hlo
  ]
  return [
    "",
    "The same decode loops compiled by each side (`--hlo`: preset cpu shapes, context 1024; "
    "no timing, so no noise). A variant whose HLO did not change runs one program on both "
    "sides, so its timing ratios above are this machine's noise; so are those of the "
    "MatMul-free loops between contexts (one program at every context): two repeats "
    "underestimate the noise.",
    "",
    common.md_table(
      ["variant", "HLO instructions base / new", "opcodes changed", "compiled peak bytes"], rows
    ),
  ]


def main(argv=None):
  def extra(p):
    p.add_argument("--base", default=None, help="the old checkout (e.g. a git worktree)")
    p.add_argument("--new", default=ROOT, help="the new checkout (default: this one)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hlo", action="store_true", help="add the HLO comparison to --out")
    p.add_argument("--hlo_child", action="store_true", help="internal: hlo_stats() as JSON")

  args = common.parse_args(NAME, __doc__, extra, argv)
  if args.hlo_child:
    print(json.dumps(hlo_stats()))
    return
  if args.base is None:
    raise SystemExit("--base (the old checkout) is required")
  if args.hlo:
    with open(args.out) as f:
      results = json.load(f)["results"]
    sides = (os.path.abspath(args.base), os.path.abspath(args.new))
    results["hlo"] = compare_hlo(*(_hlo_of(side) for side in sides))
  else:
    results = run(os.path.abspath(args.base), os.path.abspath(args.new), args.repeats)
  payload = common.write_json(
    args.out, NAME, "cpu", results, ["A/B of two checkouts; see the module docstring"]
  )
  print(markdown(payload["results"], {}))


if __name__ == "__main__":
  main()
