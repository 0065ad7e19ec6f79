"""Small training configs shared by the end-to-end tests."""

from mmfree_jax.config import base_config


def small_config(**overrides):
  """A very small model on the built-in corpus with the byte tokenizer (no BPE training).

  overrides: dotted keys, e.g. `{"train.steps": 8, "model.kind": "transformer"}`.
  """
  cfg = base_config()
  cfg.model.update(vocab_size=320, d_model=64, num_layers=2, num_heads=4)
  cfg.data.update(source="builtin_kjv", tokenizer="byte", seq_len=32)
  cfg.train.update(
    steps=8,
    global_batch=8,
    log_every=1,
    eval_every=1000,
    eval_batches=1,
    checkpoint_every=1000,
    sample_tokens=0,
  )
  cfg.optim.update(lr=3e-3, warmup_steps=1)
  cfg.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
  cfg.lock()
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg
