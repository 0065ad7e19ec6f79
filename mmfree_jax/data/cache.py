"""Where tokenizer and corpus caches live (`$MMFREE_CACHE`, else `~/.cache/mmfree_jax`), and
local copies of files in a bucket.

The cache is a local folder on purpose: what it holds is memory-mapped (token `.npy` files,
`corpus.py`) or read by C++ that only opens local files (ArrayRecord shards, `prepared.py`).
A file in a bucket (`gs://`, `s3://`) that such a reader needs is streamed once into
`<cache>/remote/<key>/<name>` (`cached_copy`), keyed by what identifies its contents (a
prepared shard's sha256 from its manifest; a token file's size and upload time), so every
later run, process and grain worker on the machine reads the local copy.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid

from mmfree_jax import paths

_CHUNK = 1 << 22
# One lock per copy: grain's reader threads ask for the same shard at once; one downloads.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def default_cache_dir() -> str:
  """`$MMFREE_CACHE`, else `~/.cache/mmfree_jax`; refuses a bucket (see the module doc)."""
  cache = os.environ.get(
    "MMFREE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmfree_jax")
  )
  if paths.is_remote(cache):
    raise ValueError(
      f"MMFREE_CACHE={cache} is a bucket, but the cache holds memory-mapped files and must be "
      "local; set MMFREE_CACHE to a local folder (data in buckets is copied there as needed)"
    )
  return cache


def cached_path(path: str, key: str, cache_dir: str) -> str:
  """Where `cached_copy` keeps `path` (`path` itself when it is local); nothing is read."""
  if not paths.is_remote(path):
    return path
  folder = os.path.join(cache_dir, "remote", hashlib.sha256(key.encode()).hexdigest()[:24])
  return os.path.join(folder, paths.basename(path))


def cached_copy(
  path: str, key: str, cache_dir: str, *, sha256: str | None = None, fix: str = ""
) -> str:
  """A local file with the bytes of `path`: `path` itself when local, else its copy in the
  cache (downloaded on first use, in chunks, then renamed into place: concurrent processes
  each finish a whole copy, never read a partial one).

  Args:
    path: a local path or a bucket object.
    key: identifies the object's contents (a new upload must give a new key).
    cache_dir: the local cache folder.
    sha256: the hex digest the bytes must have; a download that differs is refused.
    fix: what to do when it differs, for the error.
  Raises:
    ValueError: the download's sha256 is not `sha256` (naming `path` and `fix`).
  """
  local = cached_path(path, key, cache_dir)
  if local == path:
    return path
  folder = os.path.dirname(local)
  with _LOCKS_LOCK:
    lock = _LOCKS.setdefault(local, threading.Lock())
  with lock:
    if os.path.isfile(local):
      return local
    os.makedirs(folder, exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    digest = hashlib.sha256()
    try:
      with paths.open_file(path, "rb") as src, open(tmp, "wb") as dst:
        for block in iter(lambda: src.read(_CHUNK), b""):
          digest.update(block)
          dst.write(block)
      if sha256 is not None and digest.hexdigest() != sha256:
        raise ValueError(
          f"{path} does not have the sha256 its manifest records (damaged in the bucket?); {fix}"
        )
      os.replace(tmp, local)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return local
