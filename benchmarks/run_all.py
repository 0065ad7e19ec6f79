"""Runs every benchmark (each in its own process) and builds a RESULTS.md from their results.

    python -m benchmarks.run_all [--preset toy|cpu|accel] [--only bench_train,bench_memory]
                                 [--results_dir DIR | --commit_results] [--markdown PATH]

The results go to a new temporary folder unless `--results_dir` names one; only
`--commit_results` rewrites the committed `benchmarks/results/*.json` and `benchmarks/RESULTS.md`.

The default preset `cpu` keeps each script under ~3 minutes on 2 CPU cores; `accel` uses
shapes for a GPU/TPU. A benchmark that fails is reported and the others still run; the exit
status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common, report

BENCHMARKS = (
  "bench_peak",
  "bench_components",
  "bench_train",
  "bench_recurrence",
  "bench_memory",
  "bench_compile",
  "bench_decode",
  "bench_packed",
  "bench_data",
  "bench_checkpoint",
  "bench_checkpoint_storage",
)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__)
  parser.add_argument("--preset", choices=common.PRESETS, default="cpu")
  parser.add_argument("--only", default="", help="comma-separated benchmark names")
  parser.add_argument(
    "--results_dir",
    default=None,
    help="where the JSON files go (default: a new temporary folder; see --commit_results)",
  )
  parser.add_argument(
    "--commit_results",
    action="store_true",
    help="write the committed benchmarks/results/*.json and benchmarks/RESULTS.md",
  )
  parser.add_argument(
    "--in_process",
    action="store_true",
    help="run the benchmarks in this process (saves the per-process start-up "
    "of jax; used by the smoke test). Default: one process each",
  )
  parser.add_argument(
    "--markdown",
    default=None,
    help="default: RESULTS.md next to the results dir's parent "
    "(benchmarks/RESULTS.md for the default results dir)",
  )
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    parser.error(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}")
  if args.commit_results and args.results_dir:
    parser.error("--commit_results writes benchmarks/results; pass it or --results_dir, not both")
  results_dir = common.RESULTS_DIR if args.commit_results else args.results_dir
  if results_dir is None:
    results_dir = os.path.join(tempfile.mkdtemp(prefix="mmfree_bench_"), "results")
  markdown = args.markdown or os.path.join(
    os.path.dirname(os.path.abspath(results_dir)), "RESULTS.md"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  failed = []
  for name in names:
    out = os.path.join(results_dir, f"{name}.json")
    print(f"== {name} ({args.preset})", flush=True)
    t = time.perf_counter()
    bench_args = ["--preset", args.preset, "--out", out]
    if args.in_process:
      try:
        importlib.import_module(f"benchmarks.{name}").main(bench_args)
        ok = True
      except Exception as e:  # report and go on with the others
        print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        ok = False
    else:
      proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}"] + bench_args, cwd=root, env=env
      )
      ok = proc.returncode == 0
    print(f"== {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t:.0f} s", flush=True)
    if not ok:
      failed.append(name)
  os.makedirs(results_dir, exist_ok=True)
  report.write(results_dir, markdown)
  if not args.commit_results and not args.markdown:
    print(f"results in {results_dir}; --commit_results updates benchmarks/RESULTS.md")
  if failed:
    print(f"failed: {failed}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
