"""prepare's reading and tokenizing: the inputs' documents in chunks (`input_chunks`, from a
recorded input position), tokenized in input order (`tokenized`), in `--num_proc` spawned
worker processes or in this one. `encode_chunk` is what a worker runs on a chunk.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from concurrent import futures
from typing import Iterator

import numpy as np

from mmfree_jax.data import formats
from mmfree_jax.data import tokenizer as tok_lib

_CHUNK_CHARS = 1 << 20  # text per tokenize task
_CHUNK_DOCS = 4096


def input_texts(paths, opts) -> Iterator[str]:
  """The non-empty documents of the inputs, in order."""
  for path in paths:
    for _, text in formats.read_units(path, opts.format, opts.text_field, hf_split=opts.hf_split):
      if text:
        yield text


def input_chunks(paths, opts, start: tuple[int, int]):
  """Chunks of documents from input position `start`: (texts, positions [(file, unit)])."""
  texts, where, chars = [], [], 0
  for f in range(start[0], len(paths)):
    first = start[1] if f == start[0] else 0
    for unit, text in formats.read_units(
      paths[f], opts.format, opts.text_field, first, hf_split=opts.hf_split
    ):
      if not text:
        continue
      texts.append(text)
      where.append((f, unit))
      chars += len(text)
      if chars >= _CHUNK_CHARS or len(texts) >= _CHUNK_DOCS:
        yield texts, where
        texts, where, chars = [], [], 0
  if texts:
    yield texts, where


_WORKER_TOKENIZER = None


def _init_worker(spec: str, fingerprint: str, cache_dir: str) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tok_lib.load_tokenizer(spec, cache_dir=cache_dir)
  if _WORKER_TOKENIZER.fingerprint != fingerprint:
    raise RuntimeError(
      f"worker tokenizer {spec} has fingerprint "
      f"{_WORKER_TOKENIZER.fingerprint}, expected {fingerprint}"
    )


def encode_chunk(tok, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
  """(tokens `[sum L]` of dtype, document lengths int64 `[D]`) of `encode_documents`."""
  docs = tok.encode_documents(texts)
  lengths = np.fromiter(map(len, docs), np.int64, len(docs))
  # One array per document, then one copy: ~30% less time per token than fromiter(chain).
  tokens = np.concatenate([np.array(d, dtype) for d in docs]) if docs else np.zeros(0, dtype)
  return tokens, lengths


def _encode_in_worker(texts, dtype_str):
  return encode_chunk(_WORKER_TOKENIZER, texts, np.dtype(dtype_str))


def tokenized(chunks, tok, worker_spec: str, num_proc: int, dtype, cache_dir: str):
  """(tokens, lengths, positions) per chunk, in input order; num_proc > 1 uses processes."""
  if num_proc == 1:
    for texts, where in chunks:
      yield (*encode_chunk(tok, texts, dtype), where)
    return
  # spawn: never fork a process holding tokenizer (or jax) thread pools; one thread each.
  os.environ.setdefault("RAYON_NUM_THREADS", "1")
  with futures.ProcessPoolExecutor(
    num_proc,
    mp_context=multiprocessing.get_context("spawn"),
    initializer=_init_worker,
    initargs=(worker_spec, tok.fingerprint, cache_dir),
  ) as pool:
    pending = collections.deque()
    for texts, where in chunks:
      pending.append((pool.submit(_encode_in_worker, texts, dtype.str), where))
      if len(pending) >= 2 * num_proc:  # bounded: never read the corpus far ahead
        result, w = pending.popleft()
        yield (*result.result(), w)
    while pending:
      result, w = pending.popleft()
      yield (*result.result(), w)
