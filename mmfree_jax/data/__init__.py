"""Data pipeline: tokenizers, sources, tokenize-once caches, packing, grain iterators.

  tokenizer/    `load_tokenizer(spec)`: byte | bpe:<vocab> | hf:<json> | spm:<model>
  sources.py    `data.source`/`data.paths` -> document texts (kjv chapters, paragraphs, jsonl)
  corpus.py     tokenize once into a cached, memory-mapped `.npy` (+ document table)
  split.py      train/validation split by document from `data.seed`, `data.val_fraction`
  sequence_packing.py  concatenate-then-split windows `[seq_len+1]` with segment ids
  pipeline.py   `train_iterator` (grain, per-process rows of a process-count-independent
                global batch) and `validation_batches`
  formats.py    corpus files for prepare: Parquet, JSONL/text (.gz, .zst), save_to_disk dirs
  prepare.py    `python -m mmfree_jax.data.prepare`: tokenize once into ArrayRecord shards
  cutting.py    prepare's token stream -> shards of whole documents
  shards.py     shard files: names, writer, commit, resume, verification (sha256, counts)
  untrusted.py  paths read from files confined to their folder; JSON read without a crash
  prepared.py   `data.source=array_record`: prepared folders as windows, weighted mixtures

Typical use:
  tok = tokenizer_from_config(cfg.data, cache_dir=d)
  check_vocab(tok, cfg.model.vocab_size)
  it = train_iterator(cfg.data, tok, global_batch=16, cache_dir=d)
  batch = next(it)  # {"tokens": int32 [16, seq_len+1], "segment_ids": int32 [16, seq_len+1]}
"""

from mmfree_jax import lazy_exports

# Imported on first use, so that a module needing one light piece (e.g. the tokenizer's
# `document_start`, for generation) does not pay for grain and its readers.
_EXPORTS = {
  name: f"mmfree_jax.data.{module}"
  for module, names in {
    "pipeline": (
      "local_batch_size",
      "split_windows",
      "tokenizer_from_config",
      "train_iterator",
      "validation_batches",
    ),
    "sequence_packing": ("PackedWindows", "segment_ids_for"),
    "sources": ("SOURCES", "source_from_config"),
    "tokenizer": ("SPEC_FORMS", "Tokenizer", "check_vocab", "load_tokenizer"),
  }.items()
  for name in names
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
