"""The default: a tiny MatMul-free LM on the built-in KJV corpus, trains on one CPU in minutes.

python train.py --config=configs/tiny.py --workdir=/tmp/tiny
Variants: --config=configs/tiny.py:transformer gives the Transformer++ of the same d/L.
"""

from mmfree_jax.config import base_config


def get_config(kind: str = "mmfree"):
  cfg = base_config()
  cfg.model.update(
    kind=kind or "mmfree",
    vocab_size=4096,
    d_model=256,
    num_layers=4,
    num_heads=4,
    scan_type="sequential",
    dtype="auto",
    bitlinear_impl="lean",
  )
  cfg.data.update(source="builtin_kjv", tokenizer="bpe:4096", seq_len=128)
  cfg.train.update(
    steps=300,
    global_batch=16,
    log_every=10,
    eval_every=100,
    eval_batches=4,
    checkpoint_every=100,
    sample_tokens=48,
  )
  # 3e-3 is the better of {1e-3, 3e-3} for both kinds at this size (experiments/scaling.py).
  cfg.optim.update(lr=3e-3, warmup_steps=30)
  cfg.lock()
  return cfg
