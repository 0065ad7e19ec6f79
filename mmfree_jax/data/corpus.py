"""Token corpora on disk: tokenize text sources once, index token files, memory-map both.

A `TokenCorpus` is a list of token shards (`.npy` flat integer arrays, memory-mapped) and a
document table. For text sources there is one shard, written once to
`<cache_dir>/tokens/<key>/tokens.npy` (int32, `[bos] + ids + [eos]` per document, see
`Tokenizer.encode_document`) with its `doc_ends.npy` (int64, exclusive end of each document);
the key hashes the source fingerprint (files' path, size, mtime) and the tokenizer's, so a
later run with the same files and tokenizer only memory-maps. For `tokens` sources the user's
files are the shards; their document ends (positions after each EOS) are cached the same way.

Sources in a bucket (`gs://`, `s3://`): a text source is streamed once while it is tokenized
(its fingerprint holds each object's size and upload time); a token file, memory-mapped, is
first copied into the cache (`cache.cached_copy`, keyed by the same identity). The cache
itself is a local folder (memory-mapped files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile

import numpy as np

from mmfree_jax.data import cache as cache_lib
from mmfree_jax.data.sources import Source, file_identity
from mmfree_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = "tokens-v1"
_ENCODE_CHUNK = 1024  # documents per encode_batch call
_SCAN_CHUNK = 1 << 24  # tokens per read when indexing a token file


@dataclasses.dataclass(frozen=True)
class Runs:
  """Contiguous stretches of token shards that, concatenated, form a split's token stream.

  All int64 `[R]` except `extra_eos` bool `[R]`: run r is `shard[start:stop]`, followed by
  one virtual EOS token when `extra_eos` (a token file whose last document lacks its EOS).
  """

  shard: np.ndarray
  start: np.ndarray
  stop: np.ndarray
  extra_eos: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    return self.stop - self.start + self.extra_eos

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
  """Token shards and the document table (documents in shard order).

  shard_paths: `.npy` files of flat integer token ids.
  doc_shard: int64 `[D]` shard of each document; doc_start, doc_stop: int64 `[D]` its
    `[start, stop)` in that shard (the EOS included); doc_extra_eos: bool `[D]`.
  """

  shard_paths: tuple[str, ...]
  doc_shard: np.ndarray
  doc_start: np.ndarray
  doc_stop: np.ndarray
  doc_extra_eos: np.ndarray

  @property
  def num_documents(self) -> int:
    return len(self.doc_shard)

  def runs(self, doc_ids: np.ndarray) -> Runs:
    """The documents doc_ids (sorted) as runs, merging neighbours that are contiguous."""
    doc_ids = np.asarray(doc_ids, np.int64)
    shard, start = self.doc_shard[doc_ids], self.doc_start[doc_ids]
    stop, extra = self.doc_stop[doc_ids], self.doc_extra_eos[doc_ids]
    if not len(doc_ids):
      return Runs(shard, start, stop, extra)
    # A document continues the previous run if it directly follows it in the same shard.
    joins = (shard[1:] == shard[:-1]) & (start[1:] == stop[:-1]) & ~extra[:-1]
    first = np.concatenate([[True], ~joins])
    last = np.concatenate([~joins, [True]])
    return Runs(shard[first], start[first], stop[last], extra[last])


def _atomic_dir(final_dir: str, write) -> None:
  """Runs write(tmp_dir) and renames tmp_dir to final_dir (another process may win)."""
  parent = os.path.dirname(final_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(final_dir) + ".tmp-")
  try:
    write(tmp)
    os.rename(tmp, final_dir)
  except OSError:
    if not os.path.isdir(final_dir):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _cache_key(*parts) -> str:
  return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts]).encode()).hexdigest()[:20]


def _write_npy_from_raw(raw_path: str, npy_path: str, dtype, count: int) -> None:
  """Wraps a raw little-endian array file in an .npy header (streams, no full copy in RAM)."""
  header = {
    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
    "fortran_order": False,
    "shape": (count,),
  }
  with open(npy_path, "wb") as out, open(raw_path, "rb") as raw:
    np.lib.format.write_array_header_1_0(out, header)
    shutil.copyfileobj(raw, out, 1 << 24)


def tokenize_to_cache(source: Source, tokenizer: Tokenizer, directory: str) -> None:
  """Writes tokens.npy (int32 `[N]`), doc_ends.npy (int64 `[D]`) and meta.json."""
  raw_path = os.path.join(directory, "tokens.raw")
  doc_ends, total, chunk = [], 0, []
  with open(raw_path, "wb") as raw:

    def flush():
      nonlocal total, chunk
      for ids in tokenizer.encode_documents(chunk):
        raw.write(np.asarray(ids, dtype="<i4").tobytes())
        total += len(ids)
        doc_ends.append(total)
      chunk = []

    for text in source.documents():
      chunk.append(text)
      if len(chunk) >= _ENCODE_CHUNK:
        flush()
    flush()
  if not doc_ends:
    raise ValueError(
      f"data.source={source.kind!r} ({', '.join(source.paths)}) holds no "
      "documents; fix --config.data.paths"
    )
  _write_npy_from_raw(raw_path, os.path.join(directory, "tokens.npy"), "<i4", total)
  os.remove(raw_path)
  np.save(os.path.join(directory, "doc_ends.npy"), np.asarray(doc_ends, np.int64))
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(
      {
        "source": source.kind,
        "paths": source.paths,
        "tokenizer": tokenizer.spec,
        "num_documents": len(doc_ends),
        "num_tokens": total,
      },
      f,
      indent=1,
    )


def text_corpus(source: Source, tokenizer: Tokenizer, cache_dir: str) -> TokenCorpus:
  """Tokenizes a text source into the cache once; memory-maps it."""
  directory = os.path.join(
    cache_dir, "tokens", _cache_key(source.fingerprint, tokenizer.fingerprint)
  )
  if not os.path.isfile(os.path.join(directory, "meta.json")):
    log.info("tokenizing %s with %s (once; cached in %s)", source.kind, tokenizer.spec, directory)
    _atomic_dir(directory, lambda tmp: tokenize_to_cache(source, tokenizer, tmp))
  ends = np.load(os.path.join(directory, "doc_ends.npy"))
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
  return TokenCorpus(
    (os.path.join(directory, "tokens.npy"),),
    np.zeros(len(ends), np.int64),
    starts,
    ends,
    np.zeros(len(ends), bool),
  )


def open_token_file(path: str, name: str | None = None) -> np.ndarray:
  """Memory-maps a local `.npy` token file, checking it is a non-empty flat integer array;
  errors name it `name` (the bucket object it was copied from) when given."""
  name = name or path
  try:
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(
      f"token file {name!r} is not a readable .npy array ({e}); data.source="
      "tokens needs .npy files of flat int arrays"
    ) from None
  if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or tokens.dtype.kind not in "iu":
    raise ValueError(
      f"token file {name!r} holds {getattr(tokens, 'dtype', '?')} "
      f"{getattr(tokens, 'shape', '?')}; data.source=tokens needs flat 1-D "
      "integer arrays (np.save(path, ids.astype(np.int32)))"
    )
  if not tokens.size:
    raise ValueError(f"token file {name!r} is empty; remove it from --config.data.paths")
  return tokens


def index_token_file(
  path: str, tokenizer: Tokenizer, name: str | None = None
) -> tuple[np.ndarray, bool]:
  """(document ends int64 `[D]`, whether the file ends with EOS); checks ids are in vocab.
  Errors name the file `name` when given (as `open_token_file`)."""
  name = name or path
  tokens = open_token_file(path, name)
  ends, lo, hi = [], None, None
  for offset in range(0, tokens.size, _SCAN_CHUNK):
    block = np.asarray(tokens[offset : offset + _SCAN_CHUNK])
    ends.append(np.flatnonzero(block == tokenizer.eos_id) + offset + 1)
    lo = block.min() if lo is None else min(lo, block.min())
    hi = block.max() if hi is None else max(hi, block.max())
  if lo < 0 or hi >= tokenizer.vocab_size:
    raise ValueError(
      f"token file {name!r} has ids in [{lo}, {hi}] but tokenizer "
      f"{tokenizer.spec!r} has {tokenizer.vocab_size} ids; set "
      "--config.data.tokenizer to the tokenizer that produced the file"
    )
  ends = np.concatenate(ends).astype(np.int64)
  ends_with_eos = bool(len(ends) and ends[-1] == tokens.size)
  if not ends_with_eos:
    ends = np.concatenate([ends, [tokens.size]])
  return ends, ends_with_eos


def token_corpus(source: Source, tokenizer: Tokenizer, cache_dir: str) -> TokenCorpus:
  """The `tokens` source: the user's files as shards, their document index cached."""
  shard, start, stop, extra, files = [], [], [], [], []
  for i, remote in enumerate(source.paths):
    identity = file_identity(remote)
    path = cache_lib.cached_copy(remote, json.dumps(identity), cache_dir)  # a bucket's: copied
    files.append(path)
    directory = os.path.join(cache_dir, "token_index", _cache_key(identity, tokenizer.fingerprint))
    if not os.path.isfile(os.path.join(directory, "meta.json")):

      def write(tmp, path=path, remote=remote):
        ends, ends_with_eos = index_token_file(path, tokenizer, remote)
        np.save(os.path.join(tmp, "doc_ends.npy"), ends)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
          json.dump({"path": remote, "ends_with_eos": ends_with_eos}, f)

      _atomic_dir(directory, write)
    open_token_file(path, remote)  # fail early if it was replaced by something unreadable
    ends = np.load(os.path.join(directory, "doc_ends.npy"))
    with open(os.path.join(directory, "meta.json")) as f:
      ends_with_eos = json.load(f)["ends_with_eos"]
    shard.append(np.full(len(ends), i, np.int64))
    start.append(np.concatenate([[0], ends[:-1]]).astype(np.int64))
    stop.append(ends)
    flags = np.zeros(len(ends), bool)
    flags[-1] = not ends_with_eos
    extra.append(flags)
  return TokenCorpus(tuple(files), *(np.concatenate(a) for a in (shard, start, stop, extra)))


def load_corpus(source: Source, tokenizer: Tokenizer, cache_dir: str) -> TokenCorpus:
  """The source's token corpus (tokenized/indexed on first use, then memory-mapped)."""
  if source.is_text:
    return text_corpus(source, tokenizer, cache_dir)
  return token_corpus(source, tokenizer, cache_dir)
