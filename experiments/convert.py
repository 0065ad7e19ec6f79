"""Converting a Transformer++ into a MatMul-free LM vs training one from scratch (issue 15).

On the built-in KJV corpus (BPE tokenizer), with identical data, batch order and validation
set for every run:

  (a) teacher      Transformer++ trained for T tokens
  (b) converted    MatMul-free student initialised from (a) (`mmfree_jax.convert`) and
                   distilled with `fraction` x T tokens: stage 1 (per-layer hidden alignment)
                   then stage 2 (alpha KL + (1 - alpha) CE), ternary throughout or ramped in
  (c) scratch_full MatMul-free from scratch with T tokens
  (d) scratch_frac MatMul-free from scratch with fraction x T tokens

(b) and (d) run with several seeds (the seed changes the data order and any random
initialisation). Their hyperparameters are tuned first, on the first seed: (d) over
--lr_scratch, (b) over the product of the comma-separated lists --lr_student, --alpha,
--temperature, --stage1_fraction, --quant_ramp_fraction (a ramp > 0 runs with
model.bitlinear_impl='autodiff', which the ramp needs; the rest use the default 'auto'),
--calibrate and --mapping (the student's init: the config's distill.calibrate and
distill.mapping, which `train` applies on the run's first batch).
The lowest validation loss picks the setting the other seeds run with; every tuning row stays
in the JSON, marked `sweep`, and `chosen` marks the rows (all seeds) of the picked setting.
A study run in several invocations (coordinate-wise tuning, then the other seeds) is
combined with --merge, which re-picks the best tuning-seed row over all parts. (c) runs
--lr_full (a list: tuned the same way on its seed) and the teacher --lr_teacher. Output:

  OUT_DIR/convert_results.json   one row per run + settings + summary (gap closed, margins)
  OUT_DIR/convert.png            val loss per variant (each seed a point) and training curves

  python experiments/convert.py                        # the study at the picked settings
                                                       # (the committed one ran in parts,
                                                       # merged: its JSON's command + notes)
  python experiments/convert.py --toy --out_dir /tmp/c  # seconds; what the test runs
  python experiments/convert.py --replot

Everything goes through the library (`train.trainer.train` with a `distill` section), as a
notebook or `train.py` would.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

RESULTS_FILE = "convert_results.json"
PLOT_FILE = "convert.png"
VARIANTS = ("teacher", "converted", "scratch_full", "scratch_frac")
LABELS = {
  "teacher": "(a) Transformer++ teacher, T tokens",
  "converted": "(b) converted MatMul-free, fraction x T",
  "scratch_full": "(c) MatMul-free from scratch, T tokens",
  "scratch_frac": "(d) MatMul-free from scratch, fraction x T",
}

# The (b) and (d) values are the ones the committed study's seed-0 tuning picked (its JSON has
# every tuning run): (b) the calibrated init 'all_norm', LR 3e-3, alpha 0.8, T 1, stage 1 a
# tenth, no ramp, mapping V/K/Q -> i/f/g; (d) 1e-2.
DEFAULTS = dict(
  d_model=128,
  num_layers=2,
  head_dim=32,
  tokenizer="bpe:4096",
  seq_len=128,
  batch=16,
  teacher_steps=500,
  fraction=0.1,
  seeds="0,1,2",
  full_seeds="0",
  lr_teacher=3e-3,
  lr_full="3e-3,1e-2",
  lr_scratch="3e-3,1e-2,3e-2",
  lr_student="3e-3",
  warmup_fraction=0.1,
  stage1_fraction="0.1",
  alpha="0.8",
  temperature="1.0",
  quant_ramp_fraction="0.0",
  calibrate="all_norm",
  mapping="vkq",
  eval_batches=8,
)
# The (b) hyperparameters tuned as a product of lists (each a comma-separated flag).
STUDENT_HP = (
  "lr_student",
  "alpha",
  "temperature",
  "stage1_fraction",
  "quant_ramp_fraction",
  "calibrate",
  "mapping",
)
STRING_HP = ("calibrate", "mapping")
# --calibrate: distill.calibrate, the student's init scales (mmfree_jax.convert.calibrate.
# CALIBRATIONS) folded into its BitLinear norm_scales: 'ternary' the ternary gain of each
# copied kernel (data-free), 'rms' the mean per-token RMS of the teacher's o_proj/down_proj
# inputs on the run's first training batch (the batch step 0 trains on: no extra tokens),
# 'all' both, 'all_norm' both with the norm-preserving gain ||W|| / ||Q(W)|| inside the
# blocks (the head's stays least-squares), 'none' the plain copy.
# --mapping: distill.mapping, the teacher projections (v, k, q) copied into the MLGRU's i, f, g,
# in order (mmfree_jax.convert.init_student_params(mapping=); 'vkq' = V -> i, K -> f, Q -> g).
TOY = dict(
  d_model=32,
  num_layers=1,
  head_dim=16,
  tokenizer="byte",
  seq_len=32,
  batch=8,
  teacher_steps=10,
  seeds="0",
  full_seeds="0",
  eval_batches=1,
  lr_scratch="1e-2",
  lr_full="3e-3",
)


def model_vocab_size(tokenizer_vocab: int) -> int:
  return 64 * math.ceil(tokenizer_vocab / 64)


def make_config(
  args,
  kind: str,
  steps: int,
  lr: float,
  seed: int,
  vocab_size: int,
  teacher: str = "",
  hp: dict | None = None,
):
  """One run's full config; only kind, steps, lr, seed and the distill section (its knobs
  from `hp`, keys of STUDENT_HP) vary."""
  hp = dict(hp or {})
  from mmfree_jax.config import base_config

  cfg = base_config()
  cfg.model.update(
    kind=kind,
    vocab_size=vocab_size,
    d_model=args.d_model,
    num_layers=args.num_layers,
    num_heads=args.d_model // args.head_dim,
    scan_type="sequential",
    dtype="float32",
  )
  cfg.data.update(source="builtin_kjv", tokenizer=args.tokenizer, seq_len=args.seq_len, seed=seed)
  cfg.train.update(
    steps=steps,
    global_batch=args.batch,
    seed=seed,
    log_every=max(1, steps // 20),
    eval_every=steps,
    eval_batches=args.eval_batches,
    checkpoint_every=10**9,
    keep_checkpoints=1,
    sample_tokens=0,
  )
  cfg.optim.update(
    lr=lr, schedule="cosine", warmup_steps=max(1, int(round(args.warmup_fraction * steps)))
  )
  if teacher:
    ramp = int(round(hp["quant_ramp_fraction"] * steps))
    cfg.distill.update(
      teacher=teacher,
      init="teacher",
      stage1_steps=int(round(hp["stage1_fraction"] * steps)),
      temperature=hp["temperature"],
      alpha=hp["alpha"],
      quant_ramp_steps=ramp,
      calibrate=hp["calibrate"],
      mapping=hp["mapping"],
    )
    if ramp:  # the ramp blends x + s (q(x) - x) inside the autodiff BitLinear only
      cfg.model.bitlinear_impl = "autodiff"
  cfg.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
  cfg.lock()
  return cfg


def run_one(
  args,
  variant: str,
  seed: int,
  steps: int,
  lr: float,
  vocab_size: int,
  workdir: str,
  teacher: str = "",
  hp: dict | None = None,
) -> dict:
  import numpy as np

  from mmfree_jax.nn.model import count_params
  from mmfree_jax.train.trainer import train

  kind = "transformer" if variant == "teacher" else "mmfree"
  cfg = make_config(args, kind, steps, lr, seed, vocab_size, teacher, hp)
  if os.path.exists(workdir):  # never resume a previous study's run
    shutil.rmtree(workdir)
  result = train(cfg, workdir, progress=args.progress)
  if not result.eval_history:
    raise RuntimeError(f"{variant} seed {seed}: no validation loss was computed")
  tokens_per_step = args.batch * args.seq_len
  curve = [
    (int(r["step"]) * tokens_per_step, float(r["loss"]), int(r.get("stage", 0)))
    for r in result.history
  ]
  val = result.eval_history[-1]
  return {
    "variant": variant,
    "kind": kind,
    "seed": seed,
    "steps": steps,
    "tokens": steps * tokens_per_step,
    "peak_lr": lr,
    "params": count_params(result.model),
    "val_loss": float(val["loss"]),
    "val_tokens": float(val["tokens"]),
    "final_train_loss": float(np.mean([c[1] for c in curve[-10:] if c[2] != 1] or [np.nan])),
    "wall_time_s": float(result.wall_time_s),
    "distill": dict(cfg.distill.to_dict()) if teacher else None,
    "hp": {"peak_lr": lr, **(dict(hp or {}) if teacher else {})},
    "bitlinear_impl": cfg.model.bitlinear_impl,
    "curve": curve,
  }


def teacher_row(args, workdir: str) -> dict:
  """The teacher's row from a finished teacher workdir (its metrics.jsonl and config.json),
  for `--teacher_workdir` (a study split over several invocations trains it once)."""
  import numpy as np

  from mmfree_jax.checkpoint import loading

  cfg = loading.load_workdir_config(workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  val = [r for r in rows if "val_loss" in r]
  if not val or val[-1]["step"] != cfg.train.steps:
    raise ValueError(f"{workdir} has no final validation loss (train.steps={cfg.train.steps})")
  expected = make_config(
    args, "transformer", cfg.train.steps, cfg.optim.lr, 0, cfg.model.vocab_size
  )
  # The MatMul-free-only fields (recurrence, BitLinear) do not touch a Transformer++ teacher.
  unused = ("scan_type", "chunk_size", "bitlinear_impl")
  model_of = lambda c: {k: v for k, v in c.model.to_dict().items() if k not in unused}
  if model_of(expected) != model_of(cfg) or expected.data.to_dict() != cfg.data.to_dict():
    raise ValueError(f"{workdir} was trained with other model/data settings than these flags")
  tokens_per_step = args.batch * args.seq_len
  return {
    "variant": "teacher",
    "kind": "transformer",
    "seed": 0,
    "steps": cfg.train.steps,
    "tokens": cfg.train.steps * tokens_per_step,
    "peak_lr": cfg.optim.lr,
    "params": None,
    "val_loss": float(val[-1]["val_loss"]),
    "val_tokens": None,
    "final_train_loss": float(np.mean([r["loss"] for r in rows if "loss" in r][-3:])),
    "wall_time_s": None,
    "distill": None,
    "reused": workdir,
    "curve": [(int(r["step"]) * tokens_per_step, float(r["loss"]), 0) for r in rows if "loss" in r],
  }


def _row_hp(row: dict) -> dict:
  """A row's tuned hyperparameters (old rows: the peak LR only; converted rows from before
  --calibrate/--mapping: 'none'/'vkq', the plain copy they ran)."""
  hp = dict(row.get("hp") or {"peak_lr": row["peak_lr"]})
  if row["variant"] == "converted":
    hp.setdefault("calibrate", "none")
    hp.setdefault("mapping", "vkq")
  return hp


def _hp(row: dict) -> tuple:
  """`_row_hp`, comparable across rows."""
  norm = lambda v: v if isinstance(v, str) else round(float(v), 12)
  return tuple(sorted((k, norm(v)) for k, v in _row_hp(row).items()))


def mark_chosen(runs: list[dict]) -> list[dict]:
  """Per tuned variant: the lowest-val-loss row on its tuning seed (the smallest seed it ran)
  picks the setting; `chosen` marks every row (any seed) with that setting, `sweep` every
  tuning-seed row when more than one setting was tried there. In place; returns runs."""
  for v in VARIANTS[1:]:
    rows = [r for r in runs if r["variant"] == v]
    if not rows:
      continue
    first = min(r["seed"] for r in rows)
    tuning = [r for r in rows if r["seed"] == first]
    best = _hp(min(tuning, key=lambda r: r["val_loss"]))
    several = len({_hp(r) for r in tuning}) > 1
    for r in rows:
      r["chosen"] = _hp(r) == best
      if r["seed"] == first:
        r["sweep"] = several
  return runs


def summarize(runs: list[dict]) -> dict:
  import numpy as np

  counted = [r for r in runs if r["variant"] == "teacher" or r.get("chosen")]
  by = {v: [r["val_loss"] for r in counted if r["variant"] == v] for v in VARIANTS}
  stats = {
    v: {
      "mean": float(np.mean(x)),
      "std": float(np.std(x, ddof=1)) if len(x) > 1 else None,
      "n": len(x),
      "values": x,
    }
    for v, x in by.items()
    if x
  }
  out = {
    "val_loss": stats,
    "chosen_lr": {
      v: next((r["peak_lr"] for r in counted if r["variant"] == v), None) for v in VARIANTS
    },
    "chosen_hp": {
      v: next((r.get("hp") for r in counted if r["variant"] == v), None) for v in VARIANTS[1:]
    },
    "tuning_runs": {
      v: sum(1 for r in runs if r["variant"] == v and r.get("sweep")) for v in VARIANTS[1:]
    },
  }
  if {"teacher", "converted", "scratch_frac"} <= set(stats):
    a, b, d = (stats[v]["mean"] for v in ("teacher", "converted", "scratch_frac"))
    out["gap_closed"] = (d - b) / (d - a) if d != a else None
    out["converted_minus_scratch_frac"] = b - d
    noise = [s for s in (stats["converted"]["std"], stats["scratch_frac"]["std"]) if s]
    out["seed_noise_std"] = float(max(noise)) if noise else None
    out["target_gap_closed_0.8"] = bool(out["gap_closed"] is not None and out["gap_closed"] >= 0.8)
    out["target_beats_scratch_frac_beyond_noise"] = bool(noise and d - b > max(noise))
  return out


_COLORS = {"teacher": "C1", "converted": "C2", "scratch_full": "C0", "scratch_frac": "C4"}


def _plot_variants(ax, results: dict) -> None:
  """Left panel: each variant's validation losses (chosen settings; x: the others), mean
  line, and the share of the (d)->(a) gap that (b) closes."""
  import numpy as np

  for i, v in enumerate(VARIANTS):
    rows = [r for r in results["runs"] if r["variant"] == v]
    counted = lambda r: v == "teacher" or r.get("chosen")
    vals = [r["val_loss"] for r in rows if counted(r)]
    if not vals:
      continue
    ax.scatter([i] * len(vals), vals, color=_COLORS[v], zorder=3)
    ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color=_COLORS[v])
    for r in rows:  # tuning runs and other seeds of settings that were not picked
      if not counted(r):
        ax.scatter([i + 0.15], [r["val_loss"]], color=_COLORS[v], marker="x", zorder=3)
  ax.set_xticks(range(len(VARIANTS)))
  ax.set_xticklabels(
    ["(a) teacher", "(b) converted", "(c) scratch\nT tokens", "(d) scratch\nfraction"], fontsize=8
  )
  ax.set_ylabel("validation loss (nats/token); x: runs of settings not chosen", fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  s = results.get("summary", {})
  if s.get("gap_closed") is not None:
    ax.set_title(f"gap (d)->(a) closed by (b): {100 * s['gap_closed']:.1f}%", fontsize=9)


def _plot_tuning(ax, results: dict) -> None:
  """Middle panel: every tuning run (first seed), labelled with its setting; the chosen one
  bold."""
  short = {
    "peak_lr": "lr",
    "alpha": "a",
    "temperature": "T",
    "stage1_fraction": "s1",
    "quant_ramp_fraction": "ramp",
    "calibrate": "init",
    "mapping": "ifg<-",
  }
  tuning = [r for r in results["runs"] if r.get("sweep")]
  for j, r in enumerate(
    sorted(tuning, key=lambda r: (VARIANTS.index(r["variant"]), -r["val_loss"]))
  ):
    hp = _row_hp(r)
    label = f"({'abcd'[VARIANTS.index(r['variant'])]}) " + " ".join(
      f"{short.get(k, k)} {x if isinstance(x, str) else format(x, 'g')}" for k, x in hp.items()
    )
    ax.barh(j, r["val_loss"], color=_COLORS[r["variant"]], alpha=1.0 if r.get("chosen") else 0.45)
    ax.annotate(
      f"{r['val_loss']:.3f}",
      (r["val_loss"], j),
      xytext=(2, 0),
      fontsize=6,
      textcoords="offset points",
      va="center",
    )
    ax.text(
      0.02,
      j,
      label,
      transform=ax.get_yaxis_transform(),
      fontsize=6,
      va="center",
      fontweight="bold" if r.get("chosen") else "normal",
    )
  if tuning:
    lo = min(r["val_loss"] for r in tuning)
    ax.set_xlim(lo - 1.8, max(r["val_loss"] for r in tuning) + 0.15)
  ax.set_yticks([])
  ax.set_xlabel("validation loss, tuning seed (bold/solid: chosen)", fontsize=8)
  ax.set_title("tuning runs", fontsize=9)


def _plot_curves(ax, results: dict) -> None:
  """Right panel: the train-loss curves of the teacher and the chosen runs over training
  tokens (converted: after the teacher's; stage-1 steps omitted)."""
  for r in results["runs"]:
    if r["variant"] != "teacher" and not r.get("chosen"):
      continue
    xs = [c[0] for c in r["curve"] if c[2] != 1]
    ys = [c[1] for c in r["curve"] if c[2] != 1]
    offset = 0
    if r["variant"] == "converted":  # after the teacher's tokens
      offset = results["settings"]["teacher_tokens"]
    label = (
      LABELS[r["variant"]]
      if r["seed"] == min(x["seed"] for x in results["runs"] if x["variant"] == r["variant"])
      else None
    )
    ax.plot([x + offset for x in xs], ys, color=_COLORS[r["variant"]], alpha=0.7, lw=1, label=label)
  ax.set_xlabel("training tokens (converted: after the teacher's)")
  ax.set_ylabel("train loss (CE; stage-1 steps omitted)")
  ax.set_ylim(top=min(ax.get_ylim()[1], 9.0))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n_tuning = sum(1 for r in results["runs"] if r.get("sweep"))
  fig, (left, mid, right) = plt.subplots(
    1, 3, figsize=(17, max(4.8, 1.2 + 0.18 * n_tuning)), gridspec_kw={"width_ratios": [1, 1.1, 1.2]}
  )
  _plot_variants(left, results)
  _plot_tuning(mid, results)
  _plot_curves(right, results)
  st = results["settings"]
  fig.suptitle(
    f"KJV {st['tokenizer']}, d={st['d_model']} L={st['num_layers']}, teacher "
    f"{st['teacher_tokens']:,} tokens, fraction {st['fraction']}",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  for key, value in DEFAULTS.items():
    p.add_argument(f"--{key}", type=type(value), default=value)
  p.add_argument("--skip", default="", help="variants not to run, e.g. scratch_full")
  p.add_argument(
    "--teacher_workdir",
    default="",
    help="a finished teacher run of these settings: reuse it, train no teacher",
  )
  p.add_argument(
    "--merge",
    default="",
    help="comma-separated results JSONs of one study run in parts: write their "
    "union (one teacher row) to OUT_DIR, train nothing",
  )
  p.add_argument(
    "--note",
    default="",
    help="with --merge: free text stored as the JSON's `notes` (what was cut, why)",
  )
  p.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "experiments", "results"))
  p.add_argument("--workdir", default=None, help="run directories (default: a temp dir)")
  p.add_argument("--toy", action="store_true", help="tiny and fast (the test)")
  p.add_argument("--replot", action="store_true")
  p.add_argument("--no_plot", action="store_true")
  p.add_argument("--progress", action="store_true")
  return p


def parse_args(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.toy:
    for key, value in TOY.items():
      if getattr(args, key) == parser.get_default(key):
        setattr(args, key, value)
  args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
  floats = lambda text: [float(v) for v in text.split(",") if v.strip()]
  strings = lambda text: [v.strip() for v in text.split(",") if v.strip()]
  from mmfree_jax.convert.calibrate import CALIBRATIONS

  bad = [c for c in strings(args.calibrate) if c not in CALIBRATIONS]
  if bad:
    parser.error(f"--calibrate {bad}: choose from {tuple(CALIBRATIONS)}")
  from mmfree_jax.convert.student import ConversionError, check_mapping

  for mapping in strings(args.mapping):
    try:
      check_mapping(mapping)
    except ConversionError as e:
      parser.error(f"--mapping: {e}")
  try:
    args.student_grid = [
      dict(zip(STUDENT_HP, values))
      for values in itertools.product(
        *((strings if k in STRING_HP else floats)(getattr(args, k)) for k in STUDENT_HP)
      )
    ]
    args.lr_scratch_list = floats(args.lr_scratch)
    args.lr_full_list = floats(args.lr_full)
  except ValueError as e:
    parser.error(f"a list flag is not comma-separated numbers: {e}")
  if not (args.student_grid and args.lr_scratch_list and args.lr_full_list):
    parser.error("every tuned list flag needs at least one value")
  for hp in args.student_grid:
    if not 0 <= hp["alpha"] <= 1 or hp["temperature"] <= 0:
      parser.error("--alpha values must be in [0, 1] and --temperature values > 0")
    if not (0 <= hp["stage1_fraction"] < 1 and 0 <= hp["quant_ramp_fraction"] <= 1):
      parser.error("--stage1_fraction values must be in [0, 1), --quant_ramp_fraction in [0, 1]")
  args.full_seed_list = [int(s) for s in args.full_seeds.split(",") if s.strip()]
  args.skip_list = [s.strip() for s in args.skip.split(",") if s.strip()]
  bad = [s for s in args.skip_list if s not in VARIANTS]
  if bad or "teacher" in args.skip_list:
    parser.error(f"--skip {args.skip!r}: choose from {VARIANTS[1:]}")
  if not 0 < args.fraction <= 1:
    parser.error("--fraction must be in (0, 1]")
  if args.d_model % args.head_dim:
    parser.error("--d_model must be a multiple of --head_dim")
  return args


def merge_studies(args) -> dict:
  """`--merge a.json,b.json`: one study from parts (the first part's teacher row)."""
  parts = []
  for path in args.merge.split(","):
    with open(path) as f:
      parts.append(json.load(f))
  results = dict(parts[0])
  runs = [r for r in parts[0]["runs"]]
  for part in parts[1:]:
    runs += [r for r in part["runs"] if r["variant"] != "teacher"]
  mark_chosen(runs)
  results.update(
    runs=runs,
    summary=summarize(runs),
    command=" ; ".join(p["command"] for p in parts),
    total_wall_time_s=sum(p["total_wall_time_s"] for p in parts),
    merged_from=args.merge.split(","),
  )
  if args.note:
    results["notes"] = args.note
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(args.out_dir, PLOT_FILE))
  print(json.dumps(results["summary"], indent=1))
  return results


def _tune_and_repeat(
  args,
  variant: str,
  grid: list[dict],
  steps: int,
  seeds: list[int],
  teacher: str,
  vocab_size: int,
  root: str,
  record,
) -> None:
  """Runs `variant` once per setting of `grid` on the first seed, marks the lowest validation
  loss chosen, then runs the chosen setting on the other seeds; `record(row)` gets each run.

  teacher: the teacher's workdir for `converted`, "" otherwise.
  """
  first, rest = seeds[0], seeds[1:]
  sweep = []
  for hp in grid:  # tune on the first seed
    name = "_".join(v if isinstance(v, str) else format(v, "g") for v in hp.values())
    row = run_one(
      args,
      variant,
      first,
      steps,
      hp["peak_lr"],
      vocab_size,
      os.path.join(root, f"{variant}_{first}_{name}"),
      teacher=teacher,
      hp={k: v for k, v in hp.items() if k != "peak_lr"},
    )
    row["sweep"] = len(grid) > 1
    sweep.append(row)
    record(row)
  best = min(sweep, key=lambda r: r["val_loss"])
  best["chosen"] = True
  for seed in rest:
    row = run_one(
      args,
      variant,
      seed,
      steps,
      best["peak_lr"],
      vocab_size,
      os.path.join(root, f"{variant}_{seed}"),
      teacher=teacher,
      hp={k: v for k, v in best["hp"].items() if k != "peak_lr"},
    )
    row["chosen"] = True
    record(row)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.merge:
    return merge_studies(args)
  if args.replot:
    with open(os.path.join(args.out_dir, RESULTS_FILE)) as f:
      results = json.load(f)
    plot(results, os.path.join(args.out_dir, PLOT_FILE))
    return results
  start = time.time()
  from mmfree_jax import data as data_lib
  from mmfree_jax.data.cache import default_cache_dir

  data_cfg = make_config(args, "mmfree", 1, 1e-3, 0, 1 << 20).data
  tokenizer = data_lib.tokenizer_from_config(data_cfg, cache_dir=default_cache_dir())
  vocab_size = model_vocab_size(tokenizer.vocab_size)
  frac_steps = max(1, int(round(args.fraction * args.teacher_steps)))
  own = args.workdir is None
  root = tempfile.mkdtemp(prefix="mmfree_convert_") if own else args.workdir
  os.makedirs(args.out_dir, exist_ok=True)
  runs = []

  def record(row):
    runs.append(row)
    write_results(args, argv, start, tokenizer, vocab_size, frac_steps, runs, plot_it=False)
    print(
      f"{row['variant']:13s} seed={row['seed']} steps={row['steps']:5d} "
      f"val_loss={row['val_loss']:.4f} wall={row['wall_time_s'] or 0:.0f}s",
      flush=True,
    )

  try:
    if args.teacher_workdir:
      teacher_dir = args.teacher_workdir
      record(teacher_row(args, teacher_dir))
    else:
      teacher_dir = os.path.join(root, "teacher")
      record(
        run_one(args, "teacher", 0, args.teacher_steps, args.lr_teacher, vocab_size, teacher_dir)
      )
    scratch_grid = lambda lrs: [{"peak_lr": lr} for lr in lrs]
    student_grid = [
      {"peak_lr": hp["lr_student"], **{k: hp[k] for k in STUDENT_HP[1:]}}
      for hp in args.student_grid
    ]
    plan = (
      ("converted", student_grid, frac_steps, args.seed_list),
      ("scratch_frac", scratch_grid(args.lr_scratch_list), frac_steps, args.seed_list),
      ("scratch_full", scratch_grid(args.lr_full_list), args.teacher_steps, args.full_seed_list),
    )
    for variant, grid, steps, seeds in plan:
      if variant in args.skip_list:
        continue
      teacher = teacher_dir if variant == "converted" else ""
      _tune_and_repeat(args, variant, grid, steps, seeds, teacher, vocab_size, root, record)
  finally:
    if own:
      shutil.rmtree(root, ignore_errors=True)

  return write_results(
    args, argv, start, tokenizer, vocab_size, frac_steps, runs, plot_it=not args.no_plot
  )


def write_results(args, argv, start, tokenizer, vocab_size, frac_steps, runs, plot_it):
  """Writes OUT_DIR/convert_results.json (after every run: a partial study is kept)."""
  import jax

  results = {
    "description": __doc__.split("\n\n")[0],
    "command": (
      "python experiments/convert.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip(),
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "total_wall_time_s": time.time() - start,
    "machine": {
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
    },
    "settings": {
      **{k: getattr(args, k) for k in DEFAULTS},
      "toy": bool(args.toy),
      "tokenizer_vocab": tokenizer.vocab_size,
      "model_vocab": vocab_size,
      "teacher_tokens": args.teacher_steps * args.batch * args.seq_len,
      "student_steps": frac_steps,
      "student_tokens": frac_steps * args.batch * args.seq_len,
    },
    "summary": summarize(mark_chosen(runs)),
    "runs": runs,
  }
  with open(os.path.join(args.out_dir, RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=1)
  if plot_it:
    print(json.dumps(results["summary"], indent=1))
    plot(results, os.path.join(args.out_dir, PLOT_FILE))
  return results


if __name__ == "__main__":
  main()
