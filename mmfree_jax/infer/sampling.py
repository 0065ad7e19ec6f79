"""Token sampling for the decode loop: `SamplingConfig` (temperature, top-k, top-p, EOS,
length) and `sample_from_logits`, which picks one token per row from `logits [batch, vocab]`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.dtypes import acc_dtype

# A decode loop longer than this is a mistake (1e9 would pre-allocate 4 GB of output and run for
# days); generate in pieces, carrying the text forward, if you really need more.
MAX_NEW_TOKENS = 1 << 20


class SamplingConfig(NamedTuple):
  """`temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable those filters.

  The loop compiles once per prompt shape, max_new_tokens, top_k and whether greedy / top-p
  are on; temperature, top_p and eos_id values are traced.
  """

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None

  def validate(self) -> "SamplingConfig":
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")
    if self.max_new_tokens > MAX_NEW_TOKENS:
      raise ValueError(
        f"max_new_tokens={self.max_new_tokens} is more than {MAX_NEW_TOKENS} "
        "(the decode loop pre-allocates its output and would run for hours); "
        "ask for fewer tokens"
      )
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(
        f"temperature must be a finite number >= 0 (0 = greedy); got {self.temperature}"
      )
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p}")
    return self


def sample_from_logits(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Picks one token per row. `logits [batch, vocab]` → `[batch]` int32.

  Order: temperature, then top-k, then top-p (nucleus: the smallest set of most likely tokens
  whose probability reaches top_p; the most likely token is always kept).
  """
  return sample_traced(
    logits,
    rng,
    jnp.asarray(cfg.temperature, jnp.float32),
    jnp.asarray(cfg.top_p, jnp.float32),
    **static_sampling(cfg),
  )


def static_sampling(cfg: SamplingConfig) -> dict:
  """The settings that change the traced program (the rest are traced scalars)."""
  return dict(greedy=cfg.temperature <= 0, top_k=cfg.top_k, nucleus=cfg.top_p < 1.0)


def sample_traced(logits, rng, temperature, top_p, *, greedy: bool, top_k: int, nucleus: bool):
  """`sample_from_logits` with temperature and top_p as traced scalars."""
  logits = logits.astype(acc_dtype(logits.dtype))
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature.astype(logits.dtype)
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if nucleus:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before it < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
