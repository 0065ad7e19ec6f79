"""Reading benchmark results leaves the checkout as it was: `benchmarks.aot_tpu --table` prints
the cached table without rewriting `benchmarks/results/aot_tpu.json`, and `benchmarks.run_all`
and each benchmark write to a temporary folder unless `--results_dir`/`--out` or
`--commit_results` says otherwise.
Each check compares the bytes and mtimes of every file under benchmarks/ before and after."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def _snapshot() -> dict:
  """{path: (mtime_ns, bytes)} of every file under benchmarks/ (caches excluded)."""
  out = {}
  for root, dirs, files in os.walk(BENCH):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[path] = (os.stat(path).st_mtime_ns, f.read())
  return out


def _run(args, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


def _changed(before: dict, after: dict) -> list[str]:
  return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


@pytest.mark.subprocess
def test_aot_tpu_table_writes_nothing(tmp_path):
  before = _snapshot()
  proc = _run(["benchmarks.aot_tpu", "--table"], tmp_path)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "mmfree-370m" in proc.stdout, proc.stdout[-2000:]
  assert _changed(before, _snapshot()) == []


@pytest.mark.subprocess
def test_run_all_writes_to_a_temporary_folder_by_default(tmp_path):
  before = _snapshot()
  proc = _run(
    ["benchmarks.run_all", "--preset", "toy", "--only", "bench_peak", "--in_process"], tmp_path
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert _changed(before, _snapshot()) == []
  (made,) = [p for p in tmp_path.iterdir() if p.name.startswith("mmfree_bench_")]
  assert (made / "results" / "bench_peak.json").is_file()
  assert "## " in (made / "RESULTS.md").read_text()
  assert str(made / "results") in proc.stdout


@pytest.mark.subprocess
def test_one_benchmark_writes_to_a_temporary_folder_by_default(tmp_path):
  """`python -m benchmarks.bench_context` (a README command) rewrote its committed JSON."""
  before = _snapshot()
  proc = _run(["benchmarks.bench_peak", "--preset", "toy"], tmp_path)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert _changed(before, _snapshot()) == []
  assert (tmp_path / "mmfree_bench" / "bench_peak.json").is_file(), proc.stdout[-2000:]


def test_run_all_refuses_commit_results_with_results_dir(tmp_path, capsys):
  from benchmarks import run_all

  with pytest.raises(SystemExit) as e:
    run_all.main(["--commit_results", "--results_dir", str(tmp_path)])
  assert e.value.code == 2 and "not both" in capsys.readouterr().err
