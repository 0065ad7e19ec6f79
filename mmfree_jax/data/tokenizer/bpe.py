"""`bpe:<vocab>`: a byte-level BPE trained with `tokenizers` on the corpus, cached as JSON."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Callable, Iterable

from mmfree_jax import paths
from mmfree_jax.data.tokenizer.base import EOS_TOKEN, PAD_TOKEN, Tokenizer
from mmfree_jax.data.tokenizer.hf import HFTokenizer, load_hf_file

log = logging.getLogger(__name__)

BPE_FORMAT = "bytelevel-bpe-v1"  # bump when the trainer setup changes (invalidates caches)
BPE_TRAIN_MAX_CHARS = 200_000_000  # BPE learns from at most this much text (the corpus head)


def bpe_cache_path(cache_dir: str, vocab_size: int, corpus_id: str) -> str:
  """Where the BPE of vocab_size trained on the corpus identified by corpus_id is cached."""
  key = hashlib.sha256(
    json.dumps([BPE_FORMAT, BPE_TRAIN_MAX_CHARS, vocab_size, corpus_id]).encode()
  ).hexdigest()[:16]
  return paths.join(cache_dir, "tokenizers", f"bpe{vocab_size}-{key}.json")


def _texts_digest(corpus_texts: Callable[[], Iterable[str]]) -> str:
  digest = hashlib.sha256()
  for text in corpus_texts():
    digest.update(text.encode("utf-8", errors="surrogatepass"))
    digest.update(b"\x00")
  return "texts-" + digest.hexdigest()


def _capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  total = 0
  for text in texts:
    yield text
    total += len(text)
    if total >= max_chars:
      return


def train_bpe(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` with `<|endoftext|>` (id 0) and `<|pad|>` (1)."""
  # `tokenizers` (Rust, ~0.2 s to import) only for bpe:/hf: specs, not in grain workers.
  from tokenizers import Tokenizer as HFTok  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS_TOKEN, PAD_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(_capped(texts, BPE_TRAIN_MAX_CHARS), trainer=trainer)
  return tok


def load_bpe(vocab_size: int, spec: str, corpus_texts, corpus_id, cache_dir) -> Tokenizer:
  min_vocab = 256 + 2
  if vocab_size < min_vocab:
    raise ValueError(
      f"data.tokenizer={spec!r}: a byte-level BPE needs vocab_size >= "
      f"{min_vocab} (256 bytes + eos + pad)"
    )
  if corpus_texts is None:
    raise ValueError(
      f"data.tokenizer={spec!r} trains on the corpus, but no corpus text is "
      "available (data.source=tokens?); use the tokenizer that produced the "
      "ids: --config.data.tokenizer=hf:<tokenizer.json> or spm:<model>"
    )
  path = bpe_cache_path(cache_dir, vocab_size, corpus_id or _texts_digest(corpus_texts))
  if paths.exists(path):
    return load_hf_file(path, spec)
  log.info("training a byte-level BPE with %d ids (once; cached at %s)", vocab_size, path)
  tok = train_bpe(corpus_texts(), vocab_size)
  paths.makedirs(paths.dirname(path))
  # Atomic: concurrent processes may race, each writes the same thing.
  paths.write_atomic(path, tok.to_str(pretty=True))
  return HFTokenizer(tok, spec)
