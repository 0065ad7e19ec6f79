"""Model FLOPs per token, for tokens/s → MFU (dense-equivalent, PaLM's convention)."""

from __future__ import annotations

from mmfree_jax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (embedding lookup excluded)."""
  d, inter, L = cfg.d_model, cfg.intermediate_size, cfg.num_layers
  mixer = 4 * d * d  # MLGRU i/f/g/o or attention q/k/v/o
  channel = 3 * d * inter  # fused gate+up (2I) and down
  return L * (mixer + channel) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """`6 N` for the matmuls (forward + backward), plus causal attention for Transformer++.

  Attention: `12 L d T / 2` per token (QK^T and AV, forward and backward, causal half). The
  MLGRU's element-wise recurrence is O(d) per token and not counted. Ternary matmuls are
  counted as dense matmuls (dense-equivalent MFU), which is what the hardware executes.
  """
  flops = 6.0 * matmul_params(cfg)
  if cfg.kind == "transformer":
    flops += 6.0 * cfg.num_layers * cfg.d_model * seq_len
  return flops
