"""`gcp-storage-emulator start …` with two answers of the real GCS JSON API that it lacks, which
orbax's tensorstore and the workdir lock rely on. Run as a program by `storage_emulators.py`:

    python tests/gcs_emulator_server.py start --port N --default-bucket B

- A media download (`alt=media`) carries the object's `x-goog-generation` and
  `x-goog-metageneration` headers. Without them tensorstore records generation 0 for every
  read, and its next conditional read of the same object (the OCDBT manifest of a checkpoint,
  re-read while a save runs) fails with "Malformed StorageGeneration".
- An upload or a delete with `ifGenerationMatch=G` is refused with 412 unless the object's
  generation is G (`0`: unless the object does not exist), as GCS does; the emulator ignores
  the parameter.

It also keeps no metadata file (run it with `--in-memory`): the emulator rewrites one with
every object's metadata on each write, which made a write take 45 ms instead of 6 ms once a
session held 1,500 objects.

The fix lives in the emulator process only: the code under test talks to it through the
standard variables, as it would to GCS.
"""

from __future__ import annotations

import json
import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage

_DOWNLOAD, _INSERT, _DELETE = objects.download, objects.insert, objects.delete


def _generation(storage, bucket: str, name: str) -> dict | None:
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def download(request, response, storage, *args, **kwargs):
  _DOWNLOAD(request, response, storage, *args, **kwargs)
  obj = _generation(storage, request.params["bucket_name"], request.params["object_id"])
  if obj is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def _upload_name(request) -> str | None:
  """The object an upload request names (media and resumable: `name=`; multipart: its
  metadata part; resumable without `name=`: its JSON body)."""
  if request.query.get("name"):
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict) and isinstance(data.get("meta"), dict):
    return data["meta"].get("name")
  if isinstance(data, (bytes, str)) and data:
    try:
      return json.loads(data).get("name")
    except (ValueError, AttributeError):
      return None
  return None


def _precondition_failed(request, response, storage, name: str | None) -> bool:
  """Answers 412 (and returns True) if the request's `ifGenerationMatch` does not hold for
  object `name` (`0`: it must not exist)."""
  wanted = request.query.get("ifGenerationMatch")
  if not (wanted and name):
    return False
  obj = _generation(storage, request.params["bucket_name"], name)
  current = "0" if obj is None else str(obj["generation"])
  if current == wanted[0]:
    return False
  response.status = HTTPStatus.PRECONDITION_FAILED
  response.json({"error": {"code": 412, "message": "conditionNotMet"}})
  return True


def insert(request, response, storage, *args, **kwargs):
  if _precondition_failed(request, response, storage, _upload_name(request)):
    return None
  return _INSERT(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
  if _precondition_failed(request, response, storage, request.params["object_id"]):
    return None
  return _DELETE(request, response, storage, *args, **kwargs)


# The emulator rewrites the metadata of every object it holds, as one JSON file, on each write:
# quadratic in a test session's objects. This process never restarts from that file (it runs
# with --in-memory), so it is not written.
Storage._write_config_to_file = lambda self: None

_REPLACE = {_DOWNLOAD: download, _INSERT: insert, _DELETE: delete}
objects.download, objects.insert = download, insert  # the router's fallback for uploads
server.HANDLERS = tuple(
  (regex, {method: _REPLACE.get(fn, fn) for method, fn in handlers.items()})
  for regex, handlers in server.HANDLERS
)

if __name__ == "__main__":
  sys.exit(main())
