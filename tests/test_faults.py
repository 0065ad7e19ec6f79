"""Fault tolerance, done for real: signals, kill -9 (also mid-checkpoint), corrupted files,
non-finite steps, a dead peer process, unusable workdirs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.train import trainer as training
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_train_worker.py")
STEPS = 16
OVERRIDES = {
  "train.steps": STEPS,
  "train.checkpoint_every": 2,
  "train.keep_checkpoints": 3,
  "train.log_every": 1,
}


def _start(workdir, out, overrides=OVERRIDES, env=None, extra_args=()):
  cmd = [sys.executable, WORKER, str(workdir), str(out), json.dumps(overrides), *extra_args]
  full_env = dict(os.environ, **(env or {}))
  return subprocess.Popen(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env
  )


def _metric_rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def _wait_for_rows(proc, workdir, rows, timeout=240):
  deadline = time.time() + timeout
  while _metric_rows(workdir) < rows:
    if proc.poll() is not None:
      return False
    assert time.time() < deadline, "worker made no progress"
    time.sleep(0.05)
  return True


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _params(prefix):
  data = np.load(str(prefix) + ".npz")
  return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the same config (params and per-step losses)."""
  d = tmp_path_factory.mktemp("reference")
  rc, out = _finish(_start(d / "work", d / "out"))
  assert rc == 0, out[-3000:]
  return _params(d / "out"), json.load(open(d / "out.json"))


def _assert_same_params(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # same arithmetic: bitwise


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_saves_current_step_exits_zero_and_resume_is_exact(tmp_path, reference):
  work = tmp_path / "work"
  proc = _start(work, tmp_path / "first")
  assert _wait_for_rows(proc, work, 5)
  proc.send_signal(signal.SIGTERM)
  rc, out = _finish(proc)
  assert rc == 0, out[-3000:]
  stopped_at = json.load(open(tmp_path / "first.json"))["final_step"]
  assert 5 <= stopped_at < STEPS
  checkpointer = ckpt_lib.Checkpointer(str(work), read_only=True)
  assert checkpointer.latest_step() == stopped_at  # the current step, not the last periodic one
  checkpointer.close()
  rc, out = _finish(_start(work, tmp_path / "second"))
  assert rc == 0, out[-3000:]
  _assert_same_params(_params(tmp_path / "second"), reference[0])


@pytest.mark.slow
@pytest.mark.subprocess
def test_kill9_at_random_points_always_restores_last_complete_checkpoint(tmp_path, reference):
  work = tmp_path / "work"
  rng = random.Random(0)
  kill_points = []
  while True:
    proc = _start(work, tmp_path / "run")
    target = _metric_rows(work) + rng.randint(1, 4)
    if not _wait_for_rows(proc, work, target):
      break  # finished before the kill point
    time.sleep(rng.uniform(0.0, 0.3))  # lands inside async checkpoint writes too
    proc.kill()
    proc.wait()
    kill_points.append(_metric_rows(work))
    # A partial (temporary) checkpoint is never listed, and the latest one restores.
    checkpointer = ckpt_lib.Checkpointer(str(work), read_only=True)
    listed = checkpointer.all_steps()
    checkpointer.close()
    ckpt_dir = ckpt_lib.checkpoint_dir(str(work))
    on_disk = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    assert all(str(s) in on_disk for s in listed)
    if listed:
      cfg = small_config(**OVERRIDES)
      model_cfg = loading.config_lib.ModelConfig.from_config(cfg.model)
      params, step = loading.load_params(str(work), model_cfg)
      assert step == max(listed)
      assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    if len(kill_points) >= 4:
      rc, out = _finish(_start(work, tmp_path / "run"))
      assert rc == 0, out[-3000:]
      break
  print(f"kill -9 points tried (metric rows at kill): {kill_points}")
  assert len(kill_points) >= 3
  _assert_same_params(_params(tmp_path / "run"), reference[0])


@pytest.mark.slow
def test_corrupted_checkpoint_names_step_and_file_and_older_step_recovers(tmp_path):
  work = tmp_path / "work"
  cfg = small_config(**{**OVERRIDES, "train.steps": 6})
  training.train(cfg, str(work), progress=False)
  ckpt_dir = ckpt_lib.checkpoint_dir(str(work))
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert steps[-1] == 6 and 4 in steps
  # truncate every array file of the newest train state
  for root, _, files in os.walk(os.path.join(ckpt_dir, "6", "state")):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  cfg8 = small_config(**{**OVERRIDES, "train.steps": 8})  # a longer schedule: allowed below
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 6.*--restore_step"):
    training.train(cfg8, str(work), progress=False, allow_steps_change=True)
  result = training.train(cfg8, str(work), progress=False, restore_step=4, allow_steps_change=True)
  assert int(result.state.step) == 8
  assert os.listdir(os.path.join(work, "abandoned_checkpoints"))


@pytest.mark.slow
def test_corrupted_checkpoint_config_is_a_clear_error(tmp_path):
  work = tmp_path / "work"
  training.train(small_config(**{"train.steps": 2}), str(work), progress=False)
  config_dir = os.path.join(ckpt_lib.checkpoint_dir(str(work)), "2", "config")
  for name in os.listdir(config_dir):
    with open(os.path.join(config_dir, name), "w") as f:
      f.write("{not json")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"config of checkpoint step 2"):
    training.train(small_config(**{"train.steps": 4}), str(work), progress=False)


def _exploding(**extra):
  # lr 1e30: the first update makes the params ~1e30, the next forward overflows (inf/NaN).
  return small_config(
    **{
      "train.steps": 5,
      "optim.lr": 1e30,
      "optim.warmup_steps": 0,
      "optim.schedule": "constant",
      "optim.clip_norm": 0.0,
      "train.checkpoint_every": 1,
      **extra,
    }
  )


@pytest.mark.slow
@pytest.mark.usefixtures("allow_exploding_lr")
def test_nan_policy_skip_counts_and_never_checkpoints_nans(tmp_path):
  # no validation: a non-finite final validation loss would end the run with an error
  result = training.train(
    _exploding(**{"train.nan_policy": "skip", "train.eval_batches": 0}),
    str(tmp_path),
    progress=False,
  )
  skipped = [r["skipped_steps"] for r in result.history]
  assert skipped[-1] >= 3 and skipped == sorted(skipped)  # counted, monotone
  assert [r["finite"] for r in result.history][0] == 1.0
  params, _ = loading.load_params(
    str(tmp_path), loading.config_lib.ModelConfig.from_config(_exploding().model)
  )
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


@pytest.mark.slow
@pytest.mark.usefixtures("allow_exploding_lr")
def test_nan_policy_stop_names_the_step(tmp_path):
  with pytest.raises(training.NonFiniteLossError, match=r"at step 2\b"):
    training.train(_exploding(**{"train.nan_policy": "stop"}), str(tmp_path), progress=False)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  assert checkpointer.all_steps() and max(checkpointer.all_steps()) <= 2
  checkpointer.close()


def test_unwritable_workdir_fails_before_compute(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(OSError, match="not writable"):
    training.train(small_config(), str(blocker / "workdir"), progress=False)


def test_full_disk_fails_before_compute(tmp_path, monkeypatch):
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
  with pytest.raises(OSError, match="MiB free"):
    training.train(small_config(), str(tmp_path), progress=False)
  assert not os.path.exists(ckpt_lib.checkpoint_dir(str(tmp_path))) or not os.listdir(
    ckpt_lib.checkpoint_dir(str(tmp_path))
  )


@pytest.mark.slow
@pytest.mark.subprocess
def test_dead_peer_process_ends_the_other_within_bounded_time(tmp_path):
  port = portpicker.pick_unused_port()
  overrides = {
    "train.steps": 100000,
    "train.global_batch": 4,
    "train.checkpoint_every": 100000,
    "dist.heartbeat_timeout_s": 5,
  }
  env = lambda i: {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "MMFREE_COORDINATOR": f"localhost:{port}",
    "MMFREE_NUM_PROCESSES": "2",
    "MMFREE_PROCESS_ID": str(i),
  }
  procs = [_start(tmp_path / "work", tmp_path / f"out{i}", overrides, env(i)) for i in range(2)]
  assert _wait_for_rows(procs[0], tmp_path / "work", 3)
  procs[1].kill()
  killed_at = time.time()
  rc, out = _finish(procs[0], timeout=120)
  elapsed = time.time() - killed_at
  print(f"survivor exited rc={rc} {elapsed:.1f}s after its peer was killed")
  assert rc != 0 and elapsed < 90, out[-3000:]
  assert "heartbeat timeout" in out or "another task died" in out, out[-3000:]
