"""The one path layer: every user-given path (a local path, `gs://…`, `s3://…`) goes through here.

Built on `etils.epath`, which orbax already uses for checkpoints, so a workdir means the same
thing to our files and to orbax's; its `gs://`/`s3://` backend is fsspec (gcsfs, s3fs), whose
create-only writes (`mode="create"`: GCS `ifGenerationMatch=0`, S3 `If-None-Match: *`) give the
workdir lock its precondition. Credentials and endpoints are the clients' own standard
variables: `STORAGE_EMULATOR_HOST` / `GOOGLE_APPLICATION_CREDENTIALS` for GCS (plus
`TENSORSTORE_GCS_HTTP_URL` for orbax's arrays), `AWS_ENDPOINT_URL` / `AWS_ACCESS_KEY_ID` … for S3.

Atomic writes: on a local disk a file is written to a private name and renamed into place. An
object store has no rename, but an object becomes visible only whole, when its upload completes,
so `write_atomic` uploads straight to the final name (a reader sees the old object or the new
one, never half). A folder of several files is published with a marker written last
(`publish_marker` / `is_published`); readers check the marker, not the files. A delete that
must not remove a newer write names the version it read (`read_versioned` /
`remove_if_version`: GCS `ifGenerationMatch`, S3 `If-Match`).

All functions take `str | os.PathLike` and return plain `str` paths (keeping `gs://`), so callers
format them in messages and join them with `join`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

from etils import epath
from fsspec import asyn as fsspec_asyn
from fsspec import config as fsspec_config

REMOTE_SCHEMES = ("gs://", "s3://")
# Errors of os.link on file systems without hard links: then a create-only write uses O_EXCL.
_NO_LINK = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK)
# gcsfs logs a credentials warning per bucket when it runs without Google credentials (an
# emulator, or anonymous reads); the clients' own errors still reach the user.
logging.getLogger("gcsfs").setLevel(logging.ERROR)
# No client-side listing cache: epath keeps its own gcsfs instance (other arguments than
# `_fs`'s), so a cached listing in one would hide what the other (or another process, another
# host) wrote since; every query asks the store.
for _proto in ("gs", "gcs", "s3", "s3a"):
  fsspec_config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object in a bucket (`gs://`, `s3://`) rather than a local file."""
  return str(path).startswith(REMOTE_SCHEMES)


def scheme(path: str | os.PathLike) -> str:
  """`"gs"`, `"s3"` or `"file"`."""
  p = str(path)
  return p.split("://", 1)[0] if is_remote(p) else "file"


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path` (for code that hands paths to orbax or walks a tree)."""
  return epath.Path(os.fspath(path))


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/part/…` as a string; keeps `gs://` (unlike `os.path.join` + `normpath`)."""
  b = os.fspath(base)
  if not is_remote(b):
    return os.path.join(b, *parts)
  for part in parts:
    b = b.rstrip("/") + "/" + part.lstrip("/")
  return b


def basename(path: str | os.PathLike) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path: str | os.PathLike) -> str:
  p = os.fspath(path)
  if not is_remote(p):
    return os.path.dirname(p)
  head, sep, _ = p.rstrip("/").rpartition("/")
  return head if not head.endswith(":/") else head + "/"


def expanduser(path: str | os.PathLike) -> str:
  """A leading `~` expanded to the home folder (local paths; a bucket path is unchanged)."""
  p = os.fspath(path)
  return p if is_remote(p) else os.path.expanduser(p)


def absolute(path: str | os.PathLike) -> str:
  """An absolute path (orbax wants one); a bucket path is already absolute."""
  p = os.fspath(path)
  return p if is_remote(p) else os.path.abspath(p)


def exists(path: str | os.PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return as_path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
  return as_path(path).is_file()


def makedirs(path: str | os.PathLike) -> None:
  """`mkdir -p`; on a bucket, where folders are only name prefixes, nothing to do."""
  if not is_remote(path):
    os.makedirs(os.fspath(path), exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names (not paths) directly under `path`, sorted."""
  return sorted(p.name for p in as_path(path).iterdir())


def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
  """{name: bytes} of the files directly in `folder`, from one listing (one request on a
  bucket, where a size per file would be a request each)."""
  p = os.fspath(folder).rstrip("/")
  if not is_remote(p):
    with os.scandir(p) as entries:
      return {e.name: e.stat().st_size for e in entries if e.is_file()}
  return {
    basename(e["name"]): int(e["size"]) for e in _fs(p).ls(p, detail=True) if e["type"] == "file"
  }


def find(folder: str | os.PathLike) -> list[str]:
  """The `/`-separated names, relative to `folder`, of every file under it (any depth), sorted."""
  p = os.fspath(folder).rstrip("/")
  if not is_remote(p):
    return sorted(
      os.path.relpath(os.path.join(root, name), p).replace(os.sep, "/")
      for root, _, names in os.walk(p)
      for name in names
    )
  key = p.split("://", 1)[1] + "/"
  return sorted(f[len(key) :] for f in _fs(p).find(p) if f.startswith(key))


def glob(pattern: str | os.PathLike) -> list[str]:
  """Paths matching a glob `pattern` (`*`, `?`, `[…]`; `**` spans folders), sorted."""
  p = os.fspath(pattern)
  if not is_remote(p):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel

    return sorted(glob_lib.glob(p, recursive=True))  # `**` as fsspec reads it for buckets
  return sorted(f"{scheme(p)}://{m}" for m in _fs(p).glob(p))


def has_magic(pattern: str | os.PathLike) -> bool:
  """Whether `pattern` holds glob characters (`*`, `?`, `[`), i.e. names several paths."""
  import glob as glob_lib  # pylint: disable=import-outside-toplevel

  return glob_lib.has_magic(os.fspath(pattern))


def size(path: str | os.PathLike) -> int:
  """Bytes in the file `path`."""
  return as_path(path).stat().length


def mtime(path: str | os.PathLike) -> float:
  """Seconds since the epoch of the last write of `path`."""
  return float(as_path(path).stat().mtime)


def remove(path: str | os.PathLike, *, missing_ok: bool = True) -> None:
  """Deletes the file `path`."""
  as_path(path).unlink(missing_ok=missing_ok)


def remove_empty_dir(path: str | os.PathLike) -> bool:
  """Deletes the folder `path` if it is empty; returns whether it did. A bucket has no empty
  folders (a folder is only a name prefix), so there it does nothing."""
  if is_remote(path):
    return False
  try:
    os.rmdir(os.fspath(path))
  except OSError:
    return False
  return True


def rmtree(path: str | os.PathLike) -> None:
  """Deletes the folder `path` and everything under it (nothing if it is missing)."""
  p = as_path(path)
  if p.exists():
    p.rmtree()


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves the file or folder `src` to `dst`; on a bucket object by object (a server-side copy,
  then a delete), so not atomic there."""
  s, d = os.fspath(src), os.fspath(dst)
  if not is_remote(s):
    shutil.move(s, d)
    return
  fs = _fs(s)
  prefix = s.split("://", 1)[1].rstrip("/")
  for name in fs.find(s) if fs.isdir(s) else [prefix]:
    target = d.rstrip("/") + name[len(prefix) :]
    fs.cp_file(name, target)
    fs.rm_file(name)


def open_file(path: str | os.PathLike, mode: str = "r", *, encoding: str | None = None) -> IO[Any]:
  """`open()` for any path; text modes are UTF-8 unless `encoding` says otherwise."""
  p = os.fspath(path)
  if not is_remote(p):
    return open(p, mode, encoding=None if "b" in mode else (encoding or "utf-8"))  # noqa: SIM115
  f = _fs(p).open(p, mode if "b" in mode else mode.replace("t", "") + "b")
  if "b" in mode:
    return f
  import io  # pylint: disable=import-outside-toplevel

  return io.TextIOWrapper(f, encoding=encoding or "utf-8", newline="" if "r" not in mode else None)


def read_bytes(path: str | os.PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return as_path(path).read_text(encoding="utf-8")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` so that no reader sees it half-written (see the module doc)."""
  raw = data.encode("utf-8") if isinstance(data, str) else data
  p = os.fspath(path)
  if is_remote(p):
    _fs(p).pipe_file(p, raw)
    return
  tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
  """Creates `path` holding `data` unless it exists; returns whether it did.

  Atomic on every backend: a local hard link of a private file (`O_EXCL` where links are not
  supported), a GCS upload with `ifGenerationMatch=0`, an S3 PUT with `If-None-Match: *`.
  """
  p = os.fspath(path)
  if is_remote(p):
    fs = _fs(p)
    try:
      fs.pipe_file(p, data, mode="create")
    except FileExistsError:
      return False
    except OSError as e:
      if _precondition_failed(e):
        return False
      raise
    return True
  return _create_local(p, data)


def _precondition_failed(e: OSError) -> bool:
  """Whether a client's error is a store's 412 (a failed precondition): gcsfs and s3fs report
  some as a plain OSError (s3fs: EINVAL with S3's message, its cause the 412 response)."""
  text = f"{e} {e.__cause__ or ''}".lower()
  return "412" in text or "precondition" in text or "pre-condition" in text


def _create_local(path: str, data: bytes) -> bool:
  private = f"{path}.{os.getpid()}.{uuid.uuid4().hex}"
  with open(private, "wb") as f:
    f.write(data)
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
  try:  # no hard links here: a reader may briefly see an empty file
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  return True


def read_fresh(path: str | os.PathLike) -> bytes | None:
  """The bytes of `path` as the store holds them now (no client-side listing cache), or None
  if it does not exist. For files another process may have just written or deleted (locks)."""
  p = os.fspath(path)
  try:
    if is_remote(p):
      fs = _fs(p)
      fs.invalidate_cache(p)
      return fs.cat_file(p)
    with open(p, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


def read_versioned(path: str | os.PathLike) -> tuple[bytes, str] | None:
  """`(bytes, version)` of `path` from one read, or None if it does not exist; the version
  (GCS generation, S3 ETag, a local file's sha256) is what `remove_if_version` checks."""
  p = os.fspath(path)
  try:
    if scheme(p) == "gs":
      fs = _fs(p)
      headers, data = fs.call("GET", fs.url(p))
      return data, headers["x-goog-generation"]
    if scheme(p) == "s3":
      fs = _fs(p)
      bucket, key, _ = fs.split_path(p)
      return fsspec_asyn.sync(fs.loop, _s3_get_versioned, fs, bucket, key)
    with open(p, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  return data, hashlib.sha256(data).hexdigest()


async def _s3_get_versioned(fs, bucket: str, key: str) -> tuple[bytes, str]:
  response = await fs._call_s3("get_object", Bucket=bucket, Key=key)  # pylint: disable=protected-access
  async with response["Body"] as body:
    return await body.read(), response["ETag"]


def remove_if_version(path: str | os.PathLike, version: str) -> bool:
  """Deletes `path` only if it is still `version` (from `read_versioned`); returns whether it
  did (False: it changed or went away since that read).

  In a bucket the store checks the version with the delete (GCS `ifGenerationMatch`, S3
  `If-Match`), so a write between the read and the delete makes it fail: atomic. On a local
  disk the check and the delete are two steps; racing callers serialize them (the workdir
  lock's flock).
  """
  p = os.fspath(path)
  try:
    if scheme(p) == "gs":
      fs = _fs(p)
      bucket, key, _ = fs.split_path(p)
      fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
    elif scheme(p) == "s3":
      fs = _fs(p)
      bucket, key, _ = fs.split_path(p)
      fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
    else:
      seen = read_versioned(p)
      if seen is None or seen[1] != version:
        return False
      os.remove(p)
  except FileExistsError:  # gcsfs's name for 412
    return False
  except FileNotFoundError:
    return False
  except OSError as e:
    if _precondition_failed(e):
      return False
    raise
  if is_remote(p):
    fs.invalidate_cache(p)
  return True


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
  """A local file holding `path`'s bytes, for libraries that only read local files
  (sentencepiece, memory-mapped safetensors, ArrayRecord's reader): `path` itself when local,
  else a temporary download removed on exit."""
  p = os.fspath(path)
  if not is_remote(p):
    yield p
    return
  tmpdir = tempfile.mkdtemp(prefix="mmfree-")
  try:
    local = os.path.join(tmpdir, basename(p))
    _fs(p).get_file(p, local)
    yield local
  finally:
    shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def local_dir_for(path: str | os.PathLike) -> Iterator[str]:
  """A local folder whose files end up under `path`, for writers that only write local files
  (ArrayRecord, safetensors): `path` itself when local (created), else a temporary folder
  uploaded file by file on a clean exit (not on an exception)."""
  p = os.fspath(path)
  if not is_remote(p):
    makedirs(p)
    yield p
    return
  tmpdir = tempfile.mkdtemp(prefix="mmfree-")
  try:
    yield tmpdir
    upload_tree(tmpdir, p)
  finally:
    shutil.rmtree(tmpdir, ignore_errors=True)


def upload_tree(local_dir: str, dest: str | os.PathLike) -> None:
  """Copies every file under the local folder `local_dir` to `dest` (any backend)."""
  d = os.fspath(dest)
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    for name in sorted(files):
      target = join(d, name) if rel == "." else join(d, *rel.split(os.sep), name)
      if is_remote(d):
        _fs(d).put_file(os.path.join(root, name), target)
      else:
        makedirs(dirname(target))
        shutil.copyfile(os.path.join(root, name), target)


def publish_marker(folder: str | os.PathLike, marker: str, data: bytes | str = b"") -> None:
  """Writes `folder/marker` last, after every file of the folder: readers that check
  `is_published` never see a folder being written (the object-storage form of a rename)."""
  write_atomic(join(folder, marker), data)


def is_published(folder: str | os.PathLike, marker: str) -> bool:
  return exists(join(folder, marker))


def _fs(path: str):
  """The fsspec file system of a bucket path (gcsfs, s3fs), cached per process by fsspec."""
  import fsspec  # pylint: disable=import-outside-toplevel

  return fsspec.filesystem(scheme(path))
