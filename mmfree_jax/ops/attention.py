"""Pure attention numerics for the Transformer++ baseline: RoPE, masks, softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.ops.dtypes import acc_dtype


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding, LLaMA's rotate-half layout.

  Args:
    x: `[batch, seq, heads, head_dim]`, head_dim even.
    positions: `[batch, seq]` int.
  Returns:
    x rotated, same shape and dtype.
  """
  half = x.shape[-1] // 2
  acc = acc_dtype(x.dtype)  # fp32 angles (f64 under a float64 config)
  inv_freq = theta ** (-jnp.arange(half, dtype=acc) * 2.0 / x.shape[-1])
  angles = positions.astype(acc)[..., None] * inv_freq  # [B, T, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  xf = x.astype(acc)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_mask(query_pos: jax.Array, key_pos: jax.Array, num_valid_keys=None,
                query_segments=None, key_segments=None) -> jax.Array:
  """Boolean `[batch, q_len, k_len]` mask: causal, optional key validity and same-segment.

  Args:
    query_pos: `[batch, q_len]` absolute positions of the queries.
    key_pos: `[batch, k_len]` absolute positions of the keys.
    num_valid_keys: scalar; keys at position >= it are empty cache slots.
    query_segments, key_segments: `[batch, q_len]`, `[batch, k_len]` document ids or None.
  """
  mask = key_pos[:, None, :] <= query_pos[:, :, None]
  if num_valid_keys is not None:
    mask &= (key_pos < num_valid_keys)[:, None, :]
  if query_segments is not None:
    mask &= query_segments[:, :, None] == key_segments[:, None, :]
  return mask


def dot_product_attention(q, k, v, mask) -> jax.Array:
  """Softmax attention with fp32 logits.

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, k_len, heads, head_dim]`.
    mask: `[batch, q_len, k_len]` bool (True = attend).
  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype.
  """
  acc = acc_dtype(q.dtype)
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=acc)
  logits = logits / jnp.sqrt(jnp.asarray(q.shape[-1], acc))
  logits = jnp.where(mask[:, None], logits, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)
