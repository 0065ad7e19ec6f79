"""Real local object stores for the tests: a GCS emulator (`gcp-storage-emulator`) and an S3
server (`moto` in server mode), each a separate process on a free port.

Nothing is monkeypatched: the fixtures set the clients' standard variables
(`STORAGE_EMULATOR_HOST` and `TENSORSTORE_GCS_HTTP_URL` for GCS; `AWS_ENDPOINT_URL` and dummy
credentials for S3) in this process, and `Emulator.env` hands the same variables to the
subprocesses a test starts (`train.py`, `eval.py`, …). Each test gets its own prefix in the
one bucket (`gcs_root` / `s3_root`), so tests sharing a session's server never see each other.

gcp-storage-emulator runs through `gcs_emulator_server.py`, which adds two answers of the real
API it lacks: the generation headers of a download (tensorstore's checkpoint writes need them)
and `ifGenerationMatch` preconditions (the workdir lock's create-only write); moto enforces
S3's `If-None-Match: *` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "mmfree-test"
# gcp-storage-emulator with the GCS answers it lacks (download generations, preconditions)
_GCS_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_server.py")


@dataclasses.dataclass
class Emulator:
  """A running object-store server and the variables that point clients at it."""

  scheme: str  # "gs" | "s3"
  bucket: str
  url: str
  env: dict[str, str]

  def root(self) -> str:
    """A fresh prefix `gs://bucket/<uuid>` (or `s3://…`) no other test uses."""
    return f"{self.scheme}://{self.bucket}/{uuid.uuid4().hex[:12]}"

  def list_objects(self, prefix: str) -> list[str]:
    """Every object name under `prefix` (a `scheme://bucket/…` path), asked of the server."""
    import fsspec  # pylint: disable=import-outside-toplevel

    fs = fsspec.filesystem(self.scheme)
    fs.invalidate_cache()
    try:
      return sorted(f"{self.scheme}://{p}" for p in fs.find(prefix))
    except FileNotFoundError:
      return []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, log: str, timeout: float = 60.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the storage emulator exited ({proc.returncode}); its log: {log}")
    try:
      with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return
    except OSError:
      time.sleep(0.2)
  proc.kill()
  raise RuntimeError(f"the storage emulator did not listen on port {port}; its log: {log}")


def _start(argv: list[str], port: int, workdir: str) -> subprocess.Popen:
  log = os.path.join(workdir, "server.log")
  with open(log, "wb") as f:
    proc = subprocess.Popen(argv, cwd=workdir, stdout=f, stderr=subprocess.STDOUT)
  _wait_for(port, proc, log)
  return proc


def _bin(name: str) -> str:
  return os.path.join(os.path.dirname(sys.executable), name)


def _use(env: dict[str, str]) -> dict[str, str | None]:
  """Sets `env` in this process; returns the previous values. fsspec's cached clients are
  dropped so the next one reads the new endpoint."""
  import fsspec  # pylint: disable=import-outside-toplevel

  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  fsspec.AbstractFileSystem.clear_instance_cache()
  return old


def _restore(old: dict[str, str | None]) -> None:
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@contextlib.contextmanager
def gcs_server() -> Iterator[Emulator]:
  """A GCS emulator process with bucket `BUCKET`, and the standard variables set in this
  process while it runs (also for the benchmarks, which start one outside pytest)."""
  workdir = tempfile.mkdtemp(prefix="gcs-emulator-")
  port = _free_port()
  argv = [sys.executable, _GCS_SERVER, "start", "--port", str(port)]
  proc = _start([*argv, "--default-bucket", BUCKET, "--in-memory", "-q"], port, workdir)
  url = f"http://127.0.0.1:{port}"
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_CLOUD_PROJECT": "mmfree-test",
  }
  old = _use(env)
  try:
    yield Emulator("gs", BUCKET, url, env)
  finally:
    _restore(old)
    proc.kill()
    proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def s3_server() -> Iterator[Emulator]:
  """A moto S3 server with bucket `BUCKET`, and the standard variables set in this process
  while it runs."""
  workdir = tempfile.mkdtemp(prefix="s3-emulator-")
  port = _free_port()
  proc = _start([_bin("moto_server"), "-p", str(port)], port, workdir)
  url = f"http://127.0.0.1:{port}"
  env = {
    "AWS_ENDPOINT_URL": url,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
  }
  old = _use(env)
  try:
    import fsspec  # pylint: disable=import-outside-toplevel

    fsspec.filesystem("s3").mkdir(BUCKET)
    yield Emulator("s3", BUCKET, url, env)
  finally:
    _restore(old)
    proc.kill()
    proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_emulator():
  """`gcs_server` for the whole session."""
  with gcs_server() as emulator:
    yield emulator


@pytest.fixture(scope="session")
def s3_emulator():
  """`s3_server` for the whole session."""
  with s3_server() as emulator:
    yield emulator


@pytest.fixture
def gcs_root(gcs_emulator) -> str:
  """A fresh `gs://` prefix in the emulator for one test."""
  return gcs_emulator.root()


@pytest.fixture
def s3_root(s3_emulator) -> str:
  """A fresh `s3://` prefix in the S3 server for one test."""
  return s3_emulator.root()
