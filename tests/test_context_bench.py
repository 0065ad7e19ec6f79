"""`benchmarks.bench_context` at its toy size (in this process: the tests' 8 CPU devices): both
meshes compile, run and report memory and time, and the section renders. Nothing asserts a
timing; the memory comparison is XLA's compiled analysis, the same on every run."""

import math

import pytest


@pytest.mark.slow
def test_bench_context_toy_rows_and_section():
  from benchmarks import bench_context

  results = bench_context.run("toy")
  rows = {r["mesh"]: r for r in results["rows"]}
  assert set(rows) == {"one_device", "context8"}
  for r in rows.values():
    for key in ("peak_bytes", "temp_bytes", "step_s", "compile_s"):
      assert math.isfinite(r[key]) and r[key] > 0, (r["mesh"], key)
  # the activations split over the context axis: less per device than the whole sequence
  assert rows["context8"]["temp_bytes"] < rows["one_device"]["temp_bytes"]
  assert "Context parallelism on CPU" in bench_context.markdown(results, {})
