"""One training run per workdir: an exclusive lock file `WORKDIR/.lock` held by process 0.

Two runs on one workdir would interleave `metrics.jsonl`, overwrite `config.json` and delete
each other's checkpoint temporaries mid-save. The lock is a file created with `O_EXCL` holding
`{"pid", "host", "started"}`. A lock left by a run that died (same host, pid no longer alive)
is taken over with a warning; a live one, or one from another host (whose pid cannot be
checked from here), is refused with an error naming its pid and host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

log = logging.getLogger("mmfree_jax")
LOCK_NAME = ".lock"


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


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class WorkdirLock:
  """`acquire()` / `release()` (or a `with` block) around a run in `workdir`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.held = False

  def acquire(self) -> "WorkdirLock":
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):  # a stale lock is removed, then the create is retried
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._handle_existing(me)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps reappearing "
                             "(another run starting at the same time?)")

  def _handle_existing(self, me: dict) -> None:
    owner = _read(self.path)
    if owner is None:  # being written right now, or truncated by a crash mid-write
      time.sleep(0.2)
      owner = _read(self.path)
    if owner is None:
      log.warning("taking over the unreadable lock file %s", self.path)
      self._remove()
      return
    pid, host = owner.get("pid"), owner.get("host")
    if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
      log.warning("taking over the lock of a run that is gone (pid %s on %s, started %s): %s",
                  pid, host, owner.get("started"), self.path)
      print(f"note: workdir lock of a dead run (pid {pid} on {host}) taken over", flush=True)
      self._remove()
      return
    where = "this host" if host == me["host"] else f"host {host}"
    raise WorkdirLockedError(
        f"workdir {os.path.dirname(self.path)!r} is in use by another run: pid {pid} on "
        f"{where} (started {owner.get('started')}). Wait for it, stop it, or use another "
        f"--workdir. If that run is dead (e.g. its host went away), delete {self.path}")

  def _remove(self) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if not self.held:
      return
    owner = _read(self.path)
    if owner is not None and owner.get("pid") == os.getpid():
      self._remove()
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
