"""One training run per workdir: an exclusive lock file `WORKDIR/.lock` held by process 0.

Two runs on one workdir would interleave `metrics.jsonl`, overwrite `config.json` and delete
each other's checkpoint temporaries mid-save. The lock is a file holding `{"pid", "host",
"started", "token"}`, written whole to a private name and hard-linked into place (the link fails
if the lock exists), so no reader ever sees it half-written. A lock left by a run that died
(same host, pid no longer alive) is taken over with a warning; a live one, or one from another
host (whose pid cannot be checked from here), is refused with an error naming its pid and host.

Takeover is atomic: racing runs serialize on an `flock` of `WORKDIR/.lock.takeover` (released
by the kernel if its holder dies), and under it remove the lock only if its bytes are still the
stale ones they read. Without that, a run could delete the lock another run had just taken.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid

log = logging.getLogger("mmfree_jax")
LOCK_NAME = ".lock"
TAKEOVER_NAME = ".lock.takeover"
# Errors of os.link on file systems without hard links: then the lock is created with O_EXCL.
_NO_LINK = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK)


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read_bytes(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


def _parse(raw: bytes | None) -> dict | None:
  try:
    owner = json.loads(raw) if raw else None
  except ValueError:
    return None
  return owner if isinstance(owner, dict) else None


def _read(path: str) -> dict | None:
  try:
    return _parse(_read_bytes(path))
  except OSError:
    return None


def _create(path: str, content: bytes) -> bool:
  """Creates `path` holding `content` unless it exists; returns whether it did."""
  private = f"{path}.{os.getpid()}.{uuid.uuid4().hex}"
  with open(private, "wb") as f:
    f.write(content)
  try:
    os.link(private, path)
    return True
  except FileExistsError:
    return False
  except OSError as e:
    if e.errno not in _NO_LINK:
      raise
  finally:
    os.remove(private)
  try:  # no hard links here: a reader may briefly see an empty file (then it waits)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(content)
  return True


class WorkdirLock:
  """`acquire()` / `release()` (or a `with` block) around a run in `workdir`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.held = False
    self.token = uuid.uuid4().hex

  def acquire(self) -> WorkdirLock:
    me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "token": self.token,
    }
    for _ in range(3):  # a stale lock is removed, then the create is retried
      if _create(self.path, json.dumps(me).encode()):
        self.held = True
        return self
      self._handle_existing(me)
    raise WorkdirLockedError(
      f"could not take the lock {self.path}: it keeps reappearing "
      "(another run starting at the same time?)"
    )

  def _handle_existing(self, me: dict) -> None:
    seen = _read_bytes(self.path)
    if seen is None:  # released in between: just retry
      return
    owner = _parse(seen)
    if owner is None:  # being written right now, or truncated by a crash mid-write
      time.sleep(0.2)
      seen = _read_bytes(self.path)
      owner = _parse(seen)
    if seen is not None and owner is None:
      log.warning("taking over the unreadable lock file %s", self.path)
      self._take_over(seen)
      return
    if owner is None:
      return
    pid, host = owner.get("pid"), owner.get("host")
    if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
      if self._take_over(seen):
        log.warning(
          "took over the lock of a run that is gone (pid %s on %s, started %s): %s",
          pid,
          host,
          owner.get("started"),
          self.path,
        )
        print(f"note: workdir lock of a dead run (pid {pid} on {host}) taken over", flush=True)
      return
    where = "this host" if host == me["host"] else f"host {host}"
    raise WorkdirLockedError(
      f"workdir {os.path.dirname(self.path)!r} is in use by another run: pid {pid} on "
      f"{where} (started {owner.get('started')}). Wait for it, stop it, or use another "
      f"--workdir. If that run is dead (e.g. its host went away), delete {self.path}"
    )

  def _take_over(self, seen: bytes) -> bool:
    """Removes the lock if it still holds `seen`, under the takeover flock; returns whether it
    did (if not, another run took it over first and the caller looks at the new lock)."""
    mutex = os.open(
      os.path.join(os.path.dirname(self.path), TAKEOVER_NAME), os.O_CREAT | os.O_RDWR, 0o644
    )
    try:
      try:
        fcntl.flock(mutex, fcntl.LOCK_EX)
      except OSError as e:  # no flock on this file system: the takeover is not atomic
        log.warning("cannot flock %s (%s); taking over the lock without it", TAKEOVER_NAME, e)
      if _read_bytes(self.path) != seen:
        return False
      self._remove()
      return True
    finally:
      os.close(mutex)  # releases the flock

  def _remove(self) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if not self.held:
      return
    owner = _read(self.path)
    if owner is not None and owner.get("token") == self.token:
      self._remove()
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
