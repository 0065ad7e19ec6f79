"""Tokenizers behind one small interface: byte, byte-level BPE (trained and cached), HF, spm.

Spec strings (`data.tokenizer`):
  `byte`            256 byte ids, then `<|endoftext|>` (eos, 256) and `<|pad|>` (pad, 257).
  `bpe:<vocab>`     byte-level BPE trained with `tokenizers` on the corpus, cached as JSON.
  `hf:<path>`       a `tokenizers` JSON file (`tokenizer.json`, or a folder holding one).
  `spm:<path>`      a sentencepiece model (`tokenizer.model`, or a folder holding one).
  `spm:mistral`     the released models' tokenizer, from the `mistral_common` package.

  base.py      the `Tokenizer` interface (`encode`, `encode_document`, ...), `check_vocab`
  byte.py      `ByteTokenizer`
  bpe.py       BPE training and its cache (`train_bpe`, `bpe_cache_path`)
  hf.py        `HFTokenizer` (`tokenizers` files; encodes with tiktoken where exact)
  fast_bpe.py  when tiktoken gives the same ids (`tiktoken_ranks`) and its encoder
  spm.py       `SentencePieceTokenizer`, the Mistral model's path
  specs.py     `load_tokenizer(spec)`, `tokenizer_file(spec)`

Each module imports only the standard library at the top: `tokenizers`, `tiktoken` and
`sentencepiece` load with the first tokenizer that needs them (grain workers and generation
import this package for `document_start` alone).
"""

from mmfree_jax.data.tokenizer.base import (
  EOS_TOKEN,
  PAD_TOKEN,
  Tokenizer,
  check_vocab,
  document_start,
  prefix_token,
)
from mmfree_jax.data.tokenizer.bpe import BPE_FORMAT, BPE_TRAIN_MAX_CHARS, bpe_cache_path, train_bpe
from mmfree_jax.data.tokenizer.byte import ByteTokenizer
from mmfree_jax.data.tokenizer.fast_bpe import (
  BYTELEVEL_PATTERN,
  NotConvertible,
  bytelevel_alphabet,
  bytelevel_bytes,
  tiktoken_core,
  tiktoken_ranks,
)
from mmfree_jax.data.tokenizer.hf import BACKEND_ENV, BACKENDS, HFTokenizer, load_hf_file
from mmfree_jax.data.tokenizer.specs import SPEC_FORMS, load_tokenizer, tokenizer_file
from mmfree_jax.data.tokenizer.spm import (
  MISTRAL_ALIAS,
  SentencePieceTokenizer,
  mistral_tokenizer_path,
)

__all__ = [
  "BACKENDS",
  "BACKEND_ENV",
  "BPE_FORMAT",
  "BPE_TRAIN_MAX_CHARS",
  "BYTELEVEL_PATTERN",
  "ByteTokenizer",
  "EOS_TOKEN",
  "HFTokenizer",
  "MISTRAL_ALIAS",
  "NotConvertible",
  "PAD_TOKEN",
  "SPEC_FORMS",
  "SentencePieceTokenizer",
  "Tokenizer",
  "bpe_cache_path",
  "bytelevel_alphabet",
  "bytelevel_bytes",
  "check_vocab",
  "document_start",
  "load_hf_file",
  "load_tokenizer",
  "mistral_tokenizer_path",
  "prefix_token",
  "tiktoken_core",
  "tiktoken_ranks",
  "tokenizer_file",
  "train_bpe",
]
