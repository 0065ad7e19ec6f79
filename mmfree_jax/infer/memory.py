"""Generation's memory estimate and the check that refuses a generation before it allocates.

The KV cache and the per-layer weight copy are counted from the model's own shapes
(`mmfree_jax.accounting`: the cache `init_state` makes, the projection kernels), so grouped
K/V heads (`num_kv_heads < num_heads`) count as the model holds them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from mmfree_jax import accounting
from mmfree_jax.infer.plan import copies_layers, plan_for


def generation_memory_bytes(
  model_cfg, batch: int, prompt_len: int, max_new_tokens: int, *, frozen_copy: bool = False
) -> dict:
  """Rough device bytes of a `generate` call by part (the big allocations only).

  prefill_logits `[batch, prompt_len, vocab]` fp32; Transformer++: its KV cache of prompt +
  new positions (as `init_state` makes it: K/V heads, not query heads) and the prefill's
  `[batch, heads, prompt_len, prompt_len]` fp32 attention scores (the XLA / naive attention
  materializes them); output ids `[batch, max_new_tokens]` int32; decode_weights (with
  `frozen_copy`, a latent model): the per-layer copy of the block and head weights the decode
  plan makes (`plan.copies_layers`; compute dtype, int8 codes for a MatMul-free
  `bitlinear_impl=int8`; none where the plan keeps the layers stacked).
  """
  acc = 4
  total_len = prompt_len + max_new_tokens
  parts = {
    "prefill_logits": batch * prompt_len * model_cfg.vocab_size * acc,
    "prefill_activations": 8 * batch * prompt_len * model_cfg.d_model * acc,
    "output_ids": batch * max_new_tokens * 4,
  }
  if frozen_copy and copies_layers(plan_for(model_cfg, purpose="decode")):
    int8 = model_cfg.kind == "mmfree" and model_cfg.bitlinear_impl == "int8"
    parts["decode_weights"] = accounting.param_bytes(
      model_cfg, jnp.int8 if int8 else model_cfg.compute_dtype, matmul_only=True
    )
  if model_cfg.kind == "transformer":
    parts["kv_cache"] = accounting.kv_cache_bytes(model_cfg, batch, total_len)
    parts["prefill_attention_scores"] = batch * model_cfg.num_heads * prompt_len**2 * acc
  return parts


def available_memory_bytes() -> int | None:
  """Free memory of the first local device (its allocator's limit minus use), or the host's
  available RAM on CPU; None when unknown."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # not implemented on some backends
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def check_generation_fits(
  model_cfg, batch: int, prompt_len: int, max_new_tokens: int, *, frozen_copy: bool = False
) -> None:
  """Raises ValueError, before anything is allocated, when a generation cannot fit memory."""
  if prompt_len + max_new_tokens >= 2**31 - 1:
    raise ValueError(
      f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) positions do "
      "not fit int32 positions; shorten them"
    )
  parts = generation_memory_bytes(
    model_cfg, batch, prompt_len, max_new_tokens, frozen_copy=frozen_copy
  )
  need, free = sum(parts.values()), available_memory_bytes()
  if free is not None and need > free:
    detail = ", ".join(
      f"{k} {v / 2**30:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v
    )
    raise ValueError(
      f"generating {max_new_tokens} tokens after a {prompt_len}-token prompt (batch {batch}) "
      f"needs about {need / 2**30:.1f} GiB ({detail} GiB) but {free / 2**30:.1f} GiB are "
      f"free on {jax.local_devices()[0].platform}; shorten the prompt or max_new_tokens"
    )
