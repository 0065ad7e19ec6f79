"""The paper's sizes as configs (`configs/mmfree_370m.py` ... read them)."""

from __future__ import annotations

import ml_collections

from mmfree_jax.config.schema import base_config

# The paper's three MatMul-free sizes (d_model, num_layers); I is derived (hidden_ratio 4).
PAPER_SIZES = {"370m": (1024, 24), "1.3b": (2048, 24), "2.7b": (2560, 32)}
# Our optimizer values for the paper sizes. The released code has no recipe; the paper says only
# "larger learning rate than for Transformers, cosine schedule". Tokens: 15B (370M), 100B (others).
PAPER_RECIPE = {
  #        mmfree lr, transformer lr, tokens
  "370m": (1.5e-3, 6e-4, 15e9),
  "1.3b": (1.0e-3, 4e-4, 100e9),
  "2.7b": (8.0e-4, 3e-4, 100e9),
}


def paper_config(size: str, kind: str = "mmfree") -> ml_collections.ConfigDict:
  """A released size (`370m`, `1.3b`, `2.7b`) as MatMul-free or Transformer++ (same d/L).

  Data defaults to the Mistral-7B-v0.1 sentencepiece tokenizer (vocab 32000) on jsonl files
  given by `--config.data.paths`; sequence length 2048, 0.5M tokens per step.
  """
  if size not in PAPER_SIZES:
    raise ValueError(f"unknown paper size {size!r}; choose one of {sorted(PAPER_SIZES)}")
  d_model, num_layers = PAPER_SIZES[size]
  mmfree_lr, transformer_lr, tokens = PAPER_RECIPE[size]
  cfg = base_config()
  cfg.model.update(
    kind=kind,
    vocab_size=32000,
    d_model=d_model,
    num_layers=num_layers,
    num_heads=d_model // 128,
    dtype="bfloat16",
    remat="dots_no_batch",
  )
  cfg.data.update(source="jsonl", tokenizer="spm:mistral", seq_len=2048, val_fraction=0.001)
  global_batch = 256  # x 2048 tokens = 0.5M tokens per step
  cfg.train.update(
    global_batch=global_batch,
    steps=int(tokens // (global_batch * cfg.data.seq_len)),
    log_every=50,
    eval_every=2000,
    checkpoint_every=2000,
    eval_batches=20,
  )
  cfg.optim.update(
    lr=mmfree_lr if kind == "mmfree" else transformer_lr,
    schedule="cosine",
    warmup_steps=1000,
    end_lr_ratio=0.1,
    weight_decay=0.1,
    b1=0.9,
    b2=0.95,
    clip_norm=1.0,
  )
  cfg.mesh.shape = {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}
  return cfg
