"""Softmax attention in pure JAX for the Transformer++ baseline: RoPE, masks, the naive T x T
attention (the numerics reference of `ops.attention` and of the splash kernel), and attention
against a KV cache (prefill and decode). Logits and softmax run in `acc_dtype` (fp32; f64 under
a float64 config).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.dtypes import acc_dtype


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


def causal_mask(
  query_pos: jax.Array,
  key_pos: jax.Array,
  num_valid_keys=None,
  query_segments=None,
  key_segments=None,
) -> jax.Array:
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


def repeat_kv(t: jax.Array, heads: int) -> jax.Array:
  """`[b, s, kv_heads, d]` -> `[b, s, heads, d]`: K/V head j serves query heads
  `[j * group, (j + 1) * group)` (Llama's `repeat_kv`)."""
  kv_heads = t.shape[2]
  return t if kv_heads == heads else jnp.repeat(t, heads // kv_heads, axis=2)


def kv_cache_attention(q, k_cache, v_cache, q_positions, num_valid_keys) -> jax.Array:
  """Attention of new queries against a heads-major KV cache (prefill and decode steps).

  The cache is read as it is stored, with no transpose, reshape or repeat: query heads are
  grouped under their K/V head (GQA), and in a decode step each matmul is a matrix-vector
  product per K/V head over rows of `max_len` contiguous positions.

  Args:
    q: `[batch, q_len, heads, head_dim]`, RoPE applied.
    k_cache, v_cache: `[batch * kv_heads, head_dim, max_len]`, row `b * kv_heads + j` = batch
      row b, K/V head j (`[batch, kv_heads, ...]` with the two axes fused); `[head_dim,
      max_len]` when there is a single row (`nn.layers.kv_cache_shape`).
    q_positions: `[batch, q_len]` int, absolute positions of the queries.
    num_valid_keys: scalar int; cache slots at positions >= it are empty.
  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype. Query head h attends with K/V head
    `h // (heads / kv_heads)` (Llama's `repeat_kv`); logits and softmax in fp32 (f64 under a
    float64 config).
  """
  batch, q_len, heads, head_dim = q.shape
  max_len = k_cache.shape[-1]
  rows = k_cache.shape[0] if k_cache.ndim == 3 else 1
  kv_heads = rows // batch
  group = heads // kv_heads
  r = "r" if k_cache.ndim == 3 else ""  # the row axis, absent for a single row
  acc = acc_dtype(q.dtype)
  # [b, t, kv, g, d] -> [rows, g * t, d]: the (small) queries move, the cache does not
  qg = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  qg = qg.reshape(k_cache.shape[:-2] + (group * q_len, head_dim))
  logits = jnp.einsum(
    f"{r}md,{r}ds->{r}ms", qg, k_cache.astype(q.dtype), preferred_element_type=acc
  )
  logits = logits / jnp.sqrt(jnp.asarray(head_dim, acc))
  key_pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
  mask = causal_mask(q_positions, key_pos, num_valid_keys)  # [b, t, s]
  mask = jnp.broadcast_to(mask[:, None, None], (batch, kv_heads, group, q_len, max_len))
  logits = jnp.where(mask.reshape(logits.shape), logits, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum(f"{r}ms,{r}ds->{r}md", probs, v_cache).astype(q.dtype)  # [rows, g * t, d]
  out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, q_len, heads, head_dim)
