"""Evaluation and generation on a context mesh (issue 27 item 2): scoring, perplexity and
generation of long inputs under `logical_sharding` on data 2 x context 4 (8 fake CPU devices)
equal one device, in float64 to 1e-12 relative (only the order of the sums differs); the
sequence really is split (the context scan / context attention ran); and eval.py takes the mesh
as `--config.mesh.shape.context=N` on top of the workdir's config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax import config as config_lib
from mmfree_jax import eval as ev
from mmfree_jax import generate as generate_lib
from mmfree_jax.eval import perplexity, scoring
from mmfree_jax.parallel import context_attention, context_scan, sharding
from mmfree_jax.parallel import mesh as mesh_lib
from tests import test_eval
from tests.test_model_reference import randomize_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)
MESH = {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
TOL = 1e-12  # relative, float64


def _close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.max(np.abs(got - want)) <= TOL * max(np.max(np.abs(want)), 1e-300)


def _counting(monkeypatch):
  """Counts the split recurrence and attention calls (traces) of the model."""
  calls = {"split": 0}
  for module, name in (
    (context_scan, "context_recurrence"),
    (context_attention, "context_attention"),
  ):
    real = getattr(module, name)

    def counted(*args, real=real, **kwargs):
      calls["split"] += 1
      return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
  return calls


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_scoring_perplexity_and_generation_on_a_context_mesh_equal_one_device(monkeypatch, kind):
  rng = np.random.default_rng(3)
  mesh = mesh_lib.make_mesh(MESH)
  # One bucket of contexts and one of continuations (two chunks of 16: the state carried);
  # prompts whose length the context does not divide (the prefill takes a multiple of 4, the
  # rest goes step by step).
  requests = [
    (list(rng.integers(1, 250, n)), list(rng.integers(1, 250, m)))
    for n, m in ((3, 30), (8, 21), (1, 32))
  ]
  windows = rng.integers(1, 250, (4, 33))
  segments = np.ones_like(windows)
  segments[:, 19:] = 2  # a document starts mid-window (the reset lands inside a shard)
  prompts = [list(rng.integers(1, 250, 37)), list(rng.integers(1, 250, 42))]
  sampling = generate_lib.SamplingConfig(max_new_tokens=3)
  with jax.enable_x64(True):
    cfg = ModelConfig.tiny(kind=kind, dtype="float64", param_dtype="float64")
    model = mmfree_jax.build_model(cfg, 0)
    randomize_params(model, seed=4)

    def run():
      scored = scoring.score_continuations(model, requests, batch_size=4, chunk_len=16)
      ppl = perplexity.perplexity_of_batches(model, [{"tokens": windows, "segment_ids": segments}])
      return scored, ppl["nll_nats"], generate_lib.generate_batch(model, prompts, sampling)

    want = run()
    calls = _counting(monkeypatch)
    with sharding.logical_sharding(mesh, RULES):
      got = run()
  # Scoring, perplexity and (MatMul-free) the generation prefill traced the split path. The
  # Transformer++ prefill attends through its KV cache (`kv_cache_attention`), which XLA
  # partitions itself: equal, but not the context-attention path.
  assert calls["split"] >= (3 if kind == "mmfree" else 2)
  for g, w in zip(got[0], want[0]):
    _close(g.logprob, w.logprob)
    assert (g.is_greedy, g.num_tokens) == (w.is_greedy, w.num_tokens)
  _close(got[1], want[1])
  assert got[2] == want[2]


def test_prefill_length_is_a_multiple_of_the_context():
  mesh = mesh_lib.make_mesh(MESH)
  assert generate_lib.prefill_length(42) == 42  # no mesh: the whole shortest prompt
  with sharding.logical_sharding(mesh, RULES):
    assert [generate_lib.prefill_length(n) for n in (42, 40, 4, 3, 1)] == [40, 40, 4, 3, 1]


def test_a_packed_model_on_a_mesh_is_refused(tmp_path):
  options = ev.EvalOptions(prompts=["hi"])
  with pytest.raises(ValueError, match="packed model runs on one device"):
    ev.evaluate_workdir(str(tmp_path), options, packed=True, mesh=mesh_lib.make_mesh(MESH))


def test_eval_cli_refuses_a_mesh_for_packed_before_jax(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "eval.py"),
      f"--packed={tmp_path}",
      "--prompt=x",
      "--config.mesh.shape.context=4",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("eval.py: error: --config.mesh.shape ")


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_cli_on_a_context_mesh_equals_one_device(tmp_path):
  """eval.py --config.mesh.shape.context=4 (data 2 x context 4 of 8 fake devices) on a float64
  workdir: the perplexity of a long document and of the validation windows, and the greedy
  continuation of a long prompt, equal the library on one device."""
  workdir = tmp_path / "wd"
  cfg = test_eval._tiny_config()
  with cfg.unlocked():
    cfg.model.update(dtype="float64", param_dtype="float64")
  with jax.enable_x64(True):
    test_eval._make_workdir(workdir, config=cfg)
  doc = tmp_path / "doc.txt"
  doc.write_text("In the beginning God created the heaven and the earth. " * 3 + "\n")
  prompt = "And the earth was without form, and void; and darkness was upon the deep."
  options = dict(
    ppl_files=[str(doc)],
    ppl_split="val",
    val_batches=1,
    prompts=[prompt],
    batch_size=8,
    chunk_len=16,
  )
  sampling = generate_lib.SamplingConfig(max_new_tokens=4)
  env = dict(
    os.environ,
    MMFREE_CACHE=str(tmp_path / "cache"),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  cmd = [
    sys.executable,
    os.path.join(REPO, "eval.py"),
    f"--workdir={workdir}",
    "--config.mesh.shape.context=4",
    f"--ppl_file={doc}",
    "--ppl_split=val",
    "--val_batches=1",
    f"--prompt={prompt}",
    "--max_new_tokens=4",
    "--batch_size=8",
    "--chunk_len=16",
    f"--output_dir={tmp_path / 'out'}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh: {'data': 2, 'fsdp': 1, 'context': 4, 'tensor': 1}" in proc.stdout
  with open(tmp_path / "out" / "step_0.json") as f:
    got = json.load(f)
  os.environ["MMFREE_CACHE"] = str(tmp_path / "cache")  # the val split the CLI prepared
  try:
    with jax.enable_x64(True):
      want = ev.evaluate_workdir(
        str(workdir), ev.EvalOptions(**options, sampling=sampling), write=False
      )
  finally:
    del os.environ["MMFREE_CACHE"]
  for name in (str(doc), "val"):
    assert got["perplexity"][name]["tokens"] == want["perplexity"][name]["tokens"]
    _close(got["perplexity"][name]["nll_nats"], want["perplexity"][name]["nll_nats"])
  assert got["generation"][0]["token_ids"] == want["generation"][0]["token_ids"]
