"""Issue 16, training side: workdir lock, NaN give-up, validation, `*_every=0`, resume of
metrics and schedules, incomplete checkpoints, CLI help/errors, banner and log lines."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from mmfree_jax import config as config_lib
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.train import trainer
from mmfree_jax.train.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(workdir, pid, host):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_NAME), "w") as f:
    json.dump({"pid": pid, "host": host, "started": "earlier"}, f)


# ------------------------------------------------------------------------------- 1. lock


@pytest.mark.subprocess
def test_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path, capsys):
  work = str(tmp_path)
  with WorkdirLock(work):
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on this host"):
      WorkdirLock(work).acquire()
  assert not os.path.exists(os.path.join(work, LOCK_NAME))  # released
  _write_lock(work, 12345, "some-other-host")  # cannot check its pid: refuse, say how to clear
  with pytest.raises(WorkdirLockedError, match="pid 12345 on host some-other-host.*delete"):
    WorkdirLock(work).acquire()
  _write_lock(work, _dead_pid(), socket.gethostname())  # killed run on this host: taken over
  lock = WorkdirLock(work).acquire()
  assert "taken over" in capsys.readouterr().out
  assert json.load(open(os.path.join(work, LOCK_NAME)))["pid"] == os.getpid()
  lock.release()


def test_train_refuses_a_workdir_in_use_before_any_compute(tmp_path):
  _write_lock(str(tmp_path), os.getppid(), socket.gethostname())  # a live process
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getppid()}"):
    trainer.train(small_config(), str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "checkpoints")
  assert not os.path.exists(tmp_path / "metrics.jsonl")


# ------------------------------------------------------------------------------ 7. config


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("optim.lr", -1e-3, r"optim.lr must be a finite number in \[0, 1\]"),
    ("train.steps", 0, "train.steps must be an int >= 1"),
    ("train.steps", -5, "train.steps must be an int >= 1"),
    ("train.eval_every", -1, "train.eval_every must be an int >= 0"),
    ("train.max_consecutive_skips", 0, "train.max_consecutive_skips must be an int >= 1"),
    ("train.tracker", "comet", "train.tracker must be one of"),
  ],
)
def test_bad_run_settings_name_the_key(key, value, message):
  cfg = small_config(**{key: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)


def test_short_run_scales_warmup_with_a_note():
  cfg = small_config(**{"train.steps": 20, "optim.warmup_steps": 30})
  note = config_lib.fit_warmup(cfg)
  assert cfg.optim.warmup_steps == 2 and "optim.warmup_steps=30" in note
  assert config_lib.fit_warmup(small_config(**{"optim.warmup_steps": 3})) is None


def test_unknown_override_key_is_one_line_naming_the_fix():
  with pytest.raises(
    ValueError,
    match=r"mesh.shape has no key 'model'.*"
    r"\['context', 'data', 'fsdp', 'tensor'\]",
  ):
    config_lib.check_override_keys(["--config.mesh.shape.model=2"])
  with pytest.raises(ValueError, match="did you mean 'train.steps'"):
    config_lib.check_override_keys(["--workdir=x", "--config.train.stepz", "3"])
  config_lib.check_override_keys(["--config.train.steps=3", "--config.mesh.shape.fsdp=2"])


def test_every_config_key_has_help_text():
  missing = [k for k, v in config_lib.config_help().items() if not v]
  assert not missing
  text = config_lib.describe(small_config())
  assert "train.max_consecutive_skips = 10" in text and "train.eval_every = 1000" in text


# ------------------------------------------------------------ 2. NaN give-up, every=0


@pytest.mark.slow
@pytest.mark.usefixtures("allow_exploding_lr")
def test_skip_policy_gives_up_and_never_checkpoints_a_skipped_step(tmp_path):
  # lr 1e30: step 2 blows the weights up (finite), every later step is non-finite.
  cfg = small_config(
    **{
      "optim.lr": 1e30,
      "train.steps": 8,
      "train.checkpoint_every": 1,
      "train.max_consecutive_skips": 2,
      "optim.clip_norm": 0.0,
    }
  )
  with pytest.raises(trainer.NonFiniteLossError, match="max_consecutive_skips=2"):
    trainer.train(cfg, str(tmp_path), progress=False)
  rows = _rows(tmp_path)
  first_bad = min(r["step"] for r in rows if r["finite"] < 1)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  saved = checkpointer.all_steps()
  checkpointer.close()
  assert saved and max(saved) < first_bad, (saved, first_bad)
  assert not os.path.exists(tmp_path / LOCK_NAME)  # released on the error path


@pytest.mark.slow
@pytest.mark.usefixtures("allow_exploding_lr")
def test_zero_every_means_off_and_summary_lists_skipped_steps(tmp_path):
  cfg = small_config(
    **{
      "optim.lr": 1e30,
      "train.steps": 5,
      "train.eval_every": 0,
      "train.eval_batches": 1,
      "train.checkpoint_every": 0,
      "train.log_every": 0,
      "train.max_consecutive_skips": 100,
      "optim.clip_norm": 0.0,
      "train.tracker": "none",
    }
  )
  result = trainer.train(cfg, str(tmp_path), progress=False)
  assert result.skipped_steps and result.skipped_steps[-1] == 5
  assert not result.eval_history  # eval_every=0: no validation at all
  assert [r["step"] for r in _rows(tmp_path)] == [5]  # log_every=0: only the last row
  assert not any("val_loss" in r for r in _rows(tmp_path))
  # checkpoint_every=0: no periodic save, and the final step's update was skipped: none.
  assert not os.listdir(tmp_path / "checkpoints")
  assert not os.path.exists(tmp_path / "tensorboard")  # tracker none


# ---------------------------------------------------------------------------- 8. resume


@pytest.mark.slow
def test_resume_drops_superseded_rows_and_guards_the_schedule(tmp_path, capsys):
  work = str(tmp_path)
  over = {"train.steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 5}
  trainer.train(small_config(**over), work, progress=False)
  trainer.train(small_config(**over), work, progress=False, restore_step=2)
  # 3 and 4 once, from the rerun (the first run's rows 3, 4 and its val row at 4 dropped)
  assert [r["step"] for r in _rows(work) if "loss" in r] == [1, 2, 3, 4]
  assert "dropped 3 metrics.jsonl row(s) after step 2" in capsys.readouterr().out
  longer = small_config(**dict(over, **{"train.steps": 6}))
  with pytest.raises(ValueError, match="train.steps changed from 4 .* to 6.*allow_steps_change"):
    trainer.train(longer, work, progress=False)
  assert not os.path.exists(tmp_path / LOCK_NAME)
  result = trainer.train(longer, work, progress=False, allow_steps_change=True)
  assert int(result.state.step) == 6
  out = capsys.readouterr().out  # banner and log lines (no TTY under pytest)
  assert "resumed from step 4" in out and "tokens/step" in out and "params" in out
  assert "step 6/6: loss" in out and "ETA" in out


# ------------------------------------------------------------------- 5. checkpoints


@pytest.mark.slow
def test_missing_metadata_and_uncommitted_steps(tmp_path):
  work = str(tmp_path)
  over = {"train.steps": 4, "train.checkpoint_every": 2}
  trainer.train(small_config(**over), work, progress=False)
  os.remove(tmp_path / "checkpoints" / "4" / "state" / "_METADATA")
  with pytest.raises(
    ckpt_lib.CheckpointError, match=r"step 4 .* incomplete.*_METADATA is missing.*--restore_step"
  ):
    trainer.train(small_config(**over), work, progress=False)
  # A step folder without orbax's commit marker is not a checkpoint: the latest is 2.
  os.remove(tmp_path / "checkpoints" / "4" / ckpt_lib.COMMIT_MARKER)
  checkpointer = ckpt_lib.Checkpointer(work, read_only=True)
  assert checkpointer.all_steps() == [2] and checkpointer.latest_step() == 2
  checkpointer.close()


def _cli(*args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "train.py"), *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=240,
    cwd=cwd,
  )


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_help_print_config_and_user_errors(tmp_path):
  assert _cli("--help").returncode == 0
  proc = _cli("--print_config", "--config.train.steps=7")
  assert proc.returncode == 0 and "train.steps = 7    # optimizer steps" in proc.stdout
  proc = _cli("--config.train.stepz=3")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "did you mean 'train.steps'" in proc.stderr
  # A workdir with checkpoints and a bad data setting: one message, no orbax traceback.
  work = tmp_path / "w"
  trainer.train(small_config(**{"train.steps": 1}), str(work), progress=False)
  shutil.copy(os.path.join(REPO, "tests", "train_configs.py"), tmp_path / "cfg_mod.py")
  (tmp_path / "cfg.py").write_text(
    "import sys; sys.path.insert(0, %r)\n" % str(tmp_path) + "from cfg_mod import small_config\n"
    "def get_config():\n  return small_config(**{'train.steps': 1})\n"
  )
  proc = _cli(
    f"--config={tmp_path / 'cfg.py'}",
    f"--workdir={work}",
    "--config.data.tokenizer=spm:/nonexistent/tokenizer.model",
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr and "cannot schedule new futures" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: sentencepiece")


# ------------------------------------------------------------------------------ trackers


def _tfrecords(path):
  """The records of a TFRecord file (length, crc, data, crc), read by hand."""
  import struct  # pylint: disable=import-outside-toplevel

  data, records, at = open(path, "rb").read(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at : at + 8])
    records.append(data[at + 12 : at + 12 + length])
    at += 12 + length + 4
  return records


def test_tracker_interface_tensorboard_none_and_missing_packages(tmp_path):
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  from mmfree_jax.train import metrics, trackers  # pylint: disable=import-outside-toplevel

  assert trackers.make_tracker("none", str(tmp_path), {}) is None
  writer = metrics.MetricsWriter(
    str(tmp_path), tracker=trackers.make_tracker("tensorboard", str(tmp_path), {})
  )
  writer.write(3, {"loss": 1.5})
  writer.write(4, {"loss": 1.25}, prefix="val_")
  writer.close()
  (events,) = os.listdir(tmp_path / "tensorboard")
  scalars = []
  for record in _tfrecords(tmp_path / "tensorboard" / events):
    event = event_pb2.Event.FromString(record)
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  assert scalars == [(3, "loss", 1.5), (4, "val_loss", 1.25)]
  assert _rows(tmp_path) == [{"step": 3, "loss": 1.5}, {"step": 4, "val_loss": 1.25}]
  for name, package in (("wandb", "wandb"), ("mlflow", "mlflow")):  # optional installs
    try:
      __import__(package)
    except ImportError:
      with pytest.raises(ImportError, match=f"pip install {package}"):
        trackers.make_tracker(name, str(tmp_path), {})


def test_wandb_and_mlflow_trackers_offline_against_recording_fakes(tmp_path, monkeypatch):
  """wandb/mlflow are optional installs (not in CI): their adapters run against minimal
  stand-ins that record the calls, in their offline forms (WANDB_MODE=offline, a file: URI
  under the workdir). What is checked is our side: ids kept across a resume, the URI, the
  flattened params, every scalar row with its step, the run closed."""
  import sys  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel

  from mmfree_jax.train import trackers  # pylint: disable=import-outside-toplevel

  calls = []

  class Run:
    def log(self, row, step):
      calls.append(("wandb.log", step, dict(row)))

    def finish(self):
      calls.append(("wandb.finish",))

  def init(**kw):
    calls.append(("wandb.init", kw["id"], kw["resume"], kw["dir"], os.environ.get("WANDB_MODE")))
    return Run()

  wandb = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "run42"))
  mlflow = types.SimpleNamespace(
    set_tracking_uri=lambda uri: calls.append(("mlflow.uri", uri)),
    set_experiment=lambda name: calls.append(("mlflow.experiment", name)),
    start_run=lambda run_name: calls.append(("mlflow.start", run_name)),
    log_params=lambda params: calls.append(("mlflow.params", dict(params))),
    log_metrics=lambda row, step: calls.append(("mlflow.log", step, dict(row))),
    end_run=lambda: calls.append(("mlflow.end",)),
  )
  monkeypatch.setitem(sys.modules, "wandb", wandb)
  monkeypatch.setitem(sys.modules, "mlflow", mlflow)
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  work = str(tmp_path)
  config = {"model": {"d_model": 64}, "train": {"steps": 3}}

  for _ in range(2):  # a run and its resume continue the same wandb run
    t = trackers.make_tracker("wandb", work, config)
    t.log(1, {"loss": 2.5})
    t.close()
  inits = [c for c in calls if c[0] == "wandb.init"]
  assert inits == [("wandb.init", "run42", "allow", work, "offline")] * 2
  assert ("wandb.log", 1, {"loss": 2.5}) in calls and ("wandb.finish",) in calls

  calls.clear()
  t = trackers.make_tracker("mlflow", work, config)
  t.log(7, {"loss": 1.0, "lr": 3e-3})
  t.close()
  assert calls[0] == ("mlflow.uri", "file:" + os.path.join(os.path.abspath(work), "mlruns"))
  assert ("mlflow.params", {"model.d_model": "64", "train.steps": "3"}) in calls
  assert ("mlflow.log", 7, {"loss": 1.0, "lr": 3e-3}) in calls and calls[-1] == ("mlflow.end",)
