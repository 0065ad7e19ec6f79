"""The workdir lock in a bucket (the GCS emulator and the S3 server of tests/storage_emulators.py,
real processes): refused while held, a heartbeat while held, taken over once the heartbeat
stops, removed on release; and two `train.py` runs on one `gs://` workdir."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mmfree_jax import paths
from mmfree_jax.train.workdir_lock import (
  HEARTBEAT_NAME,
  LOCK_NAME,
  WorkdirLock,
  WorkdirLockedError,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["gs", "s3"])
def bucket_workdir(request):
  return request.getfixturevalue(f"{'gcs' if request.param == 'gs' else 's3'}_root") + "/run"


def _beat(workdir: str) -> dict:
  return json.loads(paths.read_fresh(paths.join(workdir, HEARTBEAT_NAME)))


def test_second_lock_is_refused_and_release_removes_it(bucket_workdir):
  work = bucket_workdir
  lock = WorkdirLock(work, heartbeat_s=0.3, stale_s=60).acquire()
  try:
    # the same words as on a local disk (tests/test_hardening_train.py)
    with pytest.raises(WorkdirLockedError, match=f"is in use by another run: pid {os.getpid()} "):
      WorkdirLock(work).acquire()
    first = _beat(work)
    assert first["token"] == lock.token
    time.sleep(1.0)  # the daemon thread beats again
    assert _beat(work)["beat"] > first["beat"]
    assert json.loads(paths.read_fresh(paths.join(work, LOCK_NAME)))["token"] == lock.token
  finally:
    lock.release()
  assert paths.read_fresh(paths.join(work, LOCK_NAME)) is None
  assert paths.read_fresh(paths.join(work, HEARTBEAT_NAME)) is None
  WorkdirLock(work).acquire().release()  # free again


def test_lock_with_a_stale_heartbeat_is_taken_over(bucket_workdir, caplog):
  work = bucket_workdir
  old = {"pid": 4242, "host": "gone-host", "started": "earlier", "token": "old", "beat": 0}
  paths.write_atomic(paths.join(work, LOCK_NAME), json.dumps({**old, "heartbeat_s": 1.0}))
  paths.write_atomic(paths.join(work, HEARTBEAT_NAME), json.dumps({"token": "old", "beat": 1}))
  with caplog.at_level(logging.WARNING, logger="mmfree_jax"):
    lock = WorkdirLock(work, heartbeat_s=1.0, stale_s=5.0).acquire()
  assert "pid 4242 on gone-host" in caplog.text and "no heartbeat for" in caplog.text
  assert json.loads(paths.read_fresh(paths.join(work, LOCK_NAME)))["token"] == lock.token
  lock.release()


def test_two_takers_of_a_stale_lock_exactly_one_wins(bucket_workdir):
  """Two runs find the same stale lock at once: both decide to take it over, one conditional
  delete removes the stale version and the other's fails against the new lock; exactly one
  holds the workdir and the other is refused."""
  work = bucket_workdir
  old = {"pid": 4242, "host": "gone-host", "started": "earlier", "token": "old", "beat": 0}
  paths.write_atomic(paths.join(work, LOCK_NAME), json.dumps({**old, "heartbeat_s": 1.0}))
  takers = [WorkdirLock(work, heartbeat_s=1.0, stale_s=5.0) for _ in range(2)]
  start = threading.Barrier(2)
  refused = []

  def take(lock):
    start.wait()
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      refused.append(str(e))

  threads = [threading.Thread(target=take, args=(lock,)) for lock in takers]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  winners = [lock for lock in takers if lock.held]
  try:
    assert len(winners) == 1 and len(refused) == 1, (len(winners), refused)
    held = json.loads(paths.read_fresh(paths.join(work, LOCK_NAME)))
    assert held["token"] == winners[0].token
  finally:
    for lock in winners:
      lock.release()


def test_recent_heartbeat_keeps_an_old_lock(bucket_workdir):
  """The lock object is old but its holder beat a moment ago: refused, naming the fix."""
  work = bucket_workdir
  old = {"pid": 4242, "host": "far-host", "started": "earlier", "token": "live", "beat": 0}
  paths.write_atomic(paths.join(work, LOCK_NAME), json.dumps(old))
  beat = {"token": "live", "beat": time.time()}
  paths.write_atomic(paths.join(work, HEARTBEAT_NAME), json.dumps(beat))
  with pytest.raises(WorkdirLockedError, match="pid 4242 on host far-host.*heartbeat stops"):
    WorkdirLock(work, heartbeat_s=1.0, stale_s=5.0).acquire()


def test_stale_timeout_shorter_than_two_heartbeats_is_refused():
  with pytest.raises(ValueError, match="lock_stale_s=3 must be at least twice"):
    WorkdirLock("gs://b/run", heartbeat_s=2.0, stale_s=3.0)


# ------------------------------------------------------ two train.py runs on one gs:// workdir

_TINY = [
  "--config.model.vocab_size=320",
  "--config.model.d_model=64",
  "--config.model.num_layers=2",
  "--config.data.tokenizer=byte",
  "--config.data.seq_len=32",
  "--config.train.global_batch=8",
  "--config.train.eval_every=0",
  "--config.train.log_every=1",
  "--config.train.sample_tokens=0",
  "--config.train.checkpoint_every=3",
  "--config.train.lock_heartbeat_s=1",
  "--config.train.lock_stale_s=4",
  "--config.optim.warmup_steps=1",
  "--noprogress",
]


def _train(workdir: str, *args: str, **kw) -> subprocess.Popen:
  argv = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *_TINY, *args]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.Popen(argv, cwd=REPO, env=env, text=True, **kw)


def _committed_steps(emulator, workdir: str) -> list[int]:
  done = "/commit_success.txt"
  prefix = paths.join(workdir, "checkpoints") + "/"
  names = [n[len(prefix) :] for n in emulator.list_objects(workdir) if n.startswith(prefix)]
  return sorted(int(n.split("/")[0]) for n in names if n.count("/") == 1 and n.endswith(done))


@pytest.mark.slow
@pytest.mark.subprocess
def test_second_train_run_on_a_gs_workdir_is_refused_and_a_third_takes_over(
  gcs_emulator, gcs_root, tmp_path
):
  work = gcs_root + "/run"
  log = open(tmp_path / "first.log", "w")  # noqa: SIM115
  first = _train(work, "--config.train.steps=100000", stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 240
    while not _committed_steps(gcs_emulator, work):
      assert first.poll() is None and time.monotonic() < deadline, (
        tmp_path / "first.log"
      ).read_text()
      time.sleep(1)
    second = _train(
      work, "--config.train.steps=100000", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = second.communicate(timeout=240)
    assert second.returncode == 1, err[-2000:]
    assert f"is in use by another run: pid {first.pid} on this host" in err, err[-2000:]
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
    log.close()
  assert not os.path.exists(os.path.join(REPO, "gs:")) and not (tmp_path / "gs:").exists()
  time.sleep(5)  # > lock_stale_s after the last beat: train.py can reach the lock in under 4 s
  kept = _committed_steps(gcs_emulator, work)[-1]
  third = _train(
    work,
    "--config.train.steps=100000",
    "--stop_after_steps=2",
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  out, _ = third.communicate(timeout=300)
  assert third.returncode == 0, out[-3000:]
  assert f"workdir lock of a dead run (pid {first.pid} on" in out, out[-3000:]
  resumed = int(out.split("resumed from step ")[1].split()[0].rstrip(";"))
  assert resumed >= kept and f"stopped at step {resumed + 2}" in out, out[-3000:]
  assert resumed + 2 in _committed_steps(gcs_emulator, work)
  rows = [json.loads(r) for r in paths.read_text(paths.join(work, "metrics.jsonl")).splitlines()]
  # every row once: the killed run's rows up to its last checkpoint, then the third run's
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, resumed + 3))
  assert paths.read_fresh(paths.join(work, LOCK_NAME)) is None  # released at the end
