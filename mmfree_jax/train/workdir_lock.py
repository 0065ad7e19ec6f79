"""One training run per workdir: an exclusive lock `WORKDIR/.lock` held by process 0.

Two runs on one workdir would interleave `metrics.jsonl`, overwrite `config.json` and delete
each other's checkpoint temporaries mid-save. The lock holds `{"pid", "host", "started",
"token", "beat"}` and is created whole with a create-only write (`paths.create_exclusive`: a
hard link locally, GCS `ifGenerationMatch=0`, S3 `If-None-Match: *`), so it fails if the lock
exists and no reader ever sees it half-written.

On a local disk a lock left by a run that died (same host, pid no longer alive) is taken over
with a warning; a live one, or one from another host (whose pid cannot be checked from here),
is refused with an error naming its pid and host. Takeover is atomic: racing runs serialize on
an `flock` of `WORKDIR/.lock.takeover` (released by the kernel if its holder dies), and under it
remove the lock only if its bytes are still the stale ones they read.

In a bucket no pid can be checked, so the holder proves it is alive: a daemon thread rewrites
`WORKDIR/.lock.heartbeat` (its token and the time) every `heartbeat_s` seconds, and a lock whose
last beat is older than `stale_s` (and than twice the holder's own `heartbeat_s`, which the lock
records) is taken over with a warning naming the old holder. A bucket has no flock; takeover
is a conditional delete of the stale version read (`paths.remove_if_version`: GCS
`ifGenerationMatch`, S3 `If-Match`), so of racing runs only one removes it and the others'
deletes fail against the new lock; the new lock is created with the create-only precondition.
It counts only if it still holds this run's token after `SETTLE_S`: a store that ignores
preconditions shows up there. Of racing runs, exactly one keeps it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from mmfree_jax import paths
from mmfree_jax.checkpoint import staging

log = logging.getLogger("mmfree_jax")
LOCK_NAME = ".lock"
TAKEOVER_NAME = ".lock.takeover"
HEARTBEAT_NAME = ".lock.heartbeat"
DEFAULT_HEARTBEAT_S = 60.0
DEFAULT_STALE_S = 300.0
SETTLE_S = 1.0  # bucket: how long a new lock must survive before it counts as held


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _parse(raw: bytes | None) -> dict | None:
  try:
    owner = json.loads(raw) if raw else None
  except ValueError:
    return None
  return owner if isinstance(owner, dict) else None


def _read_fresh(path: str) -> bytes | None:
  try:
    return paths.read_fresh(path)
  except OSError:
    return None


class WorkdirLock:
  """`acquire()` / `release()` (or a `with` block) around a run in `workdir`.

  heartbeat_s, stale_s: bucket workdirs only (see the module doc); `stale_s` must exceed
  `heartbeat_s` with room for a slow write (at least twice it).
  """

  def __init__(
    self,
    workdir: str,
    *,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    stale_s: float = DEFAULT_STALE_S,
  ):
    if not 0 < 2 * heartbeat_s <= stale_s:
      raise ValueError(
        f"train.lock_stale_s={stale_s:g} must be at least twice train.lock_heartbeat_s="
        f"{heartbeat_s:g} (> 0): a live run's lock would look stale between its beats"
      )
    self.path = paths.join(workdir, LOCK_NAME)
    self.heartbeat_path = paths.join(workdir, HEARTBEAT_NAME)
    self.remote = paths.is_remote(workdir)
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self.held = False
    self.token = uuid.uuid4().hex
    self._mine = b""
    self._stop = threading.Event()
    self._beater: threading.Thread | None = None

  def acquire(self) -> WorkdirLock:
    me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "token": self.token,
      "beat": time.time(),
      "heartbeat_s": self.heartbeat_s,
    }
    self._mine = json.dumps(me).encode()
    for _ in range(3):  # a stale lock is removed, then the create is retried
      if self._create():
        self.held = True
        if self.remote:
          self._beat()
          self._beater = threading.Thread(target=self._beat_forever, daemon=True)
          self._beater.start()
        return self
      self._handle_existing(me)
    raise WorkdirLockedError(
      f"could not take the lock {self.path}: it keeps reappearing "
      "(another run starting at the same time?)"
    )

  def _create(self) -> bool:
    if not self.remote:
      return paths.create_exclusive(self.path, self._mine)
    # Existence first: a store that ignores the create-only precondition still refuses here.
    if _read_fresh(self.path) is not None or not paths.create_exclusive(self.path, self._mine):
      return False
    time.sleep(SETTLE_S)
    return _read_fresh(self.path) == self._mine

  def _handle_existing(self, me: dict) -> None:
    seen = _read_fresh(self.path)
    if seen is None:  # released in between: just retry
      return
    owner = _parse(seen)
    if owner is None:  # being written right now, or truncated by a crash mid-write
      time.sleep(0.2)
      seen = _read_fresh(self.path)
      owner = _parse(seen)
    if seen is not None and owner is None:
      log.warning("taking over the unreadable lock file %s", self.path)
      self._take_over(seen)
      return
    if owner is None:
      return
    pid, host = owner.get("pid"), owner.get("host")
    why = self._why_stale(owner, me)
    if why is not None:
      if self._take_over(seen):
        log.warning(
          "took over the lock of a run that is gone (pid %s on %s, started %s; %s): %s",
          pid,
          host,
          owner.get("started"),
          why,
          self.path,
        )
        print(f"note: workdir lock of a dead run (pid {pid} on {host}) taken over", flush=True)
      return
    where = "this host" if host == me["host"] else f"host {host}"
    stale = (
      f", or wait: a lock whose heartbeat stops for {self.stale_s:g} s is taken over"
      if self.remote
      else ""
    )
    raise WorkdirLockedError(
      f"workdir {paths.dirname(self.path)!r} is in use by another run: pid {pid} on "
      f"{where} (started {owner.get('started')}). Wait for it, stop it, or use another "
      f"--workdir. If that run is dead (e.g. its host went away), delete {self.path}{stale}"
    )

  def _why_stale(self, owner: dict, me: dict) -> str | None:
    """Why `owner`'s lock is stale (None: it may be live): a dead pid on this host (local
    disk), or a heartbeat older than `stale_s` (bucket)."""
    pid = owner.get("pid")
    if not self.remote:
      alive = owner.get("host") != me["host"] or not isinstance(pid, int) or staging.pid_alive(pid)
      return None if alive else "its pid is not running"
    beat = _parse(_read_fresh(self.heartbeat_path)) or {}
    last = beat.get("beat") if beat.get("token") == owner.get("token") else owner.get("beat")
    if not isinstance(last, (int, float)):  # a lock without beats: its object's age
      last = paths.mtime(self.path)
    age = time.time() - last
    theirs = owner.get("heartbeat_s")  # a holder that beats slowly gets as long as it needs
    limit = max(self.stale_s, 2 * theirs if isinstance(theirs, (int, float)) else 0)
    return f"no heartbeat for {age:.0f} s" if age > limit else None

  def _take_over(self, seen: bytes) -> bool:
    """Removes the lock if it still holds `seen`; returns whether it did (if not, another run
    took it over first and the caller looks at the new lock)."""
    if self.remote:
      return self._remove_if_holds(seen)
    mutex = os.open(
      paths.join(paths.dirname(self.path), TAKEOVER_NAME), os.O_CREAT | os.O_RDWR, 0o644
    )
    try:
      try:
        fcntl.flock(mutex, fcntl.LOCK_EX)
      except OSError as e:  # no flock on this file system: the takeover is not atomic
        log.warning("cannot flock %s (%s); taking over the lock without it", TAKEOVER_NAME, e)
      return self._remove_if_holds(seen)
    finally:
      os.close(mutex)  # releases the flock

  def _beat(self) -> None:
    beat = {"token": self.token, "beat": time.time()}
    paths.write_atomic(self.heartbeat_path, json.dumps(beat))

  def _beat_forever(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if _read_fresh(self.path) != self._mine:
          log.error(
            "the workdir lock %s no longer holds this run's token: another run took it over "
            "(this run's heartbeat was older than %g s); stop one of the two runs",
            self.path,
            self.stale_s,
          )
          return
        self._beat()
      except Exception as e:  # pylint: disable=broad-except  # a storage hiccup: next beat
        log.warning("could not write the lock heartbeat %s: %s", self.heartbeat_path, e)

  def _remove_if_holds(self, raw: bytes) -> bool:
    """Deletes the lock if it holds `raw`; returns whether it did. The delete names the
    version read (`paths.remove_if_version`: in a bucket the store checks it), so a lock
    rewritten since that read is kept."""
    try:
      current = paths.read_versioned(self.path)
    except OSError:
      return False
    return (
      current is not None and current[0] == raw and paths.remove_if_version(self.path, current[1])
    )

  def release(self) -> None:
    if not self.held:
      return
    self._stop.set()
    if self._beater is not None:
      self._beater.join()
      self._beater = None
    if self._remove_if_holds(self._mine):
      if self.remote:
        paths.remove(self.heartbeat_path, missing_ok=True)
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
