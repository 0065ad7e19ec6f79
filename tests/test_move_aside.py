"""Setting checkpoint steps aside on a bucket (`checkpoint.manager.move_aside`) unpublishes each
step first: a move cut short (a kill between objects) leaves a folder without its commit
marker, which the next start sets aside as uncommitted, never a step that still looks
committed with files missing. Runs against the GCS emulator (tests/storage_emulators.py)."""

from __future__ import annotations

import pytest

from mmfree_jax import paths
from mmfree_jax.checkpoint import manager

FILES = ("state/manifest.ocdbt", "state/d/0", "_CHECKPOINT_METADATA", manager.COMMIT_MARKER)


def _write_step(workdir: str, step: int) -> str:
  folder = paths.join(manager.checkpoint_dir(workdir), str(step))
  for name in FILES:
    paths.write_atomic(paths.join(folder, name), name.encode())
  return folder


def test_move_aside_moves_every_object_with_its_marker(gcs_root):
  workdir = paths.join(gcs_root, "run")
  _write_step(workdir, 40)
  aside = manager.move_aside(workdir, [40], "newer")
  assert not paths.exists(paths.join(manager.checkpoint_dir(workdir), "40"))
  for name in FILES:
    assert paths.read_bytes(paths.join(aside, "40", name)) == name.encode()


def test_a_move_cut_short_leaves_an_uncommitted_step(gcs_root, monkeypatch):
  workdir = paths.join(gcs_root, "run")
  folder = _write_step(workdir, 40)
  fs = paths._fs(workdir)  # pylint: disable=protected-access
  real_copy, copies = fs.cp_file, []

  def copy_then_die(src, dst, **kwargs):  # the kill lands after one object moved
    copies.append(src)
    if len(copies) > 1:
      raise KeyboardInterrupt("killed mid-move")
    return real_copy(src, dst, **kwargs)

  monkeypatch.setattr(fs, "cp_file", copy_then_die)
  with pytest.raises(KeyboardInterrupt):
    manager.move_aside(workdir, [40], "newer")
  monkeypatch.setattr(fs, "cp_file", real_copy)
  assert not paths.exists(paths.join(folder, manager.COMMIT_MARKER))
  assert paths.exists(paths.join(folder, "state/manifest.ocdbt"))
  assert manager.set_aside_uncommitted(workdir) == [40]
  assert not paths.exists(folder)
