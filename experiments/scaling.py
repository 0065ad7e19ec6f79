"""Small-scale reproduction study: MatMul-free LM vs Transformer++ at a few sizes.

Trains both model kinds at each size on the built-in corpus (`data.source=builtin_kjv`) with
identical data (same tokenizer, split and batch order per seed), the same number of tokens and
the same schedule (cosine with warmup), evaluates the validation loss at the end, and writes

  OUT_DIR/scaling_results.json   one row per run (fields below) + how the study was run
  OUT_DIR/scaling.png            val loss vs parameters and vs training FLOPs, both kinds,
                                 every seed a point, the mean a line, LR-sweep losers as x

Protocol (the one of experiments/convert.py, issue 15): each kind gets its own peak-LR sweep
(--lr_mmfree / --lr_transformer are comma-separated lists) at every size on the first of
--seeds; the lowest validation loss picks that (kind, size)'s rate, which the other seeds then
run. Rows carry `seed`, `sweep` (a tuning-seed row when several rates were tried) and `chosen`
(every row, any seed, at the picked rate); the summary gives mean/std/n over the chosen rows.
A study run in parts (e.g. one timing run per size first) is combined with --merge, which
re-picks each rate over all parts' tuning-seed rows.

Each run row: kind, d_model, num_layers, intermediate_size, num_heads, params
(`model.count_params`), non_embedding_params (params minus the input embedding table),
tokens, train_flops (`accounting.train_flops_per_token` x tokens), final_train_loss (mean of the
last 10 steps), last_train_loss, val_loss, val_perplexity, tokens_per_s (median step),
wall_time_s (the whole `train()` call: data, compile, steps, eval, checkpoint).

  python experiments/scaling.py                       # the defaults (see the committed JSON's
                                                      # "command" for how it was actually run)
  python experiments/scaling.py --toy --out_dir /tmp/s # seconds; what the test runs
  python experiments/scaling.py --sizes 64x2,128x2 --steps 100 --kinds mmfree
  python experiments/scaling.py --replot               # redraw the plot from the JSON

What the committed study cut to fit ~70 minutes of one CPU core (2 cores shared with other
jobs): two small sizes, 32x2 and 64x2 (the old study had 64x2, 128x3, 192x4); 3 rates per kind
per size on seed 0 only, 2 more seeds at the picked rate; 600 steps x 16 x 128 = 1.23M
BPE-4096 tokens per run: 2.4x the old study's 250 steps of bytes (a BPE-4096 token is ~4.0
bytes of KJV, so ~10x the text). Timed first (one run per size at the middle rates, seed 0):
64x2 took 218 s (MatMul-free) and 250 s (Transformer++), 128x2 MatMul-free 318 s, so 64x2 +
128x2 would have needed ~95 min for the 20 runs, and 750 steps (3x, the plan) more; hence
32x2 + 64x2 at 600 steps. With a 4096-token vocabulary these models are mostly embedding and
head (non_embedding_params in each row): read the result as a small-scale comparison of the
two kinds under their own tuned rates, not a scaling law.

Everything goes through the library (`train.trainer.train`), as a notebook would.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

# Run on CPU unless told otherwise, before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python experiments/scaling.py` from a checkout
  sys.path.insert(0, REPO_ROOT)

RESULTS_FILE = "scaling_results.json"
PLOT_FILE = "scaling.png"
KINDS = ("mmfree", "transformer")
RUN_FIELDS = (
  "kind",
  "d_model",
  "num_layers",
  "intermediate_size",
  "num_heads",
  "vocab_size",
  "params",
  "non_embedding_params",
  "tokens",
  "train_flops_per_token",
  "train_flops",
  "peak_lr",
  "seed",
  "final_train_loss",
  "last_train_loss",
  "val_loss",
  "val_perplexity",
  "tokens_per_s",
  "wall_time_s",
)

# The committed study (issue 15's protocol, sized to ~70 min of one CPU core; see above).
# The LR grids bracket each kind's usual rate: the paper trains MatMul-free with a larger LR
# than Transformers; at 50 steps on this data MatMul-free preferred 1e-2 over 3e-3.
DEFAULTS = dict(
  sizes="32x2,64x2",
  kinds="mmfree,transformer",
  steps=600,
  batch=16,
  seq_len=128,
  tokenizer="bpe:4096",
  warmup=60,
  lr_mmfree="3e-3,1e-2,3e-2",
  lr_transformer="1e-3,3e-3,1e-2",
  eval_batches=8,
  head_dim=32,
  seeds="0,1,2",
)
# --toy: seconds, for the test (two sizes so the plot has lines, both kinds, one seed/rate).
TOY = dict(
  sizes="32x1,48x1",
  steps=3,
  batch=8,
  seq_len=32,
  warmup=1,
  eval_batches=1,
  head_dim=16,
  tokenizer="byte",
  lr_mmfree="3e-3",
  lr_transformer="3e-3",
  seeds="0",
)


def parse_sizes(text: str) -> list[tuple[int, int]]:
  """'64x2,128x3' -> [(64, 2), (128, 3)] (d_model x num_layers)."""
  sizes = []
  for item in text.split(","):
    item = item.strip()
    if not item:
      continue
    try:
      d, layers = (int(v) for v in item.lower().split("x"))
    except ValueError:
      raise ValueError(f"size {item!r} is not DxL (e.g. 128x3)") from None
    if d < 1 or layers < 1:
      raise ValueError(f"size {item!r}: d_model and num_layers must be positive")
    sizes.append((d, layers))
  if not sizes:
    raise ValueError("--sizes is empty; pass e.g. 64x2,128x3")
  return sizes


def model_vocab_size(tokenizer_vocab: int) -> int:
  """The tokenizer's vocabulary rounded up to a multiple of 64 (byte: 258 -> 320)."""
  return 64 * math.ceil(tokenizer_vocab / 64)


def make_config(
  args,
  kind: str,
  d_model: int,
  num_layers: int,
  vocab_size: int,
  lr: float | None = None,
  seed: int | None = None,
):
  """One run's full config: everything but the model size, peak lr and seed is shared
  (lr: the kind's first listed rate, seed: the first seed, unless given)."""
  lr = args.lr_lists[kind][0] if lr is None else lr
  seed = args.seed_list[0] if seed is None else seed
  from mmfree_jax.config import base_config

  if d_model % args.head_dim:
    raise ValueError(f"d_model={d_model} is not a multiple of --head_dim={args.head_dim}")
  cfg = base_config()
  cfg.model.update(
    kind=kind,
    vocab_size=vocab_size,
    d_model=d_model,
    num_layers=num_layers,
    num_heads=d_model // args.head_dim,
    scan_type="sequential",
    dtype="float32",
  )
  cfg.data.update(source="builtin_kjv", tokenizer=args.tokenizer, seq_len=args.seq_len, seed=seed)
  cfg.train.update(
    steps=args.steps,
    global_batch=args.batch,
    seed=seed,
    log_every=max(1, args.steps // 10),
    eval_every=args.steps,
    eval_batches=args.eval_batches,
    checkpoint_every=10**9,
    keep_checkpoints=1,
    sample_tokens=0,
  )
  cfg.optim.update(lr=lr, schedule="cosine", warmup_steps=min(args.warmup, args.steps))
  cfg.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
  cfg.lock()
  return cfg


def run_one(
  args,
  kind: str,
  d_model: int,
  num_layers: int,
  vocab_size: int,
  workdir: str,
  lr: float | None = None,
  seed: int | None = None,
) -> dict:
  """Trains one model from scratch in `workdir`; returns its results row."""
  import numpy as np

  from mmfree_jax import accounting
  from mmfree_jax import config as config_lib
  from mmfree_jax.nn.model import count_params
  from mmfree_jax.train import trainer as training

  cfg = make_config(args, kind, d_model, num_layers, vocab_size, lr, seed)
  model_cfg = config_lib.validate(cfg)
  result = training.train(cfg, workdir, progress=args.progress)
  if not result.eval_history:
    raise RuntimeError(f"{kind} d={d_model} L={num_layers}: no validation loss was computed")
  params = count_params(result.model)
  losses = [row["loss"] for row in result.history]
  tokens = args.steps * args.batch * args.seq_len
  per_token = accounting.train_flops_per_token(model_cfg, args.seq_len)
  # Skip the first (compiling) steps for the throughput.
  speeds = [row["tokens_per_s"] for row in result.history[min(3, len(result.history) - 1) :]]
  val = result.eval_history[-1]
  return {
    "kind": kind,
    "d_model": d_model,
    "num_layers": num_layers,
    "intermediate_size": model_cfg.intermediate_size,
    "num_heads": model_cfg.num_heads if kind == "transformer" else 1,
    "vocab_size": vocab_size,
    "params": params,
    "non_embedding_params": params - vocab_size * d_model,
    "tokens": tokens,
    "train_flops_per_token": per_token,
    "train_flops": per_token * tokens,
    "peak_lr": cfg.optim.lr,
    "seed": cfg.train.seed,
    "final_train_loss": float(np.mean(losses[-10:])),
    "last_train_loss": float(losses[-1]),
    "val_loss": float(val["loss"]),
    "val_perplexity": float(val["perplexity"]),
    "val_tokens": float(val["tokens"]),
    "tokens_per_s": float(np.median(speeds)),
    "wall_time_s": float(result.wall_time_s),
  }


def mark_chosen(runs: list[dict]) -> list[dict]:
  """Per (kind, size): the lowest-val-loss row on the tuning seed (the smallest seed run)
  picks the rate; `chosen` marks every row at that rate, `sweep` the tuning-seed rows when
  several rates were tried. In place; returns runs."""
  for key in {(r["kind"], r["d_model"], r["num_layers"]) for r in runs}:
    rows = [r for r in runs if (r["kind"], r["d_model"], r["num_layers"]) == key]
    first = min(r.get("seed", 0) for r in rows)
    tuning = [r for r in rows if r.get("seed", 0) == first]
    best = min(tuning, key=lambda r: r["val_loss"])["peak_lr"]
    several = len({r["peak_lr"] for r in tuning}) > 1
    for r in rows:
      r["chosen"] = r["peak_lr"] == best
      if r.get("seed", 0) == first:
        r["sweep"] = several
  return runs


def summarize(runs: list[dict]) -> dict:
  """Per kind and size: chosen rate, val loss mean/std/n over the chosen rows, the sweep."""
  import numpy as np

  out = {}
  for kind in KINDS:
    for d, layers in sorted({(r["d_model"], r["num_layers"]) for r in runs if r["kind"] == kind}):
      rows = [r for r in runs if (r["kind"], r["d_model"], r["num_layers"]) == (kind, d, layers)]
      vals = [r["val_loss"] for r in rows if r.get("chosen")]
      first = min(r.get("seed", 0) for r in rows)
      out[f"{kind}_d{d}_L{layers}"] = {
        "kind": kind,
        "d_model": d,
        "num_layers": layers,
        "params": rows[0]["params"],
        "chosen_lr": next((r["peak_lr"] for r in rows if r.get("chosen")), None),
        "val_loss_mean": float(np.mean(vals)) if vals else None,
        "val_loss_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
        "n_seeds": len(vals),
        "seeds": sorted(r.get("seed", 0) for r in rows if r.get("chosen")),
        "lr_sweep": {
          format(r["peak_lr"], "g"): r["val_loss"] for r in rows if r.get("seed", 0) == first
        },
      }
  return out


def _size_ticks(runs: list[dict], xkey: str) -> list:
  """One x tick per model size (d_model, num_layers): the smallest `xkey` of its runs."""
  return sorted(
    {
      min(r[xkey] for r in runs if (r["d_model"], r["num_layers"]) == size)
      for size in {(r["d_model"], r["num_layers"]) for r in runs}
    }
  )


def plot(results: dict, path: str) -> None:
  """Val loss vs parameters and vs training FLOPs: per kind, each chosen-rate seed a point,
  the mean a line (error bar: seed std), the LR-sweep rows not chosen a faint x."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from matplotlib.ticker import NullFormatter

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {
    "mmfree": dict(color="C0", marker="o", label="MatMul-free (ternary, MLGRU)"),
    "transformer": dict(color="C1", marker="s", label="Transformer++"),
  }
  for ax, xkey, xlabel in (
    (axes[0], "params", "parameters"),
    (axes[1], "train_flops", "training FLOPs (6N·tokens + attention)"),
  ):
    for kind in KINDS:
      rows = [r for r in results["runs"] if r["kind"] == kind]
      if not rows:
        continue
      # Old single-seed results have no `chosen`: every row counts.
      chosen = [r for r in rows if r.get("chosen", True)]
      sizes = sorted(
        {(r["d_model"], r["num_layers"]) for r in chosen},
        key=lambda s: next(r[xkey] for r in chosen if (r["d_model"], r["num_layers"]) == s),
      )
      xs, means, stds = [], [], []
      for d, layers in sizes:
        group = [r for r in chosen if (r["d_model"], r["num_layers"]) == (d, layers)]
        vals = np.array([r["val_loss"] for r in group])
        xs.append(group[0][xkey])
        means.append(vals.mean())
        stds.append(vals.std(ddof=1) if len(vals) > 1 else 0.0)
        ax.scatter(
          [group[0][xkey]] * len(vals), vals, color=styles[kind]["color"], s=12, alpha=0.6, zorder=3
        )
        lr = group[0]["peak_lr"]
        ax.annotate(
          f"d{d}L{layers} lr {lr:g} n={len(vals)}",
          (xs[-1], means[-1]),
          textcoords="offset points",
          xytext=(4, 4),
          fontsize=7,
        )
      ax.errorbar(xs, means, yerr=stds, capsize=3, **styles[kind])
      for r in rows:
        if not r.get("chosen", True):
          ax.scatter(
            [r[xkey]], [r["val_loss"]], color=styles[kind]["color"], marker="x", s=18, alpha=0.35
          )
    ax.set_xscale("log")
    # One tick per size at its smaller x (the kinds differ by a few %): a few sizes may
    # share one decade, where a log axis would label nothing.
    ticks = _size_ticks(results["runs"], xkey)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  s = results["settings"]
  fig.suptitle(
    f"KJV, tokenizer {s['tokenizer']}, {s['steps']} steps x {s['batch']} x "
    f"{s['seq_len']} tokens ({s['tokens_per_run']:,} tokens per run); points: "
    f"seeds at each kind's best LR, bars: seed std, x: other LRs (seed "
    f"{min(r.get('seed', 0) for r in results['runs'])})",
    fontsize=8,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load_results(out_dir: str) -> dict:
  with open(os.path.join(out_dir, RESULTS_FILE)) as f:
    return json.load(f)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument(
    "--sizes",
    default=DEFAULTS["sizes"],
    help="comma-separated d_model x num_layers, e.g. 64x2,128x3",
  )
  p.add_argument("--kinds", default=DEFAULTS["kinds"], help="mmfree, transformer or both")
  p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
  p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="global batch (rows)")
  p.add_argument("--seq_len", type=int, default=DEFAULTS["seq_len"])
  p.add_argument("--tokenizer", default=DEFAULTS["tokenizer"], help="byte or bpe:<vocab>")
  p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
  p.add_argument(
    "--lr_mmfree",
    default=DEFAULTS["lr_mmfree"],
    help="comma-separated peak LRs, swept on the first seed at every size",
  )
  p.add_argument(
    "--lr_transformer",
    default=DEFAULTS["lr_transformer"],
    help="comma-separated peak LRs, swept on the first seed at every size",
  )
  p.add_argument("--eval_batches", type=int, default=DEFAULTS["eval_batches"])
  p.add_argument(
    "--head_dim",
    type=int,
    default=DEFAULTS["head_dim"],
    help="Transformer++ heads = d_model / head_dim",
  )
  p.add_argument(
    "--seeds",
    default=DEFAULTS["seeds"],
    help="comma-separated; the first tunes the LR, the others run the picked one",
  )
  p.add_argument(
    "--merge",
    default="",
    help="comma-separated results JSONs of one study run in parts: write their "
    "union to OUT_DIR (rates re-picked over all parts), train nothing",
  )
  p.add_argument(
    "--note",
    default="",
    help="with --merge: free text stored as the JSON's `notes` (what was cut, why)",
  )
  p.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "experiments", "results"))
  p.add_argument(
    "--workdir",
    default=None,
    help="where the runs checkpoint (default: a temp dir, deleted at the end)",
  )
  p.add_argument(
    "--toy",
    action="store_true",
    help="tiny sizes and a few steps (seconds); overrides the size/step flags you did not set",
  )
  p.add_argument("--no_plot", action="store_true")
  p.add_argument(
    "--replot",
    action="store_true",
    help="train nothing: redraw OUT_DIR/scaling.png from OUT_DIR's results JSON",
  )
  p.add_argument("--progress", action="store_true", help="tqdm bar per run")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.toy:  # the toy preset replaces defaults, never values given on the command line
    for key, value in TOY.items():
      if getattr(args, key) == parser.get_default(key):
        setattr(args, key, value)
  kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    parser.error(f"--kinds {args.kinds!r}: choose from {KINDS}")
  args.kind_list = kinds
  args.size_list = parse_sizes(args.sizes)
  for name in ("steps", "batch", "seq_len", "eval_batches"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  try:
    args.lr_lists = {
      k: [float(v) for v in getattr(args, f"lr_{k}").split(",") if v.strip()] for k in KINDS
    }
    args.seed_list = [int(v) for v in args.seeds.split(",") if v.strip()]
  except ValueError as e:
    parser.error(f"--lr_mmfree/--lr_transformer/--seeds: {e}")
  if not args.seed_list or not all(args.lr_lists[k] for k in kinds):
    parser.error("--seeds and each run kind's LR list need at least one value")
  if any(lr <= 0 for lrs in args.lr_lists.values() for lr in lrs):
    parser.error("learning rates must be > 0")
  return args


def merge_studies(args) -> dict:
  """`--merge a.json,b.json`: one study from parts run with the same settings."""
  parts = []
  for path in args.merge.split(","):
    with open(path) as f:
      parts.append(json.load(f))
  varying = ("sizes", "kinds", "lr", "seeds")
  shared = lambda part: {k: v for k, v in part["settings"].items() if k not in varying}
  for path, part in zip(args.merge.split(","), parts):
    if shared(part) != shared(parts[0]):
      raise SystemExit(f"--merge: {path} ran with other settings than {args.merge.split(',')[0]}")
  results = dict(parts[0])
  runs = mark_chosen([r for p in parts for r in p["runs"]])
  results.update(
    runs=runs,
    summary=summarize(runs),
    command=" ; ".join(p["command"] for p in parts),
    total_wall_time_s=sum(p["total_wall_time_s"] for p in parts),
    merged_from=args.merge.split(","),
  )
  if args.note:
    results["notes"] = args.note
  results["settings"] = dict(
    results["settings"],
    seeds=sorted({r["seed"] for r in runs}),
    sizes=[list(s) for s in sorted({(r["d_model"], r["num_layers"]) for r in runs})],
    kinds=[k for k in KINDS if any(r["kind"] == k for r in runs)],
    lr={k: sorted({r["peak_lr"] for r in runs if r["kind"] == k}) for k in KINDS},
  )
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=2)
  if not args.no_plot:
    plot(results, os.path.join(args.out_dir, PLOT_FILE))
  print(json.dumps(results["summary"], indent=1))
  return results


def study_settings(args, tokenizer_vocab: int, vocab_size: int) -> dict:
  """The `settings` of a study's results: what every run shares."""
  return {
    "sizes": [list(s) for s in args.size_list],
    "kinds": args.kind_list,
    "steps": args.steps,
    "batch": args.batch,
    "seq_len": args.seq_len,
    "tokens_per_run": args.steps * args.batch * args.seq_len,
    "tokenizer": args.tokenizer,
    "tokenizer_vocab": tokenizer_vocab,
    "model_vocab": vocab_size,
    "schedule": "cosine",
    "warmup": args.warmup,
    "end_lr_ratio": 0.1,
    "lr": {k: args.lr_lists[k] for k in KINDS},
    "seeds": args.seed_list,
    "eval_batches": args.eval_batches,
    "val_tokens_per_eval": args.eval_batches * args.batch * args.seq_len,
    "head_dim": args.head_dim,
    "dtype": "float32",
    "toy": bool(args.toy),
  }


def _study_results(
  args, argv, start: float, tokenizer_vocab: int, vocab_size: int, runs: list[dict]
) -> dict:
  """What OUT_DIR/scaling_results.json holds: the study's description, command, machine,
  settings and summary, and its runs so far (marked chosen where picked)."""
  import jax

  return {
    "description": (
      "MatMul-free LM vs Transformer++ on the built-in KJV corpus: identical "
      "data, tokens and schedule per run; val loss at the end of training; "
      "per-kind LR sweep on the first seed, more seeds at the picked rate"
    ),
    "command": (
      "python experiments/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip(),
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "total_wall_time_s": time.time() - start,
    "machine": {
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
    },
    "settings": study_settings(args, tokenizer_vocab, vocab_size),
    "run_fields": list(RUN_FIELDS),
    "summary": summarize(mark_chosen(runs)),
    "runs": runs,
  }


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.merge:
    return merge_studies(args)
  if args.replot:
    results = load_results(args.out_dir)
    plot(results, os.path.join(args.out_dir, PLOT_FILE))
    print(f"wrote {os.path.join(args.out_dir, PLOT_FILE)}")
    return results
  start = time.time()
  from mmfree_jax import data as data_lib
  from mmfree_jax.data.cache import default_cache_dir

  # One tokenizer for every run (a bpe: one is trained once and cached).
  data_cfg = make_config(args, "mmfree", args.size_list[0][0], args.size_list[0][1], 1 << 20).data
  tokenizer = data_lib.tokenizer_from_config(data_cfg, cache_dir=default_cache_dir())
  vocab_size = model_vocab_size(tokenizer.vocab_size)

  os.makedirs(args.out_dir, exist_ok=True)
  own_workdir = args.workdir is None
  root = tempfile.mkdtemp(prefix="mmfree_scaling_") if own_workdir else args.workdir
  runs = []

  def write() -> dict:
    """OUT_DIR/scaling_results.json (after every run: a partial study is kept)."""
    results = _study_results(args, argv, start, tokenizer.vocab_size, vocab_size, runs)
    with open(os.path.join(args.out_dir, RESULTS_FILE), "w") as f:
      json.dump(results, f, indent=2)
    return results

  def run(kind, d_model, num_layers, lr, seed):
    workdir = os.path.join(root, f"{kind}_d{d_model}_L{num_layers}_lr{lr:g}_s{seed}")
    if os.path.exists(workdir):  # never resume a previous study's run
      shutil.rmtree(workdir)
    row = run_one(args, kind, d_model, num_layers, vocab_size, workdir, lr, seed)
    runs.append(row)
    write()
    print(
      f"{kind:11s} d={d_model:4d} L={num_layers} seed={seed} lr={lr:g} "
      f"params={row['params']:>10,} val_loss={row['val_loss']:.4f} "
      f"train_loss={row['final_train_loss']:.4f} {row['tokens_per_s']:.0f} tok/s "
      f"wall={row['wall_time_s']:.1f}s",
      flush=True,
    )
    return row

  first, rest = args.seed_list[0], args.seed_list[1:]
  try:
    for d_model, num_layers in args.size_list:
      for kind in args.kind_list:
        sweep = [run(kind, d_model, num_layers, lr, first) for lr in args.lr_lists[kind]]
        best = min(sweep, key=lambda r: r["val_loss"])["peak_lr"]
        for seed in rest:
          run(kind, d_model, num_layers, best, seed)
  finally:
    if own_workdir:
      shutil.rmtree(root, ignore_errors=True)

  results = write()
  total = results["total_wall_time_s"]
  path = os.path.join(args.out_dir, RESULTS_FILE)
  print(f"wrote {path} ({len(runs)} runs, {total:.0f} s)")
  if not args.no_plot:
    plot(results, os.path.join(args.out_dir, PLOT_FILE))
    print(f"wrote {os.path.join(args.out_dir, PLOT_FILE)}")
  return results


if __name__ == "__main__":
  main()
