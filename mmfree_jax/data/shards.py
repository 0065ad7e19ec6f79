"""The shard files of a prepared folder: names, the writer, the commit, verification.

A shard `shard-NNNNN.array_record` is written to `*.tmp`, fsynced, renamed, then its sidecar
`shard-NNNNN.json` (counts, sha256, the input positions it spans) is written atomically
(`paths.write_atomic`): the sidecar is the commit (`ShardWriter.commit`). `committed_shards`
keeps the committed prefix that verifies and deletes the rest (a resumed `prepare`).

An output folder in a bucket (`gs://`, `s3://`): the ArrayRecord writer only writes local
files, so a shard is written to a local staging folder and uploaded whole when it is
committed (an object appears only complete), then its sidecar is uploaded: the same commit
order, one shard of local disk at a time, and a killed prepare resumes from the bucket. A
resume re-reads each committed shard from the bucket to check its sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading

import numpy as np

from mmfree_jax import paths

log = logging.getLogger(__name__)

FORMAT_VERSION = "mmfree-tokens-array-record-v1"
MANIFEST = "manifest.json"
# The names prepare writes (and a resume may delete); anything else in the folder is left alone.
_OWN_FILE = re.compile(r"shard-(\d{5})\.(array_record|json)(\.tmp)?")


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.array_record"


def sidecar_name(index: int) -> str:
  return f"shard-{index:05d}.json"


TOKEN_DTYPES = ("<u2", "<i4")  # what token_dtype picks from


def token_dtype(vocab_size: int) -> np.dtype:
  """Stored id type: uint16 when every id fits, else int32 (little-endian)."""
  return np.dtype(TOKEN_DTYPES[0] if vocab_size <= 1 << 16 else TOKEN_DTYPES[1])


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, local or in a bucket (streamed)."""
  digest = hashlib.sha256()
  with paths.open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


# Shards that verified in this process, by (path, size, mtime, sha256): each is hashed once.
_VERIFIED: set[tuple] = set()
# One lock per shard: grain's reader threads hash different shards at once (hashlib releases
# the GIL), and threads reading one shard wait for its single hash.
_LOCKS: dict[tuple, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()
REDO = (
  "copy the folder again, or rerun its prepare command (it keeps the shards that "
  "verify against their sidecars, redoes the rest and rewrites the manifest)"
)


def _stored_counts(path: str) -> tuple[int, int]:
  """(records, bytes of the last record) of an ArrayRecord file."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  reader = array_record_module.ArrayRecordReader(path)
  try:
    n = reader.num_records()
    return n, (len(reader.read([n - 1])[0]) if n else 0)
  finally:
    reader.close()


def verify_shard(
  path: str, meta: dict, *, record_tokens: int, dtype: np.dtype, name: str | None = None
) -> None:
  """Checks a local shard file against its manifest entry `meta` once per process (then
  cached): size and sha256 (bit rot, a damaged copy), then records and tokens (a manifest
  that lies). A shard in a bucket is checked on its local copy (`cache.cached_copy`).

  Thread-safe (grain reads from several threads). Raises ValueError naming the shard (`name`,
  the bucket object a local copy was made of, when given) and the fix.
  """
  shown = path if name in (None, path) else f"{name} (its local copy {path})"
  try:
    stat = os.stat(path)
  except OSError as e:
    raise ValueError(f"shard {shown} cannot be opened ({e.strerror}); {REDO}") from None
  key = (path, stat.st_size, stat.st_mtime_ns, meta["sha256"])
  if key in _VERIFIED:
    return
  with _LOCKS_LOCK:
    lock = _LOCKS.setdefault(key, threading.Lock())
  with lock:
    if key in _VERIFIED:
      return
    if stat.st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
      raise ValueError(
        f"shard {shown} does not match the size and sha256 its manifest "
        f"records (damaged on disk or in a copy); {REDO}"
      )
    try:
      records, last_bytes = _stored_counts(path)
    except RuntimeError as e:  # a file whose checksum the manifest was edited to match
      raise ValueError(
        f"shard {shown} is not a readable ArrayRecord file ({str(e).splitlines()[0][:200]}); {REDO}"
      ) from None
    last_tokens = meta["tokens"] - (meta["records"] - 1) * record_tokens
    if records != meta["records"] or last_bytes != last_tokens * dtype.itemsize:
      raise ValueError(
        f"shard {shown} holds {records} records (last {last_bytes} bytes), but the manifest "
        f"says {meta['records']} records and {meta['tokens']} {dtype.str} tokens "
        f"({last_tokens * dtype.itemsize} bytes in the last record): the manifest does not "
        f"describe the file; {REDO}"
      )
    _VERIFIED.add(key)


def write_json_atomic(path: str, value) -> None:
  """`value` as indented JSON in `path` (local or bucket), never seen half-written."""
  paths.write_atomic(path, json.dumps(value, indent=1))


class ShardWriter:
  """Writes one shard's token stream as fixed-size records to a local `*.tmp` (in `out`, or
  in a staging folder when `out` is in a bucket); `commit` publishes it."""

  def __init__(self, out: str, index: int, record_tokens: int, dtype, start, options: str):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    self.out, self.index, self.record_tokens, self.dtype = out, index, record_tokens, dtype
    self.path = paths.join(out, shard_name(index))
    # A bucket: stage the shard locally (the writer only writes local files).
    self._stage = tempfile.mkdtemp(prefix="mmfree-shard-") if paths.is_remote(out) else None
    self.tmp = os.path.join(self._stage or out, shard_name(index) + ".tmp")
    self._writer = array_record_module.ArrayRecordWriter(self.tmp, options)
    self._buffer = np.zeros(0, dtype)
    self.tokens = self.documents = self.records = 0
    self.start = list(start)

  def add(self, tokens: np.ndarray, num_documents: int) -> None:
    self._buffer = np.concatenate([self._buffer, tokens])
    self.tokens += len(tokens)
    self.documents += num_documents
    full = len(self._buffer) // self.record_tokens * self.record_tokens
    for lo in range(0, full, self.record_tokens):
      self._writer.write(self._buffer[lo : lo + self.record_tokens].tobytes())
    self.records += full // self.record_tokens
    self._buffer = self._buffer[full:]

  def commit(self, end, final: bool, plan_id: str) -> dict:
    if len(self._buffer):
      self._writer.write(self._buffer.tobytes())
      self.records += 1
    self._writer.close()
    self._writer = None
    with open(self.tmp, "rb+") as f:  # a local file (this writer's, or staged)
      os.fsync(f.fileno())
    meta = {
      "index": self.index,
      "path": shard_name(self.index),
      "documents": self.documents,
      "tokens": self.tokens,
      "records": self.records,
      "bytes": os.path.getsize(self.tmp),
      "sha256": sha256_file(self.tmp),
      "start": self.start,
      "end": list(end),
      "final": final,
      "plan": plan_id,
    }
    if self._stage is None:
      os.replace(self.tmp, self.path)
    else:  # the upload publishes the whole object at once
      os.replace(self.tmp, os.path.join(self._stage, shard_name(self.index)))
      paths.upload_tree(self._stage, self.out)
      self._drop_stage()
    write_json_atomic(paths.join(self.out, sidecar_name(self.index)), meta)
    return meta

  def _drop_stage(self) -> None:
    if self._stage is not None:
      shutil.rmtree(self._stage, ignore_errors=True)  # a local staging folder of ours
      self._stage = None

  def read_back(self) -> np.ndarray:
    """Closes the shard uncommitted and returns its tokens `[tokens]` (then call `abort`)."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    if len(self._buffer):
      self._writer.write(self._buffer.tobytes())
      self._buffer = self._buffer[:0]
    self._writer.close()
    self._writer = None
    reader = array_record_module.ArrayRecordReader(self.tmp)
    try:
      return np.frombuffer(b"".join(reader.read_all()), self.dtype)
    finally:
      reader.close()

  def abort(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if os.path.exists(self.tmp):
      os.remove(self.tmp)
    self._drop_stage()


def committed_shards(out: str, plan_id: str) -> list[dict]:
  """The sidecars of shards 0..k-1 that are committed and verify; removes everything after.

  A shard counts only if its sidecar belongs to this plan and its file has the recorded size
  and sha256; the first one that does not, and every later shard, are deleted (redone).
  """
  done = []
  names = set(paths.listdir(out)) if paths.isdir(out) else set()
  while sidecar_name(len(done)) in names:
    try:
      meta = json.loads(paths.read_bytes(paths.join(out, sidecar_name(len(done)))))
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested too deeply
      meta = {}
    if not isinstance(meta, dict):
      meta = {}
    name = shard_name(len(done))  # never a path read from the sidecar
    path = paths.join(out, name)
    if (
      meta.get("plan") != plan_id
      or meta.get("path") != name
      or name not in names
      or paths.size(path) != meta["bytes"]
      or sha256_file(path) != meta["sha256"]
    ):
      log.warning("shard %d does not verify; redoing it and every later shard", len(done))
      break
    done.append(meta)
  stale = [
    name
    for name in sorted(names)
    if name.endswith(".tmp") or (_OWN_FILE.fullmatch(name) and int(name[6:11]) >= len(done))
  ]
  if stale and MANIFEST in names:
    paths.remove(paths.join(out, MANIFEST))  # first: the folder stops being complete
  for name in stale:
    paths.remove(paths.join(out, name))
  return done
