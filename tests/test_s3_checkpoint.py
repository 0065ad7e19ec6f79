"""Checkpoints in an `s3://` workdir (moto's S3 server, a real process: tests/storage_emulators.py),
staged through a local folder (`mmfree_jax/checkpoint/staging.py`): the bucket holds committed
steps only, keeps the newest `keep`, restores bitwise in a fresh Checkpointer (a fresh host),
and the uncommitted-step and checksum rules hold there as on gs:// and local disk. The CLIs'
kill -9 and resume on an s3:// workdir: tests/test_object_storage.py."""

import logging
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from mmfree_jax import paths
from mmfree_jax.checkpoint import manager as ckpt_lib

MARKER = ckpt_lib.COMMIT_MARKER


def _state(step: int) -> dict:
  """A small train-state-like tree whose values depend on `step` (f32 and int32 leaves); random
  values, which zstd stores nearly as they are (so flipped bytes still decode)."""
  return {
    "params": {"w": jax.random.normal(jax.random.key(step), (64, 64), jnp.float32)},
    "step": jnp.asarray(step, jnp.int32),
  }


def _abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _committed(s3_emulator, workdir: str) -> list[int]:
  prefix = ckpt_lib.checkpoint_dir(workdir) + "/"
  names = [n[len(prefix) :] for n in s3_emulator.list_objects(prefix)]
  return sorted(int(n.split("/")[0]) for n in names if n.count("/") == 1 and n.endswith(MARKER))


def _save(workdir: str, steps, keep: int) -> None:
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=keep)  # async saves, as train.py
  try:
    for step in steps:
      assert checkpointer.save(step, _state(step), None, {"model": {"d_model": 8}})
  finally:
    checkpointer.close()


def _flip_16_bytes(state: str, tmp_path) -> None:
  """XORs 16 bytes in the middle of the stored chunk of `params.w` in the bucket's state
  folder (zstd-compressed, same size: it still decodes, to other values), as bit rot would:
  through TensorStore's OCDBT store on a local copy, whose new files are uploaded back."""
  local = str(tmp_path / "state")
  for name in paths.find(state):
    paths.makedirs(paths.dirname(paths.join(local, name)))
    paths.write_atomic(paths.join(local, name), paths.read_bytes(paths.join(state, name)))
  store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{local}/"}).result()
  data = bytearray(store.read(b"params.w/0.0").result().value)
  middle = len(data) // 2
  data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
  store.write(b"params.w/0.0", bytes(data)).result()
  paths.upload_tree(local, state)


def test_s3_steps_are_uploaded_kept_and_restored_bitwise(s3_emulator, s3_root):
  work = s3_root + "/run"
  _save(work, [1, 2, 3], keep=2)
  assert _committed(s3_emulator, work) == [2, 3]  # orbax's max_to_keep, mirrored
  assert not os.path.exists("s3:")
  reader = ckpt_lib.Checkpointer(work, read_only=True)  # a fresh host: nothing local yet
  staged = reader._staged.local  # pylint: disable=protected-access
  try:
    assert reader.all_steps() == [2, 3] and reader.read_config(3) == {"model": {"d_model": 8}}
    restored = reader.restore(3, _abstract(_state(3)))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(3))):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      assert got.dtype == want.dtype
    params = reader.restore_params(2, _abstract(_state(2)["params"]))
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(_state(2)["params"]["w"]))
  finally:
    reader.close()
  assert not os.path.exists(staged)  # the staging folder goes with the Checkpointer

  resumed = ckpt_lib.Checkpointer(work, keep=2)  # a run resuming at 3 saves 4 and 5
  try:
    resumed.restore(3, _abstract(_state(3)))
    for step in (4, 5):
      resumed.save(step, _state(step), None, {"model": {}})
  finally:
    resumed.close()
  assert _committed(s3_emulator, work) == [4, 5]


def test_s3_uncommitted_step_is_set_aside_and_corruption_is_refused(s3_root, caplog, tmp_path):
  """A step whose upload was cut short (no marker in the bucket) is not a checkpoint and
  train.py moves it aside; bytes changed in the bucket fail the checksums on restore."""
  work = s3_root + "/run"
  _save(work, [1, 2], keep=3)
  step2 = paths.join(ckpt_lib.checkpoint_dir(work), "2")
  paths.remove(paths.join(step2, MARKER))
  with caplog.at_level(logging.WARNING, logger="mmfree_jax"):
    listing = ckpt_lib.Checkpointer(work, read_only=True)
    assert listing.all_steps() == [1]
    listing.close()
  assert "ignoring checkpoint step 2" in caplog.text
  assert ckpt_lib.set_aside_uncommitted(work) == [2]
  assert not paths.exists(step2)

  _flip_16_bytes(paths.join(ckpt_lib.checkpoint_dir(work), "1", "state"), tmp_path)
  reader = ckpt_lib.Checkpointer(work, read_only=True)
  try:
    with pytest.raises(ckpt_lib.CheckpointError, match="step 1 .* corrupted: .*params/w do not"):
      reader.restore(1, _abstract(_state(1)))
  finally:
    reader.close()


@pytest.mark.subprocess
def test_staging_folder_of_a_dead_process_is_deleted(s3_root, tmp_path, monkeypatch):
  """A run killed with kill -9 leaves its staging folder; the next Checkpointer on the host
  deletes it, and keeps a live process's."""
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()  # its pid is free now
  dead = tmp_path / f"mmfree-ckpt-{gone.pid}-abc"
  live = tmp_path / f"mmfree-ckpt-{os.getppid()}-abc"
  for folder in (dead, live):
    (folder / "1").mkdir(parents=True)
  reader = ckpt_lib.Checkpointer(s3_root + "/run", read_only=True)
  try:
    assert not dead.exists() and live.exists()
    assert reader._staged.local.startswith(str(tmp_path))  # pylint: disable=protected-access
  finally:
    reader.close()


def test_multi_process_run_on_an_s3_workdir_is_refused_in_one_line():
  fix = "pass a gs:// or shared-disk --workdir for a multi-process run"
  ckpt_lib.check_workdir_store("s3://bucket/run", fix, process_count=1)
  ckpt_lib.check_workdir_store("gs://bucket/run", fix, process_count=2)
  with pytest.raises(ValueError, match=r"s3:// workdir takes one process \(2 here\)") as e:
    ckpt_lib.check_workdir_store("s3://bucket/run", fix, process_count=2)
  assert "\n" not in str(e.value) and str(e.value).endswith(fix)
