"""Reading folders a user hands us: paths confined to the folder, JSON read without a crash.

A prepared folder's manifest, an HF checkpoint's index and a packed folder's `config.json`
name other files by relative path. Those names come from a file anyone could have edited, so
`confined_join` refuses a name that leaves the folder (`../`, an absolute path, a symlink
pointing out of it), and `load_json` turns every way a JSON file can be bad (not JSON, not
UTF-8, nested deeper than Python's recursion limit) into one `ValueError` line naming it.
"""

from __future__ import annotations

import json
import os


def confined_join(root: str, name, *, what: str, fix: str) -> str:
  """`root/name`, refusing a `name` that is not a relative path inside `root`.

  Args:
    root: the folder the name is relative to.
    name: the path read from a file (anything: a non-string is refused too).
    what: where the name came from, for the error (e.g. "manifest.json shard 3").
    fix: what the user should do, for the error.
  Returns:
    the joined path (not resolved: the folder may be moved as a whole).
  Raises:
    ValueError: `name` is empty, absolute, or resolves outside `root` (also via symlinks).
  """
  if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
    raise ValueError(f"{what} names {name!r}, not a relative path inside {root}; {fix}")
  path = os.path.join(root, name)
  real_root = os.path.realpath(root)
  real = os.path.realpath(path)
  if os.path.commonpath([real_root, real]) != real_root:
    raise ValueError(
      f"{what} names {name!r}, which leaves {root} (only files inside the folder are read); {fix}"
    )
  return path


def load_json(path: str, *, what: str, fix: str):
  """The JSON value in `path`; a file that is not JSON (or too deeply nested to parse) is a
  one-line ValueError naming it, `what` it is and the `fix`."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
    reason = (
      "nested too deeply to parse"
      if isinstance(e, RecursionError)
      else str(e).splitlines()[0][:200]
    )
    raise ValueError(f"{path} ({what}) is not valid JSON: {reason}; {fix}") from None
