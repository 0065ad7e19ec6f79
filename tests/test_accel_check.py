"""`benchmarks.accel_check` cannot rot: its --smoke mode runs every section on CPU and writes
the JSON a device run writes; without --smoke it refuses on a CPU host with a clear message."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env["MMFREE_BENCH_ALLOW_COMPILATION_CACHE"] = "1"  # smoke timings mean nothing
  return subprocess.run(
    [sys.executable, "-m", "benchmarks.accel_check"] + args,
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.mark.subprocess
def test_refuses_on_cpu_without_smoke(tmp_path):
  proc = _run(["--out", str(tmp_path / "x.json")], tmp_path)
  assert proc.returncode == 2
  assert "GPU or TPU" in proc.stderr and "--smoke" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
@pytest.mark.subprocess
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
        r["tokens_per_s"], r["batch"] * r["seq_len"] / r["step_s"]
      )
      assert r["mfu_vs_bf16_datasheet"] is None  # no datasheet peak for a CPU
  dec = {r["variant"] for r in res["decode"] if r.get("tokens_per_s", 0) > 0}
  assert dec == {"mmfree", "transformer"}, res["decode"]


# ------------------------------------------------------- section budgets, on a fake clock


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def fake_launcher(clock, cost, *, one_per_launch=False, dies_on=()):
  """Runs keys in order, each taking `cost[key]` seconds of the fake clock; stops (as a
  killed child) at the budget, or (as a crashed one) on a key in `dies_on`."""
  launches = []

  def launch(keys, budget):
    launches.append(list(keys))
    for key in keys[:1] if one_per_launch else keys:
      if key in dies_on:
        clock.now += 1
        return
      if cost[key] > budget.left():
        clock.now = budget.end  # killed at the deadline
        return
      clock.now += cost[key]
      yield {"key": key, "t": clock.now}

  return launch, launches


def test_section_budget_cuts_the_running_item_and_skips_the_rest():
  from benchmarks import budget

  clock = FakeClock()
  launch, _ = fake_launcher(clock, {"a": 10, "b": 30, "c": 50, "d": 1})
  seen = []
  rows = budget.run_section(["a", "b", "c", "d"], launch, budget.Budget(60, clock), seen.append)
  assert [r["key"] for r in rows] == ["a", "b", "c", "d"] and seen == rows
  assert "error" not in rows[0] and "error" not in rows[1]
  assert rows[2]["error"].startswith("cut") and "60 s budget" in rows[2]["error"]
  assert "skipped" in rows[3] and clock.now == 60  # the hard deadline, not past it


def test_a_dead_process_is_reported_and_the_rest_relaunched():
  from benchmarks import budget

  clock = FakeClock()
  launch, launches = fake_launcher(clock, {"a": 1, "b": 1, "c": 1}, dies_on={"b"})
  rows = budget.run_section(["a", "b", "c"], launch, budget.Budget(100, clock))
  # b is tried once more on its own before it is reported
  assert "died" in rows[1]["error"] and rows[2] == {"key": "c", "t": 4.0}
  assert launches == [["a", "b", "c"], ["b", "c"], ["c"]]


def test_every_section_gets_its_own_budget_and_the_json_follows_each_row():
  from benchmarks import accel_check

  clock = FakeClock()
  cost = {"p1": 5, "p2": 5, "t1": 100, "t2": 500, "t3": 10, "d1": 20, "d2": 20}
  launchers = {
    "parity": fake_launcher(clock, cost)[0],
    "train": fake_launcher(clock, cost, one_per_launch=True)[0],
    "decode": fake_launcher(clock, cost)[0],
  }
  keys = {"parity": ["p1", "p2"], "train": ["t1", "t2", "t3"], "decode": ["d1", "d2"]}
  results, writes = {}, []
  accel_check.run_sections(
    results,
    {"parity": 60, "train": 300, "decode": 60},
    launchers,
    keys,
    lambda: writes.append(sum(len(results[s]) for s in results)),
    clock=clock,
  )
  assert [r["key"] for r in results["train"]] == ["t1", "t2", "t3"]
  assert results["train"][1]["error"].startswith("cut") and "skipped" in results["train"][2]
  # train overran its budget, decode still ran in full on its own
  # (parity 10 s, train cut at 10 + 300, decode 2 x 20 s)
  assert all("t" in r for r in results["decode"]) and clock.now == 350
  assert writes == list(range(1, 8))  # written after every one of the 7 rows


@pytest.mark.slow
def test_child_rows_kills_a_child_at_the_deadline(tmp_path):
  import time as time_lib

  from benchmarks import budget

  script = (
    "import sys, time\nfrom benchmarks import budget\n"
    "budget.print_row({'key': 'fast'})\ntime.sleep(60)\n"
    "budget.print_row({'key': 'slow'})\n"
  )
  t = time_lib.monotonic()
  rows = list(
    budget.child_rows(
      ["-c", script],
      ["fast", "slow"],
      budget.Budget(8),
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
    )
  )
  assert rows == [{"key": "fast"}] and time_lib.monotonic() - t < 30


def test_train_variants_most_valuable_first():
  from benchmarks import accel_check

  names = [v[0] for v in accel_check.train_variants()]
  assert names[:4] == [
    "mmfree scan=pallas",
    names[1],
    "mmfree scan=pallas bitlinear=int8",
    "mmfree scan=associative",
  ]
  assert names[1].startswith("transformer attention=") and len(names) == len(set(names))
