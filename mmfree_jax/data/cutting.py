"""Cutting prepare's tokenized stream into shards (`prepare.py` drives, `shards.py` writes).

A shard closes after the document that brings it to `--shard_tokens`, so shards hold whole
documents and depend on the token stream alone. A corpus that fits one shard is cut in two
(`split_only_shard`), so that the default of `prepare` (hold one shard out for validation)
always has a shard to hold out, and the shards never depend on `--val_shards`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmfree_jax import paths as paths_lib
from mmfree_jax.data import formats
from mmfree_jax.data import shards as shards_lib

# A corpus that fits one shard is cut where its first part reaches this fraction of its tokens.
ONLY_SHARD_CUT = 0.9


@dataclasses.dataclass(frozen=True)
class Target:
  """Where and how `_write_shards` writes."""

  out: str
  paths: list[str]
  opts: object  # prepare.PrepareOptions
  plan: dict
  plan_id: str
  tok: object

  def writer(self, index: int, start) -> shards_lib.ShardWriter:
    return shards_lib.ShardWriter(
      self.out,
      index,
      self.opts.record_tokens,
      np.dtype(self.plan["dtype"]),
      start,
      self.plan["writer_options"],
    )


def write_shards(stream, shards: list[dict], target: Target) -> int:
  """Cuts the tokenized stream into shards, appending each committed sidecar to `shards`;
  returns the number of tokens read."""
  shard_tokens, new_tokens, writer = target.opts.shard_tokens, 0, None
  try:
    for tokens, lengths, where in stream:
      new_tokens += len(tokens)
      ends = np.cumsum(lengths)
      lo_doc, lo_tok = 0, 0
      while lo_doc < len(lengths):
        if writer is None:
          writer = target.writer(len(shards), where[lo_doc])
        room = shard_tokens - writer.tokens  # > 0
        # The first document whose end brings the shard to shard_tokens closes it.
        last = int(np.searchsorted(ends - lo_tok, room, side="left"))
        hi_doc = min(last + 1, len(lengths))
        hi_tok = int(ends[hi_doc - 1])
        writer.add(tokens[lo_tok:hi_tok], hi_doc - lo_doc)
        if writer.tokens >= shard_tokens:
          f, unit = where[hi_doc - 1]
          shards.append(writer.commit((f, unit + 1), final=False, plan_id=target.plan_id))
          writer = None
        lo_doc, lo_tok = hi_doc, hi_tok
    if writer is not None and writer.index == 0 and writer.documents >= 2:
      tokens, documents, start = writer.read_back(), writer.documents, writer.start
      writer.abort()  # its file is rewritten as two shards
      writer = None
      shards += split_only_shard(tokens, documents, start, target)
    elif writer is not None:
      shards.append(writer.commit((len(target.paths), 0), final=True, plan_id=target.plan_id))
    elif shards:  # the stream ended exactly at a shard boundary: mark the last one final
      shards[-1]["final"] = True
      shards_lib.write_json_atomic(
        paths_lib.join(target.out, shards_lib.sidecar_name(len(shards) - 1)), shards[-1]
      )
  finally:
    if writer is not None:
      writer.abort()
  return new_tokens


def split_only_shard(tokens: np.ndarray, documents: int, start, target: Target) -> list[dict]:
  """Commits a corpus that fits one shard (`tokens`, its `documents`, from input `start`) as
  two, cut at the document that brings the first to `ONLY_SHARD_CUT` of the tokens, so that
  one can be held out for validation whatever --val_shards says (the shards never depend on
  it). Returns both sidecars (one, final, if the EOS tokens do not mark the documents)."""
  doc_ends = np.flatnonzero(tokens == target.tok.eos_id) + 1  # encode never emits EOS
  end = (len(target.paths), 0)
  if len(doc_ends) != documents or doc_ends[-1] != len(tokens):  # never for our tokenizers
    pieces = [((0, len(tokens)), documents, start, end)]
  else:
    k = min(int(np.searchsorted(doc_ends, ONLY_SHARD_CUT * len(tokens))), documents - 2)
    cut = int(doc_ends[k])
    middle = position_after(target.paths, target.opts, k + 1)
    pieces = [
      ((0, cut), k + 1, start, middle),
      ((cut, len(tokens)), documents - k - 1, middle, end),
    ]
  sidecars = []
  for index, ((lo, hi), docs, first, last) in enumerate(pieces):
    piece = target.writer(index, first)
    piece.add(tokens[lo:hi], docs)
    sidecars.append(piece.commit(last, final=index == len(pieces) - 1, plan_id=target.plan_id))
  return sidecars


def position_after(paths, opts, num_documents: int) -> tuple[int, int]:
  """The input position (file, unit) right after the first num_documents documents."""
  count = 0
  for f, path in enumerate(paths):
    for unit, text in formats.read_units(
      path, opts.format, opts.text_field, hf_split=opts.hf_split
    ):
      count += bool(text)
      if count == num_documents:
        return f, unit + 1
  raise AssertionError(f"the inputs hold fewer than {num_documents} documents")
