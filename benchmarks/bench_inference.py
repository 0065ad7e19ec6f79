"""Packed ternary inference as a user runs it: bytes on disk and in memory, load, generate.

    python -m benchmarks.bench_inference [--preset toy|cpu] \
        [--parts shapes,batched,packed27,latent27]

Parts (each measured in its own process where memory matters; results merged into one JSON):
- shapes: bytes of the packed forms vs the latent bf16 model for the paper's sizes and a 13B
  shape (d=5120, L=40, vocab 32000; assumed, the paper gives 4.19 GB vs 48.5 GB), from
  `jax.eval_shape` of `nn.packed.export_packed` (nothing allocated).
- batched: `generate_batch` of 32 prompts of different lengths in one decode loop vs the same
  32 prompts one at a time (each compiled before timing), tokens/s ratio, latent and packed.
- packed27: a 2.7B-shaped packed directory with random ternary codes written by
  `export.write_packed` for each of --formats (`FMT` or `FMT:EMBEDDING_DTYPE`; bf16 embedding
  by default, `int8` the opt-in lossy one), then, each in a fresh process, `load_packed` +
  `generate_batch` at batch 1 and 8 and a 64-token prompt: file size, resident memory (RSS
  after load, RSS sampled while generating, process peak incl. loading and compiling),
  tokens/s.
- latent27: the latent bf16 2.7B (random init) in a fresh process: `generate_batch` at batch 1
  and 8, tokens/s and peak RSS (about 5.4 GB of weights: run it alone).

The machine is shared: timings are noisy; compare the ratios measured in one run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, setups

NAME = "bench_inference"
SIZES = {"370m": (1024, 24), "1.3b": (2048, 24), "2.7b": (2560, 32), "13b": (5120, 40)}


def _status_bytes(field: str) -> int:
  """A `/proc/self/status` memory field (e.g. 'VmRSS'), in bytes (0 where absent)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _rss() -> int:
  return _status_bytes("VmRSS")


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hwm_rss() -> int:
  """The process's peak RSS since the last `_reset_peak_rss` (VmHWM)."""
  return _status_bytes("VmHWM")


def _reset_peak_rss() -> None:
  """Resets VmHWM to the current RSS (Linux `clear_refs` 5); `ru_maxrss` keeps the peak."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def shapes() -> dict:
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from mmfree_jax.nn import packed as packed_lib  # pylint: disable=import-outside-toplevel
  from mmfree_jax.nn.model import build_model, count_params  # pylint: disable=import-outside-toplevel

  rows = []
  for size, (d, layers) in SIZES.items():
    cfg = setups.model_config("mmfree", d, layers, 32000, param_dtype="bfloat16", dtype="bfloat16")
    n = count_params(nnx.eval_shape(lambda: build_model(cfg, 0)))
    row = {
      "size": size,
      "d_model": d,
      "num_layers": layers,
      "params": n,
      "latent_bf16_bytes": 2 * n,
    }
    for fmt in ("2bit", "base3"):
      tree = jax.eval_shape(lambda: packed_lib.export_packed(build_model(cfg, 0), fmt)[0])
      nbytes = int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
      emb = cfg.vocab_size * d * 2
      row[f"{fmt}_bytes"] = nbytes  # embedding in bf16 (the param dtype), norms fp32
      row[f"{fmt}_vs_bf16"] = 2 * n / nbytes
      row[f"{fmt}_embedding_share"] = emb / nbytes
    tree = jax.eval_shape(
      lambda: packed_lib.export_packed(build_model(cfg, 0), "2bit", int8_embedding=True)[0]
    )
    row["2bit_int8_embedding_bytes"] = int(
      sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    )
    rows.append(row)
    print(
      f"{size:5s} {n / 1e9:6.2f}B params  bf16 {2 * n / 1e9:6.2f} GB  2bit "
      f"{row['2bit_bytes'] / 1e9:5.2f} GB  base3 {row['base3_bytes'] / 1e9:5.2f} GB",
      flush=True,
    )
  return {"rows": rows}


def batched(preset: str) -> dict:
  from mmfree_jax import generate as gen  # pylint: disable=import-outside-toplevel
  from mmfree_jax.nn.model import build_model  # pylint: disable=import-outside-toplevel
  from mmfree_jax.nn.packed import PackedLM  # pylint: disable=import-outside-toplevel

  d, layers, vocab, n, new = {"toy": (64, 2, 256, 8, 4), "cpu": (256, 4, 4096, 32, 32)}[preset]
  model = build_model(setups.model_config("mmfree", d, layers, vocab), 0)
  rng = np.random.default_rng(0)
  lengths = rng.integers(8, 24, n)
  prompts = [rng.integers(0, vocab, int(k)).tolist() for k in lengths]
  cfg = gen.SamplingConfig(max_new_tokens=new)
  out = {
    "d_model": d,
    "num_layers": layers,
    "vocab": vocab,
    "prompts": n,
    "prompt_lengths": [int(k) for k in lengths],
    "max_new_tokens": new,
    "rows": [],
  }
  for name, m in (("latent", model), ("packed_2bit", PackedLM.from_model(model, "2bit"))):
    gen.generate_batch(m, prompts, cfg)  # compile
    for p in prompts:
      gen.generate_batch(m, [p], cfg)  # compile every single-prompt shape first
    times = {}
    for _ in range(2):
      t0 = time.perf_counter()
      rows = gen.generate_batch(m, prompts, cfg)
      times.setdefault("batched", []).append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      for p in prompts:
        gen.generate_batch(m, [p], cfg)
      times.setdefault("one_at_a_time", []).append(time.perf_counter() - t0)
    tokens = sum(map(len, rows))
    b, s = min(times["batched"]), min(times["one_at_a_time"])
    row = {
      "model": name,
      "tokens": tokens,
      "batched_tokens_per_s": tokens / b,
      "one_at_a_time_tokens_per_s": tokens / s,
      "speedup": s / b,
    }
    out["rows"].append(row)
    print(
      f"batched generation {name}: {row['batched_tokens_per_s']:.0f} tok/s vs "
      f"{row['one_at_a_time_tokens_per_s']:.0f} one at a time: x{row['speedup']:.1f}",
      flush=True,
    )
  return out


def _config_27b(preset: str):
  from mmfree_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  cfg = config_lib.base_config()
  d, layers = SIZES["2.7b"] if preset != "toy" else (64, 2)
  cfg.model.update(
    kind="mmfree",
    d_model=d,
    num_layers=layers,
    vocab_size=32000,
    param_dtype="bfloat16",
    dtype="bfloat16",
  )
  cfg.data.update(tokenizer="byte")
  return cfg


def write_random_packed(
  dst: str, preset: str, fmt: str = "2bit", embedding: str = "bfloat16"
) -> dict:
  """A packed directory of the 2.7B shape with random ternary codes (written streaming)."""
  from mmfree_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from mmfree_jax.export import layout, writer  # pylint: disable=import-outside-toplevel
  from mmfree_jax.numerics import ternary_packing  # pylint: disable=import-outside-toplevel

  cfg = _config_27b(preset)
  model_cfg = ModelConfig.from_config(cfg.model)
  emb = layout.EMBEDDING_DTYPES[embedding]
  rng = np.random.default_rng(0)
  produce = {}
  for name, shape, _ in layout.layout(model_cfg, fmt, emb):
    if name.endswith(".codes"):
      n_in = {"down_proj": model_cfg.intermediate_size}.get(name.split(".")[-2], model_cfg.d_model)
      n_out = shape[1]
      produce[name] = lambda n_in=n_in, n_out=n_out: np.asarray(
        ternary_packing.pack_ternary(rng.integers(-1, 2, (n_in, n_out), dtype=np.int8), fmt, axis=0)
      )
    elif name == "embedding" and emb == layout.INT8:
      produce[name] = lambda shape=shape: rng.integers(-127, 128, shape, dtype=np.int8)
    elif name == "embedding":
      produce[name] = lambda shape=shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(
        emb
      )
    elif name == "embedding.scale":  # rows of absmax ~0.06
      produce[name] = lambda shape=shape: np.full(shape, 127 / 0.06, np.float32)
    elif name.endswith(".scale"):
      produce[name] = lambda: np.full((1,), 0.02, np.float32)
    elif name == "lower_bounds":
      produce[name] = lambda shape=shape: np.linspace(0, 0.9, shape[0], dtype=np.float32)[
        :, None
      ].repeat(shape[1], 1)
    else:
      produce[name] = lambda shape=shape: np.ones(shape, np.float32)
  return writer.write_packed(
    dst, cfg, fmt, produce, embedding_dtype=embedding, step=0, source="random (bench_inference)"
  )


def _time_generate(model, batch: int, new: int, vocab: int, prompt_len: int = 1) -> dict:
  """Second-call tokens/s of `generate_batch`; RSS sampled every 20 ms during that call (the
  steady decode: weights, state, temporaries and the compiled program, not the load or the
  compiler's peak, which `peak_rss_bytes` includes)."""
  from mmfree_jax import generate as gen  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(batch)
  prompts = [list(map(int, rng.integers(0, vocab, prompt_len))) for _ in range(batch)]
  cfg = gen.SamplingConfig(max_new_tokens=new)
  t0 = time.perf_counter()
  gen.generate_batch(model, prompts, cfg)
  compile_s = time.perf_counter() - t0
  samples, running = [], threading.Event()
  running.set()

  def sample():
    while running.is_set():
      samples.append(_rss())
      time.sleep(0.02)

  sampler = threading.Thread(target=sample)
  sampler.start()
  t0 = time.perf_counter()
  gen.generate_batch(model, prompts, cfg)
  seconds = time.perf_counter() - t0
  running.clear()
  sampler.join()
  return {
    "batch": batch,
    "prompt_len": prompt_len,
    "new_tokens": new,
    "tokens_per_s": batch * new / seconds,
    "seconds": seconds,
    "first_call_s": compile_s,
    "rss_after_generate": _rss(),
    "rss_max_while_generating": max(samples + [_rss()]),
    "peak_rss_bytes": _peak_rss(),
  }


PACKED27_RUNS = ((1, 1), (8, 1), (1, 64))  # (batch, prompt tokens), each in a fresh process


def packed27_child(directory: str, preset: str, batch: int, prompt_len: int) -> dict:
  """Loads the packed directory and times one (batch, prompt) configuration: in its own process
  so that its resident memory holds one compiled program, as a serving process would."""
  from mmfree_jax.export import reader  # pylint: disable=import-outside-toplevel

  base = _rss()
  t0 = time.perf_counter()
  model, _, manifest = reader.load_packed(directory)
  load_s = time.perf_counter() - t0
  after_load = _rss()
  peak_after_load = _peak_rss()
  new = 8 if preset != "toy" else 2
  prompt_len = prompt_len if preset != "toy" else min(prompt_len, 4)
  run = _time_generate(model, batch, new, 32000, prompt_len=prompt_len)
  return {
    "format": manifest["format"],
    "method": model.method,
    "file_bytes": manifest["bytes"],
    "load_s": load_s,
    # requirements-accel's CUDA plugin loads into every jax process, even a CPU one
    "cuda_plugin_loaded": "jax_cuda12_plugin" in sys.modules,
    "rss_before_load": base,
    "rss_after_load": after_load,
    "peak_rss_after_load": peak_after_load,
    "runs": [run],
    "peak_rss_bytes": _peak_rss(),
  }


def latent27_child(preset: str) -> dict:
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from mmfree_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from mmfree_jax.nn.model import build_model  # pylint: disable=import-outside-toplevel

  cfg = ModelConfig.from_config(_config_27b(preset).model)
  base = _rss()
  # Weights placed leaf by leaf, as a checkpoint restore places them, each a fused
  # pseudo-random pattern (generate's time and memory do not depend on the values): a
  # threefry init of a stacked [32, 2560, 13824] leaf alone peaks at ~23 GB of temporaries.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0)))
  pattern = jax.jit(
    lambda seed, shape, dtype: (
      (0.02 * jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32) * 0.7548776662 + seed))
      .reshape(shape)
      .astype(dtype)
    ),
    static_argnums=(1, 2),
  )
  leaves = iter(range(len(jax.tree.leaves(state))))
  model = nnx.merge(
    graphdef,
    jax.tree.map(  # one leaf at a time, each finished
      lambda x: pattern(float(next(leaves)), x.shape, x.dtype).block_until_ready(), state
    ),
  )
  after = _rss()
  build_peak = _peak_rss()
  new = 4 if preset != "toy" else 2
  runs = []
  for batch in (1, 8):
    _reset_peak_rss()
    runs.append(dict(_time_generate(model, batch, new, 32000), generate_peak_rss=_hwm_rss()))
  return {
    "rss_before_build": base,
    "rss_after_build": after,
    "build_peak_rss": build_peak,
    "runs": runs,
    "peak_rss_bytes": _peak_rss(),
  }


def _child(args: list[str]) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.bench_inference", *args],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _previous_results(path: str, parts: list[str]) -> dict:
  """The results already in `path` (parts run separately accumulate, each with its run's
  load average), each part not rerun now keeping its run's load; {} without the file."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    previous = json.load(f)
  results = previous.get("results", {})
  machine = previous.get("machine", {})
  loads = results.setdefault("part_loads", {})
  for part in set(results) - {"part_loads"} - set(parts) - set(loads):
    loads[part] = [machine.get("load_average_1m_start"), machine.get("load_average_1m_end")]
  return results


def _packed27(preset: str, formats: str) -> dict:
  """The packed 2.7B of each of `formats` (comma-separated FMT[:EMBEDDING_DTYPE]): written
  with random codes, then each PACKED27_RUNS (batch, prompt) generated in a fresh process.
  Returns the merged child results by format key."""
  out = {}
  for key in formats.split(","):
    fmt, _, embedding = key.partition(":")
    embedding = embedding or "bfloat16"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
      t0 = time.perf_counter()
      manifest = write_random_packed(os.path.join(tmp, "p"), preset, fmt, embedding)
      write_s = time.perf_counter() - t0
      children = [
        _child(
          [
            "--child",
            "packed27",
            "--dir",
            os.path.join(tmp, "p"),
            "--preset",
            preset,
            "--run",
            f"{b},{p}",
          ]
        )
        for b, p in PACKED27_RUNS
      ]
      child = dict(
        children[0],
        runs=[c["runs"][0] for c in children],
        peak_rss_bytes=max(c["peak_rss_bytes"] for c in children),
        rss_after_load=max(c["rss_after_load"] for c in children),
        rss_before_load=min(c["rss_before_load"] for c in children),
      )
      out[key] = dict(
        child, write_s=write_s, file_bytes=manifest["bytes"], embedding_dtype=embedding
      )
      print(
        f"packed 2.7B {key}: file {manifest['bytes'] / 1e9:.3f} GB, RSS after load "
        f"{child['rss_after_load'] / 1e9:.2f} GB, peak {child['peak_rss_bytes'] / 1e9:.2f}"
        f" GB; "
        + ", ".join(
          f"batch {r['batch']} prompt {r['prompt_len']}: "
          f"{r['tokens_per_s']:.2f} tok/s, RSS "
          f"{r['rss_max_while_generating'] / 1e9:.2f} GB"
          for r in child["runs"]
        ),
        flush=True,
      )
  return out


def main(argv=None):
  def extra(p):
    p.add_argument("--parts", default="shapes,batched,packed27,latent27")
    p.add_argument("--child", default=None, help="internal: one measurement in this process")
    p.add_argument("--dir", default=None)
    p.add_argument("--run", default="1,1", help="internal: packed27 child's batch,prompt")
    p.add_argument(
      "--formats",
      default="2bit,base3,2bit:int8,base3:int8",
      help="packed27: FMT or FMT:EMBEDDING_DTYPE (default embedding bfloat16)",
    )

  args = common.parse_args(NAME, __doc__, extra, argv)
  if args.child == "packed27":
    batch, prompt_len = map(int, args.run.split(","))
    print(json.dumps(packed27_child(args.dir, args.preset, batch, prompt_len)))
    return
  if args.child == "latent27":
    print(json.dumps(latent27_child(args.preset)))
    return
  parts = args.parts.split(",")
  results = _previous_results(args.out, parts)
  start_load = common.machine_info()["load_average_1m_end"]
  if "shapes" in parts:
    results["shapes"] = shapes()
  if "batched" in parts:
    results["batched"] = batched(args.preset)
  if "packed27" in parts:
    results["packed27"] = _packed27(args.preset, args.formats)
  if "latent27" in parts:
    child = _child(["--child", "latent27", "--preset", args.preset])
    results["latent27"] = child
    print(
      "latent bf16 2.7B: peak RSS "
      f"{child['peak_rss_bytes'] / 1e9:.2f} GB; "
      + ", ".join(f"batch {r['batch']}: {r['tokens_per_s']:.3f} tok/s" for r in child["runs"]),
      flush=True,
    )
  end_load = common.machine_info()["load_average_1m_end"]
  results.setdefault("part_loads", {}).update({part: [start_load, end_load] for part in parts})
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "shared machine, noisy timings (load average in machine); ratios are from one run",
      "packed27 / latent27 run in fresh processes; RSS from /proc (VmRSS) and ru_maxrss",
      "tokens/s exclude the first (compiling) call; greedy, 1-token prompts except the "
      "64-token prefill run",
      "13b shape assumed d=5120, L=40, vocab 32000; bytes from jax.eval_shape of export_packed",
    ],
  )


def _packed_name(r: dict) -> str:
  """A packed27 entry as '<format>, <dtype> embedding[, <matvec method>]'."""
  method = f", {r['method']}" if "method" in r else ""
  return f"{r['format']}, {r['embedding_dtype']} embedding{method}"


def targets(inf: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of these results (`benchmarks.report`)."""
  rows = []
  for r in inf.get("packed27", {}).values():
    fmt = _packed_name(r)
    rows.append(
      [
        f"packed 2.7B on disk <= 0.75 GB ({fmt})",
        f"{r['file_bytes'] / 1e9:.3f} GB",
        common.yes(r["file_bytes"] <= 0.75e9),
      ]
    )
    # sampled during the timed (second) call: no load or compiler peak in it
    steady = [run["rss_max_while_generating"] for run in r["runs"] if run["prompt_len"] == 1]
    prefill = [run for run in r["runs"] if run["prompt_len"] > 1]
    rows.append(
      [
        f"packed 2.7B resident memory while generating <= 1.2 GB ({fmt})",
        f"{max(steady) / 1e9:.2f} GB RSS decoding at batch 1 and 8 "
        f"({(max(steady) - r['rss_before_load']) / 1e9:.2f} GB above the bare "
        f"runtime's {r['rss_before_load'] / 1e9:.2f})"
        + "".join(
          f"; {run['rss_max_while_generating'] / 1e9:.2f} GB with a "
          f"{run['prompt_len']}-token prefill"
          for run in prefill
        )
        + (
          ""
          if r.get("cuda_plugin_loaded", True)
          else "; the README's install (with requirements-accel's CUDA plugin: +0.11)"
        ),
        common.yes(max(steady) <= 1.2e9),
      ]
    )
  for r in inf.get("batched", {}).get("rows", []):
    rows.append(
      [
        f"batched generation of 32 prompts >= 10x one at a time ({r['model']})",
        f"{r['speedup']:.1f}x",
        common.yes(r["speedup"] >= 10),
      ]
    )
  return rows


def _packed27_table(inf: dict) -> str:
  # latent27 runs reset the peak after the model's (eager, random) init: generate's own peak
  row = lambda model, file_gb, loaded, run: [
    model,
    file_gb,
    f"{loaded / 1e9:.2f}",
    f"{run['rss_max_while_generating'] / 1e9:.2f}",
    f"{run.get('generate_peak_rss', run['peak_rss_bytes']) / 1e9:.2f}",
    run["batch"],
    run["prompt_len"],
    f"{run['tokens_per_s']:.3g}",
  ]
  rows = [
    row(f"packed {_packed_name(r)}", f"{r['file_bytes'] / 1e9:.3f}", r["rss_after_load"], run)
    for r in inf["packed27"].values()
    for run in r["runs"]
  ]
  lat = inf.get("latent27")
  if lat:
    rows += [row("latent bf16", "", lat["rss_after_build"], run) for run in lat["runs"]]
  return common.md_table(
    [
      "2.7B model",
      "file GB",
      "RSS after load GB",
      "RSS while generating GB",
      "process peak RSS GB",
      "batch",
      "prompt tokens",
      "tokens/s",
    ],
    rows,
  )


def markdown(inf: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`): packed sizes
  (eval_shape), the 2.7B packed directory, batched generation."""
  parts = []
  if "shapes" in inf:
    rows = [
      [
        r["size"],
        f"{r['params'] / 1e9:.2f}B",
        f"{r['latent_bf16_bytes'] / 1e9:.2f}",
        f"{r['2bit_bytes'] / 1e9:.3f}",
        f"{r['base3_bytes'] / 1e9:.3f}",
        f"{r['2bit_int8_embedding_bytes'] / 1e9:.3f}",
        f"{r['2bit_vs_bf16']:.1f}x",
        f"{r['2bit_embedding_share']:.0%}",
      ]
      for r in inf["shapes"]["rows"]
    ]
    parts.append(
      common.md_table(
        [
          "size",
          "params",
          "latent bf16 GB",
          "2bit GB",
          "base3 GB",
          "2bit, int8 embedding GB",
          "bf16 / 2bit",
          "embedding share of 2bit",
        ],
        rows,
      )
    )
  if "packed27" in inf:
    parts.append(_packed27_table(inf))
  if "batched" in inf:
    b = inf["batched"]
    rows = [
      [
        r["model"],
        r["tokens"],
        r["batched_tokens_per_s"],
        r["one_at_a_time_tokens_per_s"],
        f"{r['speedup']:.1f}x",
      ]
      for r in b["rows"]
    ]
    parts.append(
      f"{b['prompts']} prompts of {min(b['prompt_lengths'])}-"
      f"{max(b['prompt_lengths'])} tokens, {b['max_new_tokens']} new tokens each "
      f"(d={b['d_model']}, L={b['num_layers']}, vocab {b['vocab']}):\n\n"
      + common.md_table(
        ["model", "tokens", "batched tokens/s", "one at a time tokens/s", "speedup"], rows
      )
    )
  return "## 11. Packed inference (`bench_inference`)\n\n" + "\n\n".join(parts)


if __name__ == "__main__":
  main()
