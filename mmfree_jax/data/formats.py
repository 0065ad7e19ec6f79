"""Corpus file formats for `prepare`: Parquet, JSONL, plain text, `datasets.save_to_disk` dirs.

Every format is read as a sequence of *units* with a stable index, so that a prepare can stop
after any document and resume at `(file, unit)` without tokenizing what came before:
  parquet   one unit per row (row groups streamed with pyarrow, only the text column read;
            a resume skips whole row groups from the footer's row counts)
  jsonl     one unit per line (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`); the document is the string
            field `text_field`; blank lines are units without a document
  text      one unit per paragraph (runs of non-blank lines, as `data.source=text`); `.gz`,
            `.zst` too
  hf_disk   one unit per row of a `datasets` `save_to_disk` folder (its Arrow files are
            memory-mapped and read column-wise with pyarrow; a DatasetDict folder is read
            through its `split` subfolder)
Units whose text is empty are counted but hold no document (a row with a null or `""` text).

Every input may be local or in a bucket (`gs://…`, `s3://…`): files are streamed through
`mmfree_jax.paths` (Parquet through a seekable file object, so a resume still reads only the
row groups it needs); a local `save_to_disk` folder's Arrow files are memory-mapped, a bucket's
streamed.

`check_inputs` opens every file cheaply (Parquet schema, compression magic bytes, first JSON
line, dataset column) so that a wrong path, field or file fails before any tokenizing.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import Iterator

from mmfree_jax import paths as paths_lib
from mmfree_jax.data import untrusted

SOURCE_FORMATS = ("parquet", "jsonl", "text", "hf_disk")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_BATCH_ROWS = 4096


def resolve_inputs(inputs: str, fmt: str) -> list[str]:
  """Expands `--inputs` (comma-separated files, dirs for hf_disk, or globs), in sorted order."""
  if fmt not in SOURCE_FORMATS:
    raise ValueError(f"unknown --format {fmt!r}; choose one of {SOURCE_FORMATS}")
  entries = [e.strip() for e in (inputs or "").split(",") if e.strip()]
  if not entries:
    raise ValueError("--inputs is empty; pass files or globs, e.g. --inputs 'data/*.parquet'")
  want_dir = fmt == "hf_disk"
  kind = "folder" if want_dir else "file"
  paths = []
  for entry in entries:
    pattern = paths_lib.expanduser(entry)
    if paths_lib.has_magic(pattern):
      matches = [
        p
        for p in paths_lib.glob(pattern)
        if (paths_lib.isdir(p) if want_dir else paths_lib.isfile(p))
      ]
      if not matches:
        raise ValueError(f"--inputs glob {entry!r} matches no {kind}s; fix the pattern")
      paths += matches
    elif not paths_lib.exists(pattern):
      raise ValueError(f"--inputs {kind} {entry!r} does not exist; fix --inputs")
    elif want_dir != paths_lib.isdir(pattern):
      raise ValueError(
        f"--inputs entry {entry!r} is not a {kind}; --format={fmt} reads "
        + ("`datasets.save_to_disk` folders" if want_dir else "files")
      )
    else:
      paths.append(pattern)
  paths = list(dict.fromkeys(paths_lib.absolute(p) for p in paths))
  for path in paths:
    if not want_dir and paths_lib.size(path) == 0:
      raise ValueError(f"input file {path!r} is empty; remove it from --inputs")
  return paths


def file_stamp(path: str) -> list[int]:
  """[size, mtime in ns] of a file: changes whenever it is rewritten (an object in a bucket:
  its size and last upload time)."""
  if not paths_lib.is_remote(path):
    st = os.stat(path)  # local: mtime_ns exactly (a float of seconds rounds it)
    return [st.st_size, st.st_mtime_ns]
  return [paths_lib.size(path), int(paths_lib.mtime(path) * 1e9)]


def input_identity(path: str) -> list:
  """(path, size, mtime_ns) of a file, or of every file in a folder: changes on any rewrite."""
  if not paths_lib.isdir(path):
    return [[path, *file_stamp(path)]]
  return [[f, *file_stamp(paths_lib.join(path, f))] for f in paths_lib.find(path)]


# ---------------------------------------------------------------------------- checks


def _magic(path: str, n: int = 4) -> bytes:
  with paths_lib.open_file(path, "rb") as f:
    return f.read(n)


def _check_compressed(path: str) -> None:
  head = _magic(path)
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top

    try:
      if head != _ZSTD_MAGIC:
        raise zstandard.ZstdError("bad magic number")
      with paths_lib.open_file(path, "rb") as f:
        zstandard.get_frame_parameters(f.read(18))
    except zstandard.ZstdError as e:
      raise ValueError(
        f"input file {path!r} is not valid zstd ({e}); re-download or "
        "re-compress it, or remove it from --inputs"
      ) from None
  elif path.endswith(".gz") and head[:2] != _GZIP_MAGIC:
    raise ValueError(
      f"input file {path!r} is not gzip (bad magic bytes); re-download it or "
      "drop the .gz suffix if it is plain text"
    )


def _parquet_text_column(path: str, text_field: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq

  # A bucket's file as a seekable stream: pyarrow reads the footer, then only what it needs.
  source = paths_lib.open_file(path, "rb") if paths_lib.is_remote(path) else path
  try:
    pf = pq.ParquetFile(source)
  except (pa.ArrowInvalid, OSError) as e:
    raise ValueError(
      f"input file {path!r} is not a readable Parquet file ({e}); fix or remove it from --inputs"
    ) from None
  schema = pf.schema_arrow
  if text_field not in schema.names:
    raise ValueError(
      f"Parquet file {path!r} has no column {text_field!r} (columns: "
      f"{schema.names}); set --text_field to the column holding the text"
    )
  kind = schema.field(text_field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise ValueError(
      f"Parquet column {text_field!r} of {path!r} is {kind}, not a string; set "
      "--text_field to the text column"
    )
  return pf


def _hf_table(path: str, text_field: str, split: str):
  """The memory-mapped Arrow table of a `save_to_disk` folder (a Dataset, or one split of a
  DatasetDict), checked to have a string column text_field."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  if paths_lib.isfile(paths_lib.join(path, "dataset_dict.json")):
    splits = untrusted.load_json(
      paths_lib.join(path, "dataset_dict.json"),
      what="a DatasetDict index",
      fix="re-save the dataset",
    )
    splits = splits.get("splits", []) if isinstance(splits, dict) else []
    if split not in splits:
      raise ValueError(
        f"{path!r} is a DatasetDict with splits {splits}; pass --hf_split with one of them"
      )
    path = paths_lib.join(path, split)
  state_path = paths_lib.join(path, "state.json")
  if not paths_lib.isfile(state_path):
    raise ValueError(
      f"{path!r} is not a `datasets` save_to_disk folder (no state.json); "
      "save it with Dataset.save_to_disk or pick another --format"
    )
  state = untrusted.load_json(state_path, what="a save_to_disk state", fix="re-save the dataset")
  entries = state.get("_data_files", []) if isinstance(state, dict) else []
  files = [
    untrusted.confined_join(
      path,
      d.get("filename") if isinstance(d, dict) else d,
      what=f"{state_path} _data_files",
      fix="re-save the dataset",
    )
    for d in entries
  ]
  if not files:
    raise ValueError(f"{state_path} lists no data files; re-save the dataset")
  tables = []
  for file in files:
    try:
      stream = paths_lib.open_file(file, "rb") if paths_lib.is_remote(file) else pa.memory_map(file)
      with stream:
        tables.append(pa.ipc.open_stream(stream).read_all())
    except (pa.ArrowInvalid, OSError) as e:
      raise ValueError(
        f"Arrow file {file!r} of {path!r} is unreadable ({e}); re-save the dataset"
      ) from None
  table = pa.concat_tables(tables)
  if text_field not in table.column_names:
    raise ValueError(
      f"dataset {path!r} has no column {text_field!r} (columns: "
      f"{table.column_names}); set --text_field to the column holding the text"
    )
  kind = table.schema.field(text_field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise ValueError(
      f"dataset column {text_field!r} of {path!r} is {kind}, not a string; set "
      "--text_field to the text column"
    )
  return table.column(text_field)


def _first_json_line(path: str, text_field: str) -> None:
  for lineno, line in enumerate(_lines(path), start=1):
    if line.strip():
      json_text(line, f"{path}:{lineno}", text_field)
      return
  raise ValueError(f"input file {path!r} holds no JSON lines; remove it from --inputs")


def check_inputs(paths: list[str], fmt: str, text_field: str, hf_split: str = "train") -> None:
  """Opens every input cheaply; raises ValueError naming the file and the fix."""
  if not text_field and fmt in ("parquet", "jsonl", "hf_disk"):
    raise ValueError(f"--format={fmt} needs --text_field (the field holding the text)")
  for path in paths:
    if fmt == "parquet":
      _parquet_text_column(path, text_field)
    elif fmt == "hf_disk":
      _hf_table(path, text_field, hf_split)
    else:
      _check_compressed(path)
      if fmt == "jsonl":
        _first_json_line(path, text_field)


# ---------------------------------------------------------------------------- reading


def open_text(path: str):
  """A UTF-8 text stream of a plain, `.gz` or `.zst` file (local or in a bucket)."""
  if path.endswith(".gz"):
    return io.TextIOWrapper(_GzipReader(path), encoding="utf-8")
  if path.endswith(".zst"):
    return io.TextIOWrapper(io.BufferedReader(_ZstdRaw(path)), encoding="utf-8")
  return paths_lib.open_file(path, "r", encoding="utf-8")


class _GzipReader(gzip.GzipFile):
  """Decompressed bytes of a `.gz` file; closing it closes the file it reads (a GzipFile
  leaves a stream it was handed open)."""

  def __init__(self, path: str):
    self._raw = paths_lib.open_file(path, "rb")
    super().__init__(fileobj=self._raw, mode="rb")

  def close(self) -> None:
    try:
      super().close()
    finally:
      self._raw.close()


class _ZstdRaw(io.RawIOBase):
  """Decompressed bytes of a (multi-frame) `.zst` file; a truncated last frame raises
  EOFError (zstandard's stream_reader ends silently there, losing the tail unnoticed)."""

  def __init__(self, path: str):
    import zstandard  # pylint: disable=g-import-not-at-top

    self._zstd = zstandard
    self._file = paths_lib.open_file(path, "rb")
    self._dobj = zstandard.ZstdDecompressor().decompressobj()
    self._pending = b""
    self._in_frame = False

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self._pending:
      data = self._dobj.unused_data if self._dobj.eof else b""
      if self._dobj.eof:
        self._dobj = self._zstd.ZstdDecompressor().decompressobj()
        self._in_frame = False
      data = data or self._file.read(1 << 20)
      if not data:
        if self._in_frame:
          raise EOFError("the last zstd frame is truncated")
        return 0
      self._in_frame = True
      self._pending = self._dobj.decompress(data)
    n = min(len(buffer), len(self._pending))
    buffer[:n] = self._pending[:n]
    self._pending = self._pending[n:]
    return n

  def close(self) -> None:
    self._file.close()
    super().close()


def _lines(path: str) -> Iterator[str]:
  """Lines of a text file; decompression and encoding errors name the file and the fix."""
  import zstandard  # pylint: disable=g-import-not-at-top

  try:
    with open_text(path) as f:
      yield from f
  except UnicodeDecodeError as e:
    raise ValueError(
      f"input file {path!r} is not UTF-8 text ({e}); convert it or remove it from --inputs"
    ) from None
  except (zstandard.ZstdError, EOFError, gzip.BadGzipFile, OSError) as e:
    raise ValueError(
      f"input file {path!r} is corrupt or truncated ({type(e).__name__}: {e}); "
      "re-download it or remove it from --inputs. Shards written so far are "
      "kept: rerun prepare to resume"
    ) from None


def json_text(
  line: str, where: str, text_field: str, *, flag: str = "--text_field", allow_null: bool = True
) -> str:
  """The string `text_field` of one JSON line (`""` for a JSON null when `allow_null`); errors
  name `where` (file:line) and the `flag` that picks the field."""
  try:
    row = json.loads(line)
  except (json.JSONDecodeError, RecursionError) as e:
    reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply to parse"
    raise ValueError(f"{where} is not valid JSON ({reason}); fix or remove that line") from None
  if not isinstance(row, dict) or text_field not in row:
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(
      f"{where} has no field {text_field!r} (has {keys}); set {flag} to the field holding the text"
    )
  text = row[text_field]
  if not isinstance(text, str) and not (text is None and allow_null):
    raise ValueError(
      f"{where}: field {text_field!r} is a {type(text).__name__}, not a "
      f"string; set {flag} to the text field"
    )
  return text or ""


def _jsonl_units(path: str, text_field: str, start: int) -> Iterator[tuple[int, str]]:
  for unit, line in enumerate(_lines(path)):
    if unit < start:
      continue
    yield unit, (json_text(line, f"{path}:{unit + 1}", text_field) if line.strip() else "")


def _text_units(path: str, start: int) -> Iterator[tuple[int, str]]:
  unit, paragraph = 0, []
  for line in _lines(path):
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      if unit >= start:
        yield unit, "".join(paragraph).rstrip("\n")
      unit, paragraph = unit + 1, []
  if paragraph and unit >= start:
    yield unit, "".join(paragraph).rstrip("\n")


def _column_units(chunks, start: int, offset: int = 0) -> Iterator[tuple[int, str]]:
  """(row, text) of consecutive Arrow string chunks, the first at row `offset`, from row
  `start` on (chunks ending before it are not decoded)."""
  for chunk in chunks:
    n = len(chunk)
    if offset + n > start:
      first = max(start, offset)
      for i, text in enumerate(chunk.slice(first - offset).to_pylist()):
        yield first + i, text or ""
    offset += n


def _parquet_units(path: str, text_field: str, start: int) -> Iterator[tuple[int, str]]:
  pf = _parquet_text_column(path, text_field)
  skipped, first_group = 0, 0
  while (
    first_group < pf.num_row_groups
    and skipped + pf.metadata.row_group(first_group).num_rows <= start
  ):
    skipped += pf.metadata.row_group(first_group).num_rows  # from the footer, never read
    first_group += 1
  groups = list(range(first_group, pf.num_row_groups))
  if not groups:
    return
  chunks = (
    batch.column(0)
    for batch in pf.iter_batches(
      batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=[text_field]
    )
  )
  yield from _column_units(chunks, start, skipped)


def read_units(
  path: str, fmt: str, text_field: str, start: int = 0, hf_split: str = "train"
) -> Iterator[tuple[int, str]]:
  """(unit index, text) of one input from unit `start` on; text is "" for no document."""
  if fmt == "parquet":
    yield from _parquet_units(path, text_field, start)
  elif fmt == "jsonl":
    yield from _jsonl_units(path, text_field, start)
  elif fmt == "text":
    yield from _text_units(path, start)
  elif fmt == "hf_disk":
    yield from _column_units(_hf_table(path, text_field, hf_split).chunks, start)
  else:
    raise ValueError(f"unknown --format {fmt!r}; choose one of {SOURCE_FORMATS}")
