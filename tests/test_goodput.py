"""Goodput accounting: exact fractions on a fake clock, the ledger on disk and in a bucket, and
real runs (metrics.jsonl fields; a run killed after a checkpoint, then resumed)."""

import json
import os
import subprocess
import sys
import time

import pytest

from mmfree_jax import paths
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.train import goodput
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_train_worker.py")
FIELDS = ["goodput"] + [f"badput_{k}" for k in goodput.BADPUT]


class FakeClock:
  def __init__(self):
    self.t = 0.0

  def __call__(self) -> float:
    return self.t

  def advance(self, seconds: float) -> None:
    self.t += seconds


def _timed(rec: goodput.Recorder, clock: FakeClock, name: str, seconds: float) -> None:
  with rec.phase(name):
    clock.advance(seconds)


def _run_a(clock: FakeClock) -> goodput.Recorder:
  """A fresh run: compile 8 s, start-up 2 s, four steps (1 s data each, the first a 3 s compile
  lap, then 2 s steps), a 1 s checkpoint at step 2; killed after step 4 at t=24."""
  rec = goodput.Recorder(clock=clock)
  _timed(rec, clock, "compile", 8)
  clock.advance(2)
  rec.begin_loop(0)
  for step, seconds in ((1, 3), (2, 2), (3, 2), (4, 2)):
    _timed(rec, clock, "data", 1)
    clock.advance(seconds)
    rec.lap(step, first=step == 1)
    if step == 2:  # as the loop does: lap, mark, then save (timed into the next lap's span)
      rec.mark(step)
      _timed(rec, clock, "checkpoint_save", 1)
  return rec


def _run_b(clock: FakeClock) -> goodput.Recorder:
  """Resumes from step 2: restore 1 s, compile 8 s, start-up 3 s, steps 3 (compile lap 3 s), 4
  and 5 (2 s each, 2 s of eval at step 5), the last save's wait 1 s, then 1 s unaccounted."""
  rec = goodput.Recorder(clock=clock)
  _timed(rec, clock, "checkpoint_restore", 1)
  _timed(rec, clock, "compile", 8)
  clock.advance(3)
  rec.begin_loop(2)
  for step, seconds in ((3, 3), (4, 2), (5, 2)):
    _timed(rec, clock, "data", 1)
    clock.advance(seconds)
    if step == 5:
      _timed(rec, clock, "eval", 2)
    rec.lap(step, first=step == 3)
  _timed(rec, clock, "checkpoint_save", 1)
  clock.advance(1)
  return rec


# Worked by hand: wall 24 + 26 = 50 s; kept steps A 2 s (up to its step-2 mark) + B 4 s.
EXPECTED = {
  "goodput": 6 / 50,
  "badput_compile": (8 + 3 + 8 + 3) / 50,
  "badput_checkpoint_save": 2 / 50,
  "badput_checkpoint_restore": 1 / 50,
  "badput_data": 7 / 50,
  "badput_restarts": (4 + 3) / 50,  # A's steps 3-4 (4 s), redone by B, and B's start-up
  "badput_startup": 2 / 50,
  "badput_eval": 2 / 50,
  "badput_other": 1 / 50,
}


def _check_exact(fractions: dict) -> None:
  for key, value in EXPECTED.items():
    assert fractions[key] == pytest.approx(value, abs=1e-12), key
  assert fractions["goodput_wall_s"] == 50
  assert fractions["goodput_lost_steps"] == 2


def test_fractions_of_a_killed_and_resumed_run_are_exact():
  clock = FakeClock()
  a = _run_a(clock).record()
  assert a["wall_s"] == 24 and a["step_s"] == 6 and a["last_step"] == 4
  _check_exact(goodput.breakdown([a, _run_b(clock).record()]))


def test_ledger_carries_the_earlier_runs_across_restarts(tmp_path):
  clock = FakeClock()
  first = goodput.Ledger(str(tmp_path), _run_a(clock))
  alone = first.save()
  assert alone["goodput"] == pytest.approx(6 / 24) and alone["goodput_lost_steps"] == 0
  second = goodput.Ledger(str(tmp_path), _run_b(clock))
  assert len(second.earlier) == 1
  _check_exact(second.fractions())


def test_ledger_in_a_bucket(gcs_root):
  clock = FakeClock()
  goodput.Ledger(gcs_root, _run_a(clock)).save()
  assert paths.exists(paths.join(gcs_root, goodput.LEDGER))
  _check_exact(goodput.Ledger(gcs_root, _run_b(clock)).fractions())
  assert not os.path.exists("gs:")


def _record(first: int, last: int, step_s: float, marks) -> dict:
  return {
    "first_step": first,
    "last_step": last,
    "wall_s": step_s,
    "startup_s": 0.0,
    "step_s": step_s,
    "phases": {},
    "marks": marks,
  }


def test_a_resume_from_an_older_step_wastes_every_later_run_above_it():
  # Run 0 steps 0-10 (marks 4, 8), run 1 resumed at 8 and did 8-12, run 2 resumed at 4
  # (--restore_step): steps 5-10 of run 0 and all of run 1 were redone.
  runs = [_record(0, 10, 10.0, [[4, 4.0], [8, 8.0]]), _record(8, 12, 4.0, [[12, 4.0]])]
  runs.append(_record(4, 6, 2.0, []))
  f = goodput.breakdown(runs)
  assert f["goodput_lost_steps"] == 6 + 4
  assert f["goodput"] == pytest.approx((4 + 0 + 2) / 16)
  assert f["badput_restarts"] == pytest.approx((6 + 4) / 16)
  assert sum(f[k] for k in FIELDS) == pytest.approx(1.0, abs=1e-12)


def test_summary_line_names_each_category():
  clock = FakeClock()
  f = goodput.breakdown([_run_a(clock).record(), _run_b(clock).record()])
  line = goodput.summary_line(f)
  assert line.startswith("goodput 12.0% (compile 44.0%, checkpoint 6.0%, data 14.0%, ")
  assert "restarts 14.0%" in line and "2 step(s) redone" in line


def test_unreadable_ledger_is_reported_and_ignored(tmp_path, caplog):
  (tmp_path / goodput.LEDGER).write_text('{"first_step": 0}\n')
  with caplog.at_level("WARNING", logger="mmfree_jax"):
    ledger = goodput.Ledger(str(tmp_path), goodput.Recorder())
  assert ledger.earlier == [] and "goodput counts this run only" in caplog.text


def test_unknown_phase_and_lap_before_loop_are_errors():
  rec = goodput.Recorder()
  with pytest.raises(ValueError, match="unknown goodput phase"):
    with rec.phase("naps"):
      pass
  with pytest.raises(RuntimeError, match="begin_loop"):
    rec.lap(1)


def _logged_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "goodput" in r]


def _check_rows(rows: list[dict]) -> None:
  assert rows
  for row in rows:
    assert sum(row[k] for k in FIELDS) == pytest.approx(1.0, abs=1e-9)
    assert all(row[k] >= 0 for k in FIELDS), row
    assert row["badput_compile"] > 0
  assert rows[-1]["goodput"] > 0  # the first row's step is all compile


@pytest.mark.slow
def test_training_run_logs_goodput(tmp_path, capsys):
  from mmfree_jax.train.trainer import train  # pylint: disable=import-outside-toplevel

  cfg = small_config(**{"train.steps": 4, "train.checkpoint_every": 2})
  result = train(cfg, str(tmp_path), progress=False)
  rows = _logged_rows(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  _check_rows(rows)
  assert rows[-1]["badput_checkpoint_save"] > 0 and rows[-1]["badput_restarts"] == 0
  assert sum(result.goodput[k] for k in FIELDS) == pytest.approx(1.0, abs=1e-9)
  assert goodput.summary_line(result.goodput).split(" (")[0] in capsys.readouterr().out
  with open(tmp_path / goodput.LEDGER) as f:
    (record,) = map(json.loads, f)
  assert record["first_step"] == 0 and record["last_step"] == 4


def _committed(workdir) -> int | None:
  checkpointer = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def _ledger(workdir) -> list[dict]:
  with open(os.path.join(workdir, goodput.LEDGER)) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_killed_after_a_checkpoint_reports_restarts_and_lost_steps(tmp_path):
  from mmfree_jax.train.trainer import train  # pylint: disable=import-outside-toplevel

  work = tmp_path / "work"
  # The next checkpoint is 50 steps after the first: the kill lands before it commits.
  overrides = {"train.steps": 400, "train.checkpoint_every": 50, "train.log_every": 1}
  cmd = [sys.executable, WORKER, str(work), str(tmp_path / "out"), json.dumps(overrides)]
  log_file = open(tmp_path / "worker.log", "w")  # a pipe could fill and stall the worker
  proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  try:  # kill -9 once a checkpoint is committed and the ledger has recorded steps after it
    while proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
      if os.path.exists(work / goodput.LEDGER) and _committed(work) is not None:
        break
  finally:
    proc.kill()
    log_file.close()
  assert proc.wait() == -9, (tmp_path / "worker.log").read_text()[-3000:]
  (killed,) = _ledger(work)
  with open(work / "metrics.jsonl") as f:
    last_row = max(json.loads(line)["step"] for line in f if line.endswith("\n"))
  restored = _committed(work)
  assert restored == 50 and killed["last_step"] > restored
  cfg = small_config(**overrides)
  result = train(cfg, str(work), progress=False, stop_after_steps=2)
  assert int(result.state.step) == restored + 2
  rows = _logged_rows(work)
  _check_rows(rows)
  resumed = [r for r in rows if r["step"] > restored]
  assert resumed and all(r["badput_restarts"] > 0 for r in resumed)
  lost = killed["last_step"] - restored
  # A step's metrics row is written after its ledger record, and the next step's record may
  # have landed before its row: the ledger counts the steps the killed run wrote, or one more.
  assert last_row - restored <= lost <= last_row - restored + 1
  assert all(r["goodput_lost_steps"] == lost for r in resumed)
  assert result.goodput["goodput_lost_steps"] == lost
  assert len(_ledger(work)) == 2
