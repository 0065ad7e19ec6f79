"""Cheap user errors are cheap: a config typo, a bad config value, a bad data path, a missing
workdir and "nothing to evaluate" are reported in one line, with a non-zero exit, before jax is
imported (which takes 10-50 s on a loaded machine). Each CLI runs in a subprocess through
`runpy`, and the wrapper reports whether `jax` was in `sys.modules` when the CLI exited."""

import os
import subprocess
import sys

import pytest

from tests.test_cli_logging import log_headers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a CLI as `__main__` and prints, after its exit, whether jax had been imported.
WRAPPER = """
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
code = 0
try:
  runpy.run_path(script, run_name="__main__")
except SystemExit as e:
  code = e.code
print("JAX_IMPORTED=%s" % ("jax" in sys.modules))
sys.exit(code)
"""

CASES = [
  ("train.py", ["--config.train.stepsx=1"], "unknown config key 'train.stepsx'"),
  ("train.py", ["--config.model.d_model=-3"], "model.d_model must be"),
  ("train.py", ["--config.data.paths=/nonexistent/*.jsonl"], "data.source=builtin_kjv ignores"),
  (
    "train.py",
    ["--config.data.source=jsonl", "--config.data.paths=/nonexistent/*.jsonl"],
    "matches no files",
  ),
  ("eval.py", ["--workdir=/nonexistent"], "nothing to evaluate"),
  ("eval.py", ["--workdir=/nonexistent", "--ppl_split=val"], "--workdir=/nonexistent does not"),
  ("eval.py", ["--packed=/nonexistent", "--prompt=x"], "--packed=/nonexistent does not"),
  ("eval.py", ["--workdir=.", "--prompt=x"], "is not a training or import workdir"),
  (
    "train.py",
    ["--config.data.source=array_record", "--config.data.paths=/nonexistent/web"],
    "prepared folder '/nonexistent/web' does not exist",
  ),
  ("eval.py", ["--packed=.", "--ppl_file=notes.txt"], "perplexity file 'notes.txt' not found"),
  ("eval.py", ["--packed=.", "--mc_file=mc.jsonl"], "multiple-choice file 'mc.jsonl' not found"),
  (
    "eval.py",
    ["--packed=.", "--lm_eval_tasks=my_mc", "--lm_eval_include_path=tasks"],
    "--lm_eval_include_path=tasks is not a folder",
  ),
  # The module CLIs (`python -m mmfree_jax.hf import ...`) say `error: ...`.
  (
    "mmfree_jax/hf/__main__.py",
    ["import", "--src=/nonexistent/MMfreeLM-370M", "--workdir=wd"],
    "/nonexistent/MMfreeLM-370M/config.json not found: --src must be an HF model folder",
  ),
  (
    "mmfree_jax/export/__main__.py",
    ["--workdir=/nonexistent/run", "--dst=out"],
    "--workdir=/nonexistent/run does not exist",
  ),
  (
    "mmfree_jax/data/prepare.py",
    ["--inputs=/nonexistent/*.jsonl", "--format=jsonl", "--tokenizer=byte", "--out=wd"],
    "--inputs glob '/nonexistent/*.jsonl' matches no files",
  ),
]


@pytest.mark.subprocess
@pytest.mark.parametrize("script,args,expected", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_user_error_is_one_line_before_jax(tmp_path, script, args, expected):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = REPO
  workdir = tmp_path / "wd"
  extra = [f"--workdir={workdir}"] if script == "train.py" else []
  proc = subprocess.run(
    [sys.executable, "-c", WRAPPER, os.path.join(REPO, script), *args, *extra],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=env,
    timeout=120,
    check=False,
  )
  assert proc.returncode != 0, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  prefix = "error: " if "/" in script else f"{script}: error: "
  assert lines[0].startswith(prefix) and expected in lines[0], lines[0]
  assert "JAX_IMPORTED=False" in proc.stdout, (proc.stdout, proc.stderr)
  assert not workdir.exists(), "a failed start created the workdir"


@pytest.mark.slow
@pytest.mark.subprocess
def test_failed_setup_leaves_no_folder_and_no_traceback(tmp_path):
  """An error found inside `trainer.setup` (after the workdir, its lock and the checkpointer
  were made: here the tokenizer does not fit the model's vocab) is one line on every try, with
  no orbax shutdown traceback after it, and leaves neither `checkpoints/`, the workdir nor the
  parent folder made for it."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = REPO
  workdir = tmp_path / "new" / "wd"  # its parent is created too, and removed
  args = [
    f"--workdir={workdir}",
    "--config.data.tokenizer=byte",
    "--config.model.vocab_size=64",
    "--config.train.steps=2",
  ]
  for _ in range(3):
    proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), *args],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env=env,
      timeout=300,
      check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "model.vocab_size=64" in errors[0], proc.stderr
    assert log_headers(proc.stdout + proc.stderr) == [], proc.stderr  # one log format
    assert not (tmp_path / "new").exists(), sorted(str(p) for p in tmp_path.rglob("*"))
  (workdir / "checkpoints").mkdir(parents=True)  # an existing (empty) workdir stays
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, "train.py"), *args],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=env,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]
