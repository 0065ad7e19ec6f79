"""What a batch job's log (no terminal, `--noprogress`) shows: the validation loss on the eval
step, each note once, the banner before the progress bar, generated text once (it was
streamed) without an empty table header, and no orbax warnings from read-only checkpoints."""

import logging
import os
import subprocess
import sys
import types

import pytest

from mmfree_jax.checkpoint.manager import Checkpointer, checkpoint_dir
from mmfree_jax.eval import format_table
from mmfree_jax.train import run as run_lib
from mmfree_jax.train import trainer
from mmfree_jax.train.step_log import StepLog
from tests.test_cli_logging import log_headers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(written):
  train = types.SimpleNamespace(steps=20, log_every=5)
  writer = types.SimpleNamespace(write=lambda step, row, prefix="": written.append((step, prefix)))
  return types.SimpleNamespace(
    cfg=types.SimpleNamespace(train=train), first_step=0, last_step=20, writer=writer
  )


def test_noprogress_log_shows_the_validation_loss(capsys):
  written = []
  logger = StepLog(_fake_run(written), progress=False)
  logger.validation(10, {"loss": 2.5, "perplexity": 12.18})
  assert capsys.readouterr().out == "step 10: val loss 2.5000 (ppl 12.2)\n"
  assert written == [(10, "val_")]


def test_a_note_is_shown_once(capsys, caplog):
  with caplog.at_level(logging.INFO):
    run_lib.note("optim.warmup_steps=30 is not shorter than train.steps=20")
  out, err = capsys.readouterr()
  assert out.count("warmup_steps=30") == 1 and "warmup_steps=30" not in err
  assert not [r for r in caplog.records if "warmup_steps=30" in r.getMessage()]


def test_banner_is_printed_before_the_progress_bar(monkeypatch, capsys):
  closed = []
  fake_run = types.SimpleNamespace(banner=["BANNER LINE"], close=lambda: closed.append(1))
  monkeypatch.setattr(trainer, "setup", lambda *a, **k: fake_run)
  seen = []

  def step_log(run, progress):
    seen.append(capsys.readouterr().out)  # what was on stdout when the bar would start
    raise RuntimeError("stop here")

  monkeypatch.setattr(trainer, "StepLog", step_log)
  with pytest.raises(RuntimeError, match="stop here"):
    trainer.train(None, "unused")
  assert seen == ["BANNER LINE\n"] and closed == [1]


GENERATION = {"prompt": "In the", "text": " beginning", "stopped_at_eos": False}


def test_streamed_generation_is_not_printed_again():
  results = {"generation": [GENERATION]}
  assert format_table(results, generation=False) == ""
  assert format_table(results) == "prompt: 'In the'\n→ ' beginning'"
  ppl = {"perplexity": {"val": {"perplexity": 12.0, "tokens": 100}}, "generation": [GENERATION]}
  table = format_table(ppl, generation=False).splitlines()
  assert table[0].split() == ["what", "metric", "value"] and len(table) == 4
  assert "beginning" not in "\n".join(table)


def test_read_only_checkpointer_logs_no_orbax_warnings(tmp_path, caplog):
  (tmp_path / "checkpoints").mkdir()
  with caplog.at_level(logging.WARNING):
    ckpt = Checkpointer(str(tmp_path), read_only=True)
    assert ckpt.latest_step() is None
    ckpt.close()
  assert not [r for r in caplog.records if "CheckpointManagerOptions" in r.getMessage()], (
    caplog.text
  )
  assert checkpoint_dir(str(tmp_path)).endswith("checkpoints")


@pytest.mark.subprocess
def test_hf_export_prints_no_orbax_warnings(tmp_path):
  """`python -m mmfree_jax.hf export` of a checkpoint: its result line, no orbax warnings."""
  from tests.test_hf import random_workdir

  work = tmp_path / "work"
  random_workdir(str(work))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "mmfree_jax.hf", "export", "--workdir", str(work)]
  proc = subprocess.run(
    cmd + ["--dst", str(tmp_path / "hf")],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported step 7" in proc.stdout
  assert "read only" not in proc.stderr and "CheckpointManagerOptions" not in proc.stderr
  assert log_headers(proc.stdout + proc.stderr) == [], proc.stderr  # tests/test_cli_logging.py
