"""`s3://` checkpoints through a local staging folder.

orbax-checkpoint 0.12.8 builds its TensorStore specs for `gs://` and absolute local paths only,
so for an `s3://` workdir orbax saves and reads in a local folder (under `$TMPDIR`) and this
module mirrors it to the bucket:

- After orbax commits a step locally (its async save renamed the step folder into place,
  `commit_success.txt` inside), a background thread uploads the step's files, orbax's commit
  marker last: a step in the bucket is committed only once whole, the rule `gs://` steps
  follow (`manager.COMMIT_MARKER`), so a run killed mid-upload leaves an uncommitted folder
  that the next run sets aside.
- Retention is mirrored: after each upload the bucket keeps the newest `keep` committed steps
  (orbax's `max_to_keep` on the local folder); a deleted step loses its marker first.
- A step is downloaded before orbax reads it (resume on a fresh host, `load_model`, eval,
  export), so only the steps asked for cross the network.

Local disk needed: what orbax keeps locally (up to `keep` steps of a writing run, one step of
a reader); a folder left by a killed process is deleted by the next one on the host. Cost:
each save is written twice (local, then uploaded) in the background; a resume downloads its
step before orbax reads it. One process only: orbax's multi-process save merges every
process's files in one shared store, which separate local folders are not.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import weakref

from mmfree_jax import paths

log = logging.getLogger("mmfree_jax")
_CHUNK = 1 << 24  # bytes per read while copying a file between the bucket and the disk
_POLL_S = 0.05  # how often the uploader looks for orbax's local commit
_PREFIX = "mmfree-ckpt-"  # + "<pid>-": a staging folder, named by the process that owns it


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists on this host (owned by anyone)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _sweep(tmp: str) -> None:
  """Deletes the staging folders in `tmp` of processes that are gone (a run killed with
  `kill -9` cannot delete its own)."""
  for folder in paths.glob(paths.join(tmp, _PREFIX + "*")):
    pid = paths.basename(folder)[len(_PREFIX) :].split("-", 1)[0]
    if pid.isdigit() and not pid_alive(int(pid)):
      log.info("deleting the staging folder %s of a process that is gone", folder)
      paths.rmtree(folder)


def _copy(src: str, dst: str) -> None:
  paths.makedirs(paths.dirname(dst))
  with paths.open_file(src, "rb") as f, paths.open_file(dst, "wb") as g:
    while chunk := f.read(_CHUNK):
      g.write(chunk)


class StagedCheckpoints:
  """The local folder orbax uses for the `s3://` checkpoints folder `remote`, and the copies
  between them (see the module doc).

  remote: `s3://…/checkpoints`. marker: the file orbax writes into a committed step.
  keep: steps the bucket keeps (None: all).
  """

  def __init__(self, remote: str, marker: str, keep: int | None = None):
    self.remote, self.marker, self.keep = remote, marker, keep
    _sweep(tempfile.gettempdir())
    self.local = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    self._cleanup = weakref.finalize(self, paths.rmtree, self.local)
    self._uploader: threading.Thread | None = None
    self._pending: int | None = None
    self._error: BaseException | None = None

  def committed_steps(self) -> list[int]:
    """Steps whose folder in the bucket holds the commit marker."""
    if not paths.isdir(self.remote):
      return []
    names = [n for n in paths.listdir(self.remote) if n.isdigit()]
    return sorted(int(n) for n in names if paths.exists(paths.join(self.remote, n, self.marker)))

  def step_folders(self) -> list[int]:
    """Every step folder in the bucket, committed or not."""
    if not paths.isdir(self.remote):
      return []
    return sorted(int(n) for n in paths.listdir(self.remote) if n.isdigit())

  def fetch(self, step: int) -> bool:
    """Downloads committed `step` into the local folder unless it is there (marker last, as
    orbax reads a step only with it); returns whether it downloaded."""
    local = paths.join(self.local, str(step))
    if paths.exists(paths.join(local, self.marker)):
      return False
    src = paths.join(self.remote, str(step))
    count = self._copy_step(src, local)
    log.info("downloaded checkpoint step %d (%d files) from %s", step, count, src)
    return True

  def _copy_step(self, src: str, dst: str) -> int:
    """Copies the step folder `src` to `dst` (bucket to disk or back), the commit marker last;
    returns how many files."""
    names = paths.find(src)
    for name in (n for n in names if n != self.marker):
      _copy(paths.join(src, name), paths.join(dst, name))
    _copy(paths.join(src, self.marker), paths.join(dst, self.marker))
    return len(names)

  @property
  def pending(self) -> int | None:
    """The step being uploaded, if any."""
    return self._pending

  def upload_when_committed(self, step: int, saving) -> None:
    """Uploads `step` in a background thread once orbax committed it locally; `saving()`
    says whether orbax's save is still running (if it ends without a commit, the upload is
    dropped and `wait` raises)."""
    self.wait()
    self._pending = step
    self._uploader = threading.Thread(
      target=self._upload, args=(step, saving), name=f"s3-upload-{step}", daemon=True
    )
    self._uploader.start()

  def _upload(self, step: int, saving) -> None:
    marker = paths.join(self.local, str(step), self.marker)
    try:
      while not paths.exists(marker):
        if not saving() and not paths.exists(marker):
          raise RuntimeError(f"checkpoint step {step} was not committed locally: not uploaded")
        time.sleep(_POLL_S)
      self._push(step)
      self._retain()
    except BaseException as e:  # pylint: disable=broad-except  # raised by `wait`
      self._error = e

  def _push(self, step: int) -> None:
    dst = paths.join(self.remote, str(step))
    count = self._copy_step(paths.join(self.local, str(step)), dst)
    log.info("uploaded checkpoint step %d (%d files) to %s", step, count, dst)

  def _retain(self) -> None:
    if not self.keep:
      return
    for step in self.committed_steps()[: -self.keep]:
      self.delete(step)

  def delete(self, step: int) -> None:
    """Deletes `step` from the bucket, its commit marker first (cut short, it is an
    uncommitted folder, set aside by the next run)."""
    folder = paths.join(self.remote, str(step))
    paths.remove(paths.join(folder, self.marker))
    paths.rmtree(folder)

  def wait(self) -> None:
    """Blocks until the upload in flight (if any) is done; raises its error."""
    if self._uploader is not None:
      self._uploader.join()
      self._uploader, self._pending = None, None
    if self._error is not None:
      error, self._error = self._error, None
      raise RuntimeError(f"uploading a checkpoint to {self.remote} failed: {error}") from error

  def close(self) -> None:
    """Waits for the upload in flight, then deletes the local folder."""
    try:
      self.wait()
    finally:
      self._cleanup()
