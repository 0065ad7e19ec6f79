"""Reading folders a user hands us: paths confined to the folder, JSON read without a crash.

A prepared folder's manifest, an HF checkpoint's index and a packed folder's `config.json`
name other files by relative path. Those names come from a file anyone could have edited, so
`confined_join` refuses a name that leaves the folder (`../`, an absolute path, a symlink
pointing out of it), and `load_json` turns every way a JSON file can be bad (not JSON, not
UTF-8, nested deeper than Python's recursion limit) into one `ValueError` line naming it.
Both take local, `gs://` and `s3://` folders (`mmfree_jax.paths`); a bucket has no symlinks,
so there a name is confined by its normalised key staying under the folder's prefix.
"""

from __future__ import annotations

import json
import os
import posixpath

from mmfree_jax import paths


def confined_join(root: str, name, *, what: str, fix: str) -> str:
  """`root/name`, refusing a `name` that is not a relative path inside `root`.

  Args:
    root: the folder the name is relative to (local, `gs://` or `s3://`).
    name: the path read from a file (anything: a non-string is refused too).
    what: where the name came from, for the error (e.g. "manifest.json shard 3").
    fix: what the user should do, for the error.
  Returns:
    the joined path (not resolved: the folder may be moved as a whole).
  Raises:
    ValueError: `name` is empty, absolute, or resolves outside `root` (also via symlinks).
  """
  if (
    not isinstance(name, str)
    or not name
    or os.path.isabs(name)
    or name.startswith("/")
    or "\x00" in name
    or "://" in name
  ):
    raise ValueError(f"{what} names {name!r}, not a relative path inside {root}; {fix}")
  leaves = ValueError(
    f"{what} names {name!r}, which leaves {root} (only files inside the folder are read); {fix}"
  )
  if paths.is_remote(root):  # object keys: no symlinks, only the normalised key prefix
    key = posixpath.normpath(name.replace("\\", "/"))
    if key == ".." or key.startswith("../"):
      raise leaves
    return paths.join(root, key)
  path = os.path.join(root, name)
  real_root = os.path.realpath(root)
  if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
    raise leaves
  return path


def load_json(path: str, *, what: str, fix: str):
  """The JSON value in `path` (local or in a bucket); a file that is not JSON (or too deeply
  nested to parse) is a one-line ValueError naming it, `what` it is and the `fix`."""
  try:
    return json.loads(paths.read_bytes(path).decode("utf-8"))
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
    reason = (
      "nested too deeply to parse"
      if isinstance(e, RecursionError)
      else str(e).splitlines()[0][:200]
    )
    raise ValueError(f"{path} ({what}) is not valid JSON: {reason}; {fix}") from None
