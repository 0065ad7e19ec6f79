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

from mmfree_jax.config import ModelConfig
from mmfree_jax.nn.model import abstract_model, count_params
from mmfree_jax.train import flops

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
  assert sorted((r["d_model"], r["num_layers"], r["kind"]) for r in runs) == sorted(
      (d, layers, k) for d, layers in sizes for k in kinds)
  assert results["total_wall_time_s"] > 0
  assert s["tokens_per_run"] == s["steps"] * s["batch"] * s["seq_len"]
  for r in runs:
    assert set(scaling.RUN_FIELDS) <= set(r), set(scaling.RUN_FIELDS) - set(r)
    model_cfg = ModelConfig.from_config(dict(
        kind=r["kind"], vocab_size=r["vocab_size"], d_model=r["d_model"],
        num_layers=r["num_layers"], num_heads=r["d_model"] // s["head_dim"]))
    assert r["params"] == count_params(abstract_model(model_cfg))
    assert r["non_embedding_params"] == r["params"] - r["vocab_size"] * r["d_model"]
    assert r["intermediate_size"] == model_cfg.intermediate_size
    assert r["tokens"] == s["tokens_per_run"]  # identical tokens for every run
    assert r["train_flops_per_token"] == flops.train_flops_per_token(model_cfg, s["seq_len"])
    assert r["train_flops"] == pytest.approx(r["train_flops_per_token"] * r["tokens"])
    assert r["peak_lr"] == s["lr"][r["kind"]]
    for key in ("final_train_loss", "last_train_loss", "val_loss", "tokens_per_s",
                "wall_time_s"):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    # Cross-entropy over the model vocabulary: at most ~log(V) plus noise after any training.
    assert r["val_loss"] < math.log(r["vocab_size"]) + 1.0
    assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6)


def test_toy_study_end_to_end(tmp_path):
  out = tmp_path / "results"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA_FLAGS)
  proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--out_dir", str(out)],
                        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads((out / "scaling_results.json").read_text())
  assert results["settings"]["toy"] is True
  _check_results(results, sizes=[(32, 1), (48, 1)], kinds=["mmfree", "transformer"])
  png = (out / "scaling.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 10_000
  assert "wrote" in proc.stdout and "val_loss=" in proc.stdout
  # --replot redraws the figure from the JSON alone (no training).
  (out / "scaling.png").unlink()
  assert _scaling_module().main(["--replot", "--out_dir", str(out)]) == results
  assert (out / "scaling.png").read_bytes().startswith(PNG_MAGIC)


def test_committed_study_results():
  results = json.loads((RESULTS_DIR / "scaling_results.json").read_text())
  s = results["settings"]
  assert not s["toy"]
  assert len(s["sizes"]) == 3 and s["steps"] >= 100
  _check_results(results, sizes=[tuple(x) for x in s["sizes"]], kinds=["mmfree", "transformer"])
  # Bigger models reach a lower validation loss, for both kinds.
  for kind in ("mmfree", "transformer"):
    losses = [r["val_loss"] for r in sorted(results["runs"], key=lambda r: r["params"])
              if r["kind"] == kind]
    assert losses == sorted(losses, reverse=True), (kind, losses)
  assert (RESULTS_DIR / "scaling.png").read_bytes().startswith(PNG_MAGIC)


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
  assert scaling.model_vocab_size(258) == 320 and scaling.model_vocab_size(4096) == 4096


def test_runs_share_everything_but_size_and_lr():
  scaling = _scaling_module()
  args = scaling.parse_args(["--toy"])
  a = scaling.make_config(args, "mmfree", 32, 1, 320).to_dict()
  b = scaling.make_config(args, "transformer", 48, 2, 320).to_dict()
  assert a["data"] == b["data"] and a["train"] == b["train"]
  a["optim"].pop("lr"), b["optim"].pop("lr")
  assert a["optim"] == b["optim"]
  assert a["model"]["kind"] == "mmfree" and b["model"]["num_heads"] == 48 // args.head_dim
