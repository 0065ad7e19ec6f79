"""`benchmarks.accel_check` cannot rot: its --smoke mode runs every section on CPU and writes
the JSON a device run writes; without --smoke it refuses on a CPU host with a clear message."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env["MMFREE_BENCH_ALLOW_COMPILATION_CACHE"] = "1"  # smoke timings mean nothing
  return subprocess.run([sys.executable, "-m", "benchmarks.accel_check"] + args, cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)


def test_refuses_on_cpu_without_smoke(tmp_path):
  proc = _run(["--out", str(tmp_path / "x.json")], tmp_path)
  assert proc.returncode == 2
  assert "GPU or TPU" in proc.stderr and "--smoke" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "x.json").exists()


def test_smoke_writes_every_section(tmp_path):
  out = tmp_path / "accel.json"
  proc = _run(["--smoke", "--out", str(out)], tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  payload = json.loads(out.read_text())
  res = payload["results"]
  assert res["device"]["backend"] == "cpu" and res["smoke"] is True
  # parity: every registered scan_type / bitlinear_impl, both dtypes, within tolerance
  from mmfree_jax import registry
  checks = {(r["check"], r["dtype"]) for r in res["parity"]}
  for name in registry.SCAN_TYPES:
    if name != "sequential":
      for dtype in ("float32", "bfloat16"):
        assert (f"scan_type={name} vs sequential", dtype) in checks
  for name in registry.BITLINEAR_IMPLS:
    if name != "autodiff":
      assert (f"bitlinear_impl={name} vs autodiff", "float32") in checks
  for name in ("xla", "splash"):  # splash interpreted on CPU
    assert (f"attention_impl={name} vs naive", "float32") in checks
  assert all(r["ok"] for r in res["parity"]), res["parity"]
  kinds = {r["kind"] for r in res["train"] if "tokens_per_s" in r}
  assert kinds == {"mmfree", "transformer"}, res["train"]
  for r in res["train"]:
    if "tokens_per_s" in r:
      assert r["tokens_per_s"] > 0 and math.isclose(
          r["tokens_per_s"], r["batch"] * r["seq_len"] / r["step_s"])
      assert r["mfu_vs_bf16_datasheet"] is None  # no datasheet peak for a CPU
  dec = {r["variant"] for r in res["decode"] if r.get("tokens_per_s", 0) > 0}
  assert dec == {"mmfree", "transformer"}, res["decode"]
