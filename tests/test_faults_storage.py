"""Training in a `gs://` workdir (the GCS emulator of tests/storage_emulators.py, a real process):
every file goes to the bucket, a save cut short is set aside, and the resumed run equals an
uninterrupted one bitwise."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmfree_jax import paths
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.config import ModelConfig
from mmfree_jax.train import trainer
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"train.steps": 6, "train.checkpoint_every": 2, "train.eval_every": 2}


@pytest.mark.slow
@pytest.mark.subprocess
def test_gs_workdir_resumes_past_an_uncommitted_step_bitwise(gcs_emulator, gcs_root, tmp_path):
  os.chdir(tmp_path)  # a path mistaken for a local one would make ./gs: here
  work = gcs_root + "/run"
  trainer.train(small_config(**OVERRIDES), work, progress=False, stop_after_steps=4)
  step4 = paths.join(ckpt_lib.checkpoint_dir(work), "4")
  markers = [n for n in gcs_emulator.list_objects(step4) if n.endswith(ckpt_lib.COMMIT_MARKER)]
  assert markers  # orbax marks a step committed on object storage with this file, last
  for name in markers:  # as if the run was killed before the save of step 4 completed
    paths.remove(name)
  # the restart is a new process, as after a kill; it saves step 4 again
  worker = [sys.executable, os.path.join(REPO, "tests", "_train_worker.py")]
  out = str(tmp_path / "resumed")
  subprocess.run([*worker, work, out, json.dumps(OVERRIDES)], check=True, timeout=600)
  straight = trainer.train(small_config(**OVERRIDES), str(tmp_path / "local"), progress=False)
  resumed = np.load(out + ".npz")
  want = jax.tree_util.tree_leaves_with_path(jax.device_get(straight.state.params))
  assert len(want) == len(resumed.files)
  for path, leaf in want:
    np.testing.assert_array_equal(resumed[jax.tree_util.keystr(path)], np.asarray(leaf))
  cfg = loading.load_workdir_config(work)
  loaded, step = loading.load_params(work, ModelConfig.from_config(cfg.model))  # eval's reader
  assert step == 6 and cfg.train.steps == 6
  for got, leaf in zip(jax.tree.leaves(loaded), jax.tree.leaves(straight.state.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
  objects = gcs_emulator.list_objects(work)
  aside = {
    n.split("/abandoned_checkpoints/")[1].split("/")[:2][1] for n in objects if "/abandoned_" in n
  }
  assert aside == {"4"}
  assert ckpt_lib.Checkpointer(work, read_only=True).all_steps() == [2, 4, 6]
  rows = [json.loads(r) for r in paths.read_text(paths.join(work, "metrics.jsonl")).splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert any("/tensorboard/events.out.tfevents." in n for n in objects)
  assert not any(n.endswith("/.lock") or ".write_probe" in n for n in objects)
  assert sorted(os.listdir(tmp_path)) == ["local", "resumed.json", "resumed.npz"]
