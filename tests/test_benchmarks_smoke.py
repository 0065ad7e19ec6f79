"""Every benchmark script runs at its toy size and writes the JSON fields RESULTS.md needs.

One subprocess runs all of them (`benchmarks.run_all --preset toy --in_process`) with XLA's
backend optimizations lowered and the tests' persistent jit cache allowed (compile time
dominates at toy sizes). Nothing here asserts a
timing: only that the numbers exist, are finite and positive, and that the accounting is
consistent (ratios, identical decoded tokens across weight formats, flat decode state).
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = (
  "bench_peak",
  "bench_components",
  "bench_train",
  "bench_recurrence",
  "bench_memory",
  "bench_compile",
  "bench_decode",
  "bench_packed",
  "bench_checkpoint_storage",
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  results, markdown = out / "results", out / "RESULTS.md"
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  # toy timings mean nothing: reuse the tests' persistent jit cache if conftest set one
  env["MMFREE_BENCH_ALLOW_COMPILATION_CACHE"] = "1"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.run_all",
      "--preset",
      "toy",
      "--in_process",
      "--results_dir",
      str(results),
      "--markdown",
      str(markdown),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = {}
  for name in BENCHMARKS:
    with open(results / f"{name}.json") as f:
      data[name] = json.load(f)
  return data, markdown.read_text()


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_every_benchmark_wrote_its_json(toy_run):
  data, _ = toy_run
  for name, payload in data.items():
    assert payload["benchmark"] == name and payload["preset"] == "toy"
    assert payload["machine"]["backend"] == "cpu" and payload["results"]


@pytest.mark.subprocess
def test_peak_and_train_fields(toy_run):
  data, _ = toy_run
  peak = data["bench_peak"]["results"]
  assert _positive(peak["matmul"]["float32"]["flops_per_s"])
  assert _positive(peak["matmul"]["bfloat16"]["flops_per_s"])
  assert _positive(peak["copy"]["gb_per_s"])
  train = data["bench_train"]["results"]
  variants = {r["variant"] for r in train["rows"]}
  assert {"mmfree", "transformer"} <= variants
  for r in train["rows"]:
    assert _positive(r["tokens_per_s"]) and 0 < r["mfu"] < 1.5
    assert math.isclose(r["tokens_per_s"], r["batch"] * r["seq_len"] / r["step_s"])
    assert r["flops_per_token"] > 0
  tf = [r for r in train["rows"] if r["variant"] == "transformer"][0]
  assert tf["speedup_vs_transformer"] == 1.0


@pytest.mark.subprocess
def test_recurrence_and_memory_fields(toy_run):
  data, _ = toy_run
  rec = data["bench_recurrence"]["results"]
  assert {r["scan_type"] for r in rec["rows"]} == {
    "sequential",
    "associative",
    "chunked",
    "sequential_custom_vjp",
  }
  assert all(_positive(r["fwd_bwd_s"]) and r["temp_bytes"] >= 0 for r in rec["rows"])
  mem = data["bench_memory"]["results"]
  by = {r["variant"]: r for r in mem["rows"]}
  assert by["mmfree_autodiff"]["peak_vs_autodiff"] == 1.0
  # compile-time memory analysis is deterministic: the lean BitLinear keeps less
  assert by["mmfree_lean"]["temp_bytes"] < by["mmfree_autodiff"]["temp_bytes"]
  assert mem["bitlinear_stack"]["temp_lean_over_autodiff"] < 1.0


@pytest.mark.subprocess
def test_compile_decode_packed_fields(toy_run):
  data, _ = toy_run
  comp = data["bench_compile"]["results"]["rows"]
  assert [r["num_layers"] for r in comp] == [1, 2] and all(_positive(r["compile_s"]) for r in comp)
  dec = data["bench_decode"]["results"]["rows"]
  mm = [r for r in dec if r["variant"] == "mmfree"]
  tf = [r for r in dec if r["variant"] == "transformer"]
  assert len(mm) == len(tf) >= 2
  assert len({r["state_bytes"] for r in mm}) == 1  # constant recurrent state
  assert tf[-1]["state_bytes"] > tf[0]["state_bytes"]  # the KV cache grows with context
  assert all(_positive(r["tokens_per_s"]) for r in dec)
  packed = data["bench_packed"]["results"]["rows"]
  assert all(r["same_tokens_as_float32"] for r in packed)
  by = {r["variant"]: r for r in packed}
  assert by["2bit_lut"]["bits_per_weight"] == 2.0
  assert by["float32"]["bits_per_weight"] == 32.0
  assert all(_positive(r["bandwidth_bound_tokens_per_s"]) for r in packed)


@pytest.mark.subprocess
def test_checkpoint_storage_fields(toy_run):
  data, md = toy_run
  res = data["bench_checkpoint_storage"]["results"]
  assert [r["backend"] for r in res["rows"]] == ["local", "gcs_emulator", "s3_emulator"]
  for r in res["rows"]:
    for key in ("save_block_s", "commit_s", "restore_s", "interval_s", "plain_interval_s"):
      assert _positive(r[key]), (r["backend"], key)
    assert r["state_bytes"] > 0
  assert "Checkpoint cost by storage" in md and "not real buckets" in md


@pytest.mark.subprocess
def test_markdown_report(toy_run):
  _, md = toy_run
  assert "python -m benchmarks.run_all" in md and "## Targets" in md
  for section in (
    "Machine peaks",
    "Train step",
    "Recurrence",
    "Peak training memory",
    "Compile time",
    "Decode vs context",
    "Packed ternary",
  ):
    assert section in md


def test_report_renders_each_benchmark_from_its_module():
  """`benchmarks.report` holds no section of its own: every name it renders is a module with
  `markdown` (and `targets` where it lists any)."""
  import importlib

  from benchmarks import report

  for name in report.SECTIONS:
    assert callable(importlib.import_module(f"benchmarks.{name}").markdown), name
  for name in report.TARGETS:
    assert callable(importlib.import_module(f"benchmarks.{name}").targets), name
