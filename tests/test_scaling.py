"""experiments/scaling.py: the toy study runs end to end through its CLI, and the committed
results of the real study are complete."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from mmfree_jax import accounting
from mmfree_jax.config import ModelConfig
from mmfree_jax.nn.model import abstract_model, count_params

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "scaling.py"
RESULTS_DIR = REPO / "experiments" / "results"
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scaling_module():
  spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_results(results: dict, *, sizes, kinds) -> None:
  """The fields of every run, their consistency with the library, finite losses."""
  scaling = _scaling_module()
  s = results["settings"]
  runs = results["runs"]
  assert {(r["d_model"], r["num_layers"], r["kind"]) for r in runs} == {
    (d, layers, k) for d, layers in sizes for k in kinds
  }
  assert results["total_wall_time_s"] > 0
  assert s["tokens_per_run"] == s["steps"] * s["batch"] * s["seq_len"]
  for r in runs:
    assert set(scaling.RUN_FIELDS) <= set(r), set(scaling.RUN_FIELDS) - set(r)
    model_cfg = ModelConfig.from_config(
      dict(
        kind=r["kind"],
        vocab_size=r["vocab_size"],
        d_model=r["d_model"],
        num_layers=r["num_layers"],
        num_heads=r["d_model"] // s["head_dim"],
      )
    )
    assert r["params"] == count_params(abstract_model(model_cfg))
    assert r["non_embedding_params"] == r["params"] - r["vocab_size"] * r["d_model"]
    assert r["intermediate_size"] == model_cfg.intermediate_size
    assert r["tokens"] == s["tokens_per_run"]  # identical tokens for every run
    assert r["train_flops_per_token"] == accounting.train_flops_per_token(model_cfg, s["seq_len"])
    assert r["train_flops"] == pytest.approx(r["train_flops_per_token"] * r["tokens"])
    assert r["peak_lr"] in s["lr"][r["kind"]] and r["seed"] in s["seeds"]
    for key in ("final_train_loss", "last_train_loss", "val_loss", "tokens_per_s", "wall_time_s"):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    # Cross-entropy over the model vocabulary: at most ~log(V) plus noise after any training.
    assert r["val_loss"] < math.log(r["vocab_size"]) + 1.0
    assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6)


@pytest.mark.slow
@pytest.mark.subprocess
def test_toy_study_end_to_end(tmp_path):
  out = tmp_path / "results"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA_FLAGS)
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--toy", "--out_dir", str(out)],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads((out / "scaling_results.json").read_text())
  assert results["settings"]["toy"] is True
  _check_results(results, sizes=[(32, 1), (48, 1)], kinds=["mmfree", "transformer"])
  assert len(results["runs"]) == 4 and all(r["chosen"] for r in results["runs"])
  assert set(results["summary"]) == {
    f"{k}_d{d}_L1" for k in ("mmfree", "transformer") for d in (32, 48)
  }
  png = (out / "scaling.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 10_000
  assert "wrote" in proc.stdout and "val_loss=" in proc.stdout
  # --replot redraws the figure from the JSON alone (no training).
  (out / "scaling.png").unlink()
  assert _scaling_module().main(["--replot", "--out_dir", str(out)]) == results
  assert (out / "scaling.png").read_bytes().startswith(PNG_MAGIC)


def test_committed_study_results():
  """Issue 15's protocol: BPE tokens, more steps than the old 250 (of bytes), a per-kind LR
  sweep at every size, >= 3 seeds at the picked rate."""
  results = json.loads((RESULTS_DIR / "scaling_results.json").read_text())
  s = results["settings"]
  assert not s["toy"]
  assert len(s["sizes"]) >= 2 and s["steps"] >= 600 and s["tokenizer"].startswith("bpe:")
  _check_results(results, sizes=[tuple(x) for x in s["sizes"]], kinds=["mmfree", "transformer"])
  scaling = _scaling_module()
  runs = [dict(r) for r in results["runs"]]
  scaling.mark_chosen(runs)  # the committed marks are the ones the rule gives
  assert [r["chosen"] for r in runs] == [r["chosen"] for r in results["runs"]]
  summary = results["summary"]
  assert summary == scaling.summarize(results["runs"])
  for entry in summary.values():
    assert entry["n_seeds"] >= 3 and len(entry["lr_sweep"]) >= 3, entry
  # Bigger models reach a lower mean validation loss, for both kinds.
  for kind in ("mmfree", "transformer"):
    means = [
      e["val_loss_mean"]
      for e in sorted(summary.values(), key=lambda e: e["params"])
      if e["kind"] == kind
    ]
    assert means == sorted(means, reverse=True), (kind, means)
  assert (RESULTS_DIR / "scaling.png").read_bytes().startswith(PNG_MAGIC)


def test_lr_pick_and_seed_summary():
  scaling = _scaling_module()
  row = lambda kind, lr, seed, val: {
    "kind": kind,
    "d_model": 64,
    "num_layers": 2,
    "params": 10,
    "peak_lr": lr,
    "seed": seed,
    "val_loss": val,
  }
  runs = [
    row("mmfree", 3e-3, 0, 5.0),
    row("mmfree", 1e-2, 0, 4.8),
    row("mmfree", 1e-2, 1, 4.9),
    row("mmfree", 1e-2, 2, 5.0),
    row("transformer", 3e-3, 1, 4.0),
    row("transformer", 3e-3, 2, 4.2),
  ]
  scaling.mark_chosen(runs)
  assert [r["chosen"] for r in runs] == [False, True, True, True, True, True]
  assert runs[0]["sweep"] and runs[1]["sweep"] and "sweep" not in runs[2]
  assert runs[4]["sweep"] is False  # one rate on the tuning seed (1: the smallest there)
  s = scaling.summarize(runs)
  assert s["mmfree_d64_L2"]["chosen_lr"] == 1e-2 and s["mmfree_d64_L2"]["n_seeds"] == 3
  assert s["mmfree_d64_L2"]["val_loss_mean"] == pytest.approx(4.9)
  assert s["mmfree_d64_L2"]["val_loss_std"] == pytest.approx(0.1)
  assert s["mmfree_d64_L2"]["lr_sweep"] == {"0.003": 5.0, "0.01": 4.8}
  assert s["transformer_d64_L2"]["n_seeds"] == 2


def test_cli_parsing():
  scaling = _scaling_module()
  assert scaling.parse_sizes("64x2, 128X3") == [(64, 2), (128, 3)]
  for bad in ("64", "64x", "0x2", "", "axb"):
    with pytest.raises(ValueError):
      scaling.parse_sizes(bad)
  args = scaling.parse_args(["--toy", "--steps", "7"])
  assert args.steps == 7  # explicit flags win over the preset
  assert args.size_list == [(32, 1), (48, 1)] and args.seq_len == scaling.TOY["seq_len"]
  args = scaling.parse_args([])
  assert args.size_list == scaling.parse_sizes(scaling.DEFAULTS["sizes"])
  assert args.kind_list == ["mmfree", "transformer"]
  with pytest.raises(SystemExit):
    scaling.parse_args(["--kinds", "rnn"])
  with pytest.raises(SystemExit):
    scaling.parse_args(["--steps", "0"])
  with pytest.raises(SystemExit):
    scaling.parse_args(["--lr_mmfree", "1e-2,x"])
  with pytest.raises(SystemExit):
    scaling.parse_args(["--seeds", ""])
  args = scaling.parse_args(["--lr_mmfree", "3e-3, 1e-2", "--seeds", "0,1,2"])
  assert args.lr_lists["mmfree"] == [3e-3, 1e-2] and args.seed_list == [0, 1, 2]
  assert args.tokenizer.startswith("bpe:") and args.steps >= 600
  assert scaling.model_vocab_size(258) == 320 and scaling.model_vocab_size(4096) == 4096


def test_runs_share_everything_but_size_and_lr():
  scaling = _scaling_module()
  args = scaling.parse_args(["--toy"])
  a = scaling.make_config(args, "mmfree", 32, 1, 320).to_dict()
  b = scaling.make_config(args, "transformer", 48, 2, 320, lr=1e-2).to_dict()
  assert b["optim"]["lr"] == 1e-2
  assert scaling.make_config(args, "mmfree", 32, 1, 320, seed=4).train.seed == 4
  assert a["data"] == b["data"] and a["train"] == b["train"]
  a["optim"].pop("lr"), b["optim"].pop("lr")
  assert a["optim"] == b["optim"]
  assert a["model"]["kind"] == "mmfree" and b["model"]["num_heads"] == 48 // args.head_dim


def test_merge_repicks_rates_over_parts(tmp_path):
  """A study run in parts: the union of the runs, each (kind, size)'s rate re-picked over all
  parts' tuning-seed rows, settings that differ between parts refused."""
  scaling = _scaling_module()
  settings = {
    "sizes": [[32, 2]],
    "kinds": ["mmfree"],
    "steps": 10,
    "batch": 2,
    "seq_len": 8,
    "tokens_per_run": 160,
    "tokenizer": "byte",
    "lr": {"mmfree": [1e-2]},
    "seeds": [0],
    "toy": False,
  }
  row = lambda lr, seed, val: {
    "kind": "mmfree",
    "d_model": 32,
    "num_layers": 2,
    "params": 10,
    "peak_lr": lr,
    "seed": seed,
    "val_loss": val,
  }
  parts = [
    [row(1e-2, 0, 4.0)],
    [row(3e-3, 0, 3.9), row(3e-2, 0, 4.5)],
    [row(3e-3, 1, 3.95), row(3e-3, 2, 3.85)],
  ]
  paths = []
  for i, runs in enumerate(parts):
    path = tmp_path / f"part{i}.json"
    path.write_text(
      json.dumps(
        {"command": f"part {i}", "total_wall_time_s": 1.0, "settings": settings, "runs": runs}
      )
    )
    paths.append(str(path))
  out = scaling.main(
    [
      "--merge",
      ",".join(paths),
      "--out_dir",
      str(tmp_path / "m"),
      "--no_plot",
      "--note",
      "cut: nothing",
    ]
  )
  assert out["notes"] == "cut: nothing" and out["total_wall_time_s"] == 3.0
  assert [r["chosen"] for r in out["runs"]] == [False, True, False, True, True]
  entry = out["summary"]["mmfree_d32_L2"]
  assert entry["chosen_lr"] == 3e-3 and entry["n_seeds"] == 3
  assert out["settings"]["lr"]["mmfree"] == [3e-3, 1e-2, 3e-2]
  assert out["settings"]["seeds"] == [0, 1, 2]
  assert json.loads((tmp_path / "m" / "scaling_results.json").read_text()) == out
  other = tmp_path / "other.json"
  other.write_text(
    json.dumps(
      {"command": "x", "total_wall_time_s": 1.0, "settings": dict(settings, steps=20), "runs": []}
    )
  )
  with pytest.raises(SystemExit):
    scaling.main(["--merge", f"{paths[0]},{other}", "--out_dir", str(tmp_path / "n")])
