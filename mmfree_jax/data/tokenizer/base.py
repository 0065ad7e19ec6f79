"""The tokenizer interface every backend implements, and helpers over any tokenizer.

`encode` never adds special tokens and never turns text into them (a literal
`<|endoftext|>` in a document is encoded as ordinary text), so an EOS id in a token stream
always marks a real document end. `encode_document` adds them: `[bos] + encode(text) + [eos]`
(bos only where the tokenizer has one: sentencepiece, some HF files).
"""

from __future__ import annotations

from typing import Iterable, Sequence

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class Tokenizer:
  """Text <-> int ids. Subclasses implement `_encode_batch` (new lists, which the caller may
  modify), `_decode` and set the fields.

  Attributes:
    spec: the spec string it was made from.
    vocab_size: number of ids; every id it produces is in `[0, vocab_size)`.
    eos_id: id ending every document in a token stream.
    bos_id: id starting every document, or None (byte, byte-level BPE).
    pad_id: id used for padding (masked out of the loss by segment id 0).
    fingerprint: a string identifying the exact vocabulary (keys token caches).
    backend: the library encoding text ("python", "tiktoken", "tokenizers",
      "sentencepiece"); never part of the fingerprint (every backend gives the same ids).
  """

  spec: str
  vocab_size: int
  eos_id: int
  bos_id: int | None
  pad_id: int
  fingerprint: str
  backend: str = "python"

  def encode(self, text: str) -> list[int]:
    """Ids of text, without special tokens."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._encode_batch(list(texts))

  def encode_document(self, text: str) -> list[int]:
    """`[bos] + encode(text) + [eos]`: how a document enters a token stream."""
    return self._wrap(self.encode(text))

  def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._wrap(ids) for ids in self.encode_batch(texts)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids; special tokens are rendered as their text, ids outside
    `[0, vocab_size)` (a model vocab padded past the tokenizer's) are skipped."""
    return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  # The file a Hugging Face folder holds this tokenizer in (None: it has no file form).
  file_name: str | None = None

  def save(self, folder: str) -> str | None:
    """Writes the tokenizer as `folder/<file_name>` (HF layout); returns the path, or None
    when it has no file form (the byte tokenizer)."""
    return None

  def _wrap(self, ids: list[int]) -> list[int]:
    # In place (ids is always a fresh list from _encode_batch): list concatenation would copy
    # every document twice, ~10% of prepare's time per token on the tiktoken backend.
    if self.bos_id is not None:
      ids.insert(0, self.bos_id)
    ids.append(self.eos_id)
    return ids

  def _encode_batch(self, texts: list[str]) -> list[list[int]]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, "
      f"eos_id={self.eos_id}, bos_id={self.bos_id}, pad_id={self.pad_id})"
    )


def document_start(tokenizer: Tokenizer) -> list[int]:
  """`[bos]` where the tokenizer has one, else `[]`: how training documents begin
  (`Tokenizer.encode_document` is `[bos] + encode(text) + [eos]`)."""
  return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def prefix_token(tokenizer: Tokenizer) -> int:
  """The token a document is predicted from: BOS if the tokenizer has one, else EOS (which
  precedes every document of a packed training stream)."""
  token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
  if token is None:
    raise ValueError(
      f"tokenizer {tokenizer!r} has neither a BOS nor an EOS id; the first "
      "token of a document needs one to be predicted from"
    )
  return token


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Raises unless every id the tokenizer produces fits a model with vocab_size rows."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
      f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} ids but model.vocab_size="
      f"{vocab_size}: the tokenizer vocab must fit the model's; set "
      f"--config.model.vocab_size={tokenizer.vocab_size} (or more) or pick a smaller tokenizer"
    )
