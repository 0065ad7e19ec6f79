"""Spec strings (`data.tokenizer`) -> tokenizers: `load_tokenizer`, `tokenizer_file`.

An `hf:`/`spm:` file may be local or in a bucket (`gs://`, `s3://`): its bytes are read through
`mmfree_jax.paths` and handed to the library from memory (`tokenizers.from_buffer`,
sentencepiece's `model_proto`), so no local copy is made.
"""

from __future__ import annotations

from typing import Callable, Iterable

from mmfree_jax import paths
from mmfree_jax.data.tokenizer.base import Tokenizer
from mmfree_jax.data.tokenizer.bpe import load_bpe
from mmfree_jax.data.tokenizer.byte import ByteTokenizer
from mmfree_jax.data.tokenizer.hf import load_hf_file
from mmfree_jax.data.tokenizer.spm import (
  MISTRAL_ALIAS,
  SentencePieceTokenizer,
  mistral_tokenizer_path,
)

SPEC_FORMS = (
  "byte",
  "bpe:<vocab_size>",
  "hf:<path/to/tokenizer.json>",
  "spm:<path/to/model>",
  "spm:mistral",
)


def _resolve_file(path: str, default_name: str, kind: str, spec: str) -> str:
  """The file `path` names (local, `gs://`, `s3://`), or `default_name` in the folder it names."""
  path = paths.expanduser(path)
  if paths.isdir(path):
    path = paths.join(path, default_name)
  if not paths.isfile(path):
    raise ValueError(
      f"{kind} file {path!r} (from data.tokenizer={spec!r}) does not exist; "
      f"set --config.data.tokenizer to an existing file (or a folder holding "
      f"{default_name})"
    )
  return path


def tokenizer_file(spec: str) -> str | None:
  """The file an `hf:`/`spm:` spec loads (a folder resolved to the file in it); None for
  `byte` and `bpe:` (whose file is trained: `bpe_cache_path`)."""
  kind, _, arg = spec.partition(":")
  if spec == MISTRAL_ALIAS:
    return mistral_tokenizer_path()
  if kind == "hf" and arg:
    return _resolve_file(arg, "tokenizer.json", "tokenizer", spec)
  if kind == "spm" and arg:
    return _resolve_file(arg, "tokenizer.model", "sentencepiece model", spec)
  return None


def load_tokenizer(
  spec: str,
  *,
  corpus_texts: Callable[[], Iterable[str]] | None = None,
  cache_dir: str,
  corpus_id: str | None = None,
) -> Tokenizer:
  """Makes the tokenizer a spec string names (forms: `mmfree_jax.data.tokenizer`).

  A file that is not a tokenizer of its kind (garbage, truncated, too deeply nested) is a
  one-line ValueError naming it.

  Args:
    spec: `byte`, `bpe:<vocab_size>`, `hf:<path>` or `spm:<path>`.
    corpus_texts: a callable returning a fresh iterable of documents; needed by `bpe:` only.
    cache_dir: folder for trained tokenizers (`<cache_dir>/tokenizers/`).
    corpus_id: a string identifying the corpus (e.g. its files' paths, sizes, mtimes); keys
      the BPE cache. None = a hash of all the texts (reads the corpus once more).
  """
  if not isinstance(spec, str):
    raise ValueError(f"data.tokenizer must be a string, one of {SPEC_FORMS}; got {spec!r}")
  kind, _, arg = spec.partition(":")
  if spec == "byte":
    return ByteTokenizer()
  if kind == "bpe" and arg:
    try:
      vocab_size = int(arg)
    except ValueError:
      raise ValueError(
        f"data.tokenizer={spec!r}: the vocab size must be an int, e.g. bpe:4096"
      ) from None
    return load_bpe(vocab_size, spec, corpus_texts, corpus_id, cache_dir)
  if kind == "hf" and arg:
    return load_hf_file(_resolve_file(arg, "tokenizer.json", "tokenizer", spec), spec)
  if spec == MISTRAL_ALIAS:
    return SentencePieceTokenizer(mistral_tokenizer_path(), spec)
  if kind == "spm" and arg:
    return SentencePieceTokenizer(
      _resolve_file(arg, "tokenizer.model", "sentencepiece model", spec), spec
    )
  raise ValueError(f"unknown data.tokenizer spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
