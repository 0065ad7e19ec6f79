"""Issue 28, checkpoint and process side: uncommitted steps are set aside and re-saved,
corrupted checkpoint bytes are refused (checksums), the stale-lock takeover is atomic, and
grain workers die with their trainer."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.train import trainer
from mmfree_jax.train.workdir_lock import LOCK_NAME
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# -------------------------------------------------------------------- uncommitted step folders


def test_uncommitted_final_step_is_set_aside_and_saved_again(tmp_path):
  work = str(tmp_path)
  over = {"train.steps": 4, "train.checkpoint_every": 2}
  trainer.train(small_config(**over), work, progress=False)
  os.remove(tmp_path / "checkpoints" / "4" / ckpt_lib.COMMIT_MARKER)  # a save cut short
  result = trainer.train(small_config(**over), work, progress=False)
  assert [r["step"] for r in result.history] == [3, 4]  # resumed from 2, redid 3 and 4
  model, _, step = loading.load_model(work)
  assert step == 4  # saved again, not skipped because a folder named 4 was there
  _, saved = nnx.split(model)
  jax.tree.map(np.testing.assert_array_equal, saved.to_pure_dict(), result.state.params)
  aside = tmp_path / "abandoned_checkpoints"
  (moved,) = os.listdir(aside)
  assert moved.endswith("-uncommitted") and os.listdir(aside / moved) == ["4"]
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readlines()[-1])["step"] == 4


# ------------------------------------------------------------------ stale-lock takeover race

# Waits for a common start time, tries the lock once, then holds it (never releases) until its
# stdin closes, so a racer that comes late finds a live holder, not a free workdir.
_RACER = r"""
import sys, time
from mmfree_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError
work, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
  WorkdirLock(work).acquire()
except WorkdirLockedError:
  print("verdict: refused", flush=True)
  sys.exit(0)
print("verdict: held", flush=True)
sys.stdin.read()
"""


def _verdict(proc):
  for line in proc.stdout:  # the takeover prints a note first
    if line.startswith("verdict: "):
      return line.split()[1]
  return "exited"


def test_stale_lock_race_has_exactly_one_holder(tmp_path):
  racers, trials = 6, 10
  for trial in range(trials):
    work = tmp_path / str(trial)
    work.mkdir()
    (work / LOCK_NAME).write_text(json.dumps(
        {"pid": _dead_pid(), "host": socket.gethostname(), "started": "earlier"}))
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(work), str(start)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(racers)]
    verdicts = [_verdict(p) for p in procs]
    for p in procs:
      p.stdin.close()
    errors = [p.stderr.read() for p in procs]
    for p in procs:
      p.wait(timeout=30)
    assert set(verdicts) <= {"held", "refused"}, (verdicts, errors)
    assert verdicts.count("held") == 1, f"trial {trial}: {verdicts}"


# --------------------------------------------------------------- grain workers die with parent


def _children():
  """{pid: parent pid} of every live (not zombie) process, from /proc."""
  table = {}
  for name in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if fields[0] != "Z":
      table[int(name)] = int(fields[1])
  return table


def _descendants(pid):
  table, found, frontier = _children(), set(), {pid}
  while frontier:
    frontier = {c for c, parent in table.items() if parent in frontier} - found
    found |= frontier
  return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_grain_workers_die_with_a_sigkilled_trainer(tmp_path):
  work = tmp_path / "work"
  overrides = {"data.worker_count": 2, "train.steps": 100000, "train.checkpoint_every": 0,
               "train.log_every": 1}
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "_train_worker.py"), str(work),
       str(tmp_path / "out"), json.dumps(overrides)],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
  try:
    deadline = time.time() + 300
    while not (work / "metrics.jsonl").exists() or not (work / "metrics.jsonl").read_text():
      assert proc.poll() is None and time.time() < deadline, "the trainer made no step"
      time.sleep(0.2)
    children = _descendants(proc.pid)
    assert len(children) >= 2, children  # the two grain workers (and spawn's helpers)
  finally:
    proc.kill()
    proc.wait()
  killed = time.time()
  while (alive := children & set(_children())) and time.time() < killed + 10:
    time.sleep(0.1)
  print(f"{len(children)} child processes, gone {time.time() - killed:.1f} s after the kill")
  for pid in alive:  # do not leave them behind when the test fails
    os.kill(pid, signal.SIGKILL)
  assert not alive, f"processes {sorted(alive)} outlived their SIGKILLed trainer by 10 s"
