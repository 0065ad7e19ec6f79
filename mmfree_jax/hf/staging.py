"""A new folder (a packed or HF export, an imported workdir) published whole, or not at all.

On a local disk the folder is written under a hidden temporary name next to the destination
and renamed into place. A bucket (`gs://`, `s3://`) has no rename: an export is staged in a
local temporary folder and uploaded file by file with its marker last (the file readers open
first: a packed folder's `packed.json`, an HF folder's `config.json`), so a reader sees a
complete folder or refuses it as half-written; an import writes its workdir in place (orbax
publishes the checkpoint with its own commit marker) with `config.json` last. A failure
deletes what was written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from mmfree_jax import paths
from mmfree_jax.checkpoint import manager as ckpt_lib


def check_destination(path: str) -> str:
  """Absolute path (a bucket path as given) of a destination that does not exist or is an
  empty directory."""
  path = paths.absolute(path)
  if paths.isfile(path) or (paths.isdir(path) and paths.listdir(path)):
    raise FileExistsError(
      f"{path} already exists and is not empty; pick a new directory or "
      "remove it first (nothing is overwritten)"
    )
  return path


@contextlib.contextmanager
def staged_directory(dst: str, *, last: tuple[str, ...] = ()):
  """Yields a local folder whose files become `dst` if the block succeeds; a failure leaves
  no destination.

  Locally the folder is a hidden temporary one next to `dst`, renamed to `dst` at the end. A
  bucket has no rename: the folder is a local temporary one, uploaded file by file, the files
  named in `last` after all others; readers check those (a packed export's `packed.json`, an
  HF folder's `config.json`), so they never see a half-uploaded destination. A failed upload
  deletes what it wrote.
  """
  dst = check_destination(dst)
  if paths.is_remote(dst):
    with _uploaded_on_success(dst, last) as tmp:
      yield tmp
    return
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    if os.path.isdir(dst):
      os.rmdir(dst)  # empty (check_destination); rename cannot replace a directory
    os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_workdir_destination(workdir: str) -> str:
  """`check_destination` for a new workdir, which holds an orbax checkpoint: a workdir the
  checkpoints cannot go to (`checkpoint.manager.check_workdir_store`) is refused first."""
  ckpt_lib.check_workdir_store(workdir, "import with one process, or into a gs:// --workdir")
  return check_destination(workdir)


@contextlib.contextmanager
def workdir_destination(workdir: str):
  """Yields the folder an import writes a new workdir into: a staged local one
  (`staged_directory`), or on a bucket the workdir itself (orbax publishes a checkpoint there
  with its own commit marker, which a folder uploaded afterwards would lack; the caller writes
  `config.json`, what makes a folder a workdir, last). A failure leaves no workdir."""
  workdir = check_workdir_destination(workdir)
  if not paths.is_remote(workdir):
    with staged_directory(workdir) as tmp:
      yield tmp
    return
  try:
    yield workdir
  except BaseException:
    paths.rmtree(workdir)
    raise


@contextlib.contextmanager
def _uploaded_on_success(dst: str, last: tuple[str, ...]):
  """A local temporary folder uploaded to the bucket folder `dst` on a clean exit, the files
  named in `last` (the publish markers) after every other one."""
  tmp = tempfile.mkdtemp(prefix="mmfree-staged-")
  body, held = os.path.join(tmp, "body"), os.path.join(tmp, "last")
  os.makedirs(body)
  os.makedirs(held)
  try:
    yield body
    for name in last:
      if os.path.exists(os.path.join(body, name)):
        os.rename(os.path.join(body, name), os.path.join(held, name))
    try:
      paths.upload_tree(body, dst)
      paths.upload_tree(held, dst)
    except BaseException:
      paths.rmtree(dst)
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
