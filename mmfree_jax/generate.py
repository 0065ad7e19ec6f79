"""Text generation: prefill with the parallel forward, then a jitted `lax.while_loop` of decode
steps carrying the model state (recurrent state for MatMul-free, KV cache for Transformer++).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfree_jax.model import check_token_ids


class SamplingConfig(NamedTuple):
  """`temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable those filters."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None


def sample_from_logits(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Picks one token per row. `logits [batch, vocab]` → `[batch]` int32."""
  logits = logits.astype(jnp.float32)
  if cfg.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / cfg.temperature
  neg = jnp.finfo(jnp.float32).min
  if cfg.top_k > 0:
    kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < cfg.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _generate(graphdef, params, prompt, rng, cfg: SamplingConfig):
  model = nnx.merge(graphdef, params)
  batch, prompt_len = prompt.shape
  state = model.init_state(batch, prompt_len + cfg.max_new_tokens)
  logits, state = model(prompt, state=state)  # prefill: parallel over the prompt
  rng, key = jax.random.split(rng)
  first = sample_from_logits(logits[:, -1], key, cfg)
  out = jnp.zeros((batch, cfg.max_new_tokens), jnp.int32).at[:, 0].set(first)
  eos = -1 if cfg.eos_id is None else cfg.eos_id
  done = first == eos

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < cfg.max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, state, done, rng = carry
    previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [batch, 1]
    logits, state = model(previous, state=state)
    rng, key = jax.random.split(rng)
    token = sample_from_logits(logits[:, -1], key, cfg)
    token = jnp.where(done, eos if eos >= 0 else 0, token)
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
    return i + 1, out, state, done | (token == eos), rng

  n, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, state, done, rng))
  return out, n


def generate(model: nnx.Module, prompt_tokens, cfg: SamplingConfig = SamplingConfig(), *,
             seed: int = 0) -> np.ndarray:
  """Continues each prompt row.

  Args:
    model: a `MatMulFreeLM` or `TransformerLM`.
    prompt_tokens: `[batch, prompt_len]` int ids (rows of equal length, prompt_len >= 1).
    cfg: sampling settings.
  Returns:
    `[batch, n]` int32 new tokens, n <= max_new_tokens (all rows stopped at EOS earlier);
    after a row's EOS, its remaining slots repeat the EOS id.
  """
  prompt = np.asarray(prompt_tokens, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be [batch, prompt_len >= 1] token ids; got {prompt.shape}. "
                     "An empty prompt has no context: pass at least one token (e.g. BOS)")
  if cfg.max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {cfg.max_new_tokens}")
  check_token_ids(prompt, model.cfg.vocab_size)
  graphdef, params = nnx.split(model)
  out, n = _generate(graphdef, params, jnp.asarray(prompt), jax.random.key(seed), cfg)
  return np.asarray(out)[:, :int(n)]
