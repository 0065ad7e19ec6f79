"""Pure attention numerics for the Transformer++ baseline: RoPE, masks, softmax attention.

The layers call `causal_attention` (training windows), which dispatches on
`model.attention_impl` to the Pallas splash attention kernel on TPU (`kernels.attention_tpu`)
or `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA's elsewhere), and
`kv_cache_attention` (prefill and decode against a KV cache: two einsums over the cache as
stored, any backend, whatever `attention_impl` says); `dot_product_attention` is the naive
T x T softmax kept as the numerics reference, `masked_attention` the same under an explicit
mask through `jax.nn`.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from mmfree_jax.kernels import common as kernel_common
from mmfree_jax.kernels import dispatch
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


# `model.attention_impl`: how the Transformer++ runs softmax attention.
#   auto    on a TPU the splash kernel for training windows of fp32/bf16 and at least
#           SPLASH_MIN_SEQ tokens; on a GPU cuDNN flash attention when it takes the inputs
#           (bf16/fp16, head_dim a multiple of 8 up to 128); XLA's attention
#           (`jax.nn.dot_product_attention`) elsewhere; the naive path for float64 (jax.nn's
#           softmax runs in fp32)
#   xla     `jax.nn.dot_product_attention(implementation='xla')`
#   cudnn   `jax.nn.dot_product_attention(implementation='cudnn')` (GPU only)
#   splash  the Pallas splash attention kernel (`kernels.attention_tpu`; TPU: compiled, CPU:
#           interpreted, for tests; GPU: XLA's with a warning). Training windows only: the
#           KV-cache path runs XLA's
#   naive   `dot_product_attention` below: the numerics reference of the tests
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "naive")
# One 128-token block: a shorter window has no masked block to skip, and padding it to a
# block would mostly compute padding, so `auto` leaves it to XLA.
SPLASH_MIN_SEQ = 128


def resolve_attention_impl(impl: str, dtype, head_dim: int, *, seq: int | None = None,
                           platform: str | None = None) -> str:
  """The implementation `impl` names for these inputs (see ATTENTION_IMPLS) on `platform`
  ('gpu', 'tpu' or 'cpu'; None = `kernels.dispatch.current_platform()`, which sees an AOT
  target's TPU mesh from a CPU host). `seq` None: a training window of any length."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown model.attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  platform = platform or dispatch.current_platform()
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    return "naive"
  if (platform == "tpu" and dtype in (jnp.float32, jnp.bfloat16)
      and (seq is None or seq >= SPLASH_MIN_SEQ)):
    return "splash"
  if (platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return "xla"


def causal_attention(q, k, v, segment_ids=None, *, impl: str = "auto") -> jax.Array:
  """Causal self-attention over one window, inside each document when segment ids are given.

  Args:
    q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]` (kv_heads
      dividing heads: grouped-query attention), q's dtype.
    segment_ids: `[batch, seq]` document ids of a packed window (contiguous runs) or None.
    impl: a `model.attention_impl` name.
  Returns:
    `[batch, seq, heads, head_dim]` in q's dtype.
  """
  resolved = resolve_attention_impl(impl, q.dtype, q.shape[-1], seq=q.shape[1])
  if resolved == "naive":
    batch, seq = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    mask = causal_mask(pos, pos, None, segment_ids, segment_ids)
    return dot_product_attention(q, repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2]), mask)
  if resolved == "splash":
    return _splash_attention(q, k, v, segment_ids)
  # Causal by index within a window equals causal by in-document position (documents are
  # contiguous runs and the segment mask removes every cross-document pair).
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
  return _jax_nn_attention(q, k, v, mask, True, resolved, explicit=impl == "cudnn")


def _splash_attention(q, k, v, segment_ids):
  """The splash kernel where it runs (TPU; CPU interpreted, with the dispatcher's warning);
  XLA's attention, with a warning, on a GPU and for inputs the kernel cannot take."""
  fallback = lambda q, k, v, s: causal_attention(
      q, k, v, s, impl="naive" if q.dtype == jnp.float64 else "xla")
  if dispatch.kernel_platform_or_interpret("attention_impl=splash") != "tpu":
    warnings.warn("model.attention_impl='splash' is a TPU (Mosaic) kernel; running XLA's "
                  "attention on this GPU (use 'auto' or 'cudnn')",
                  kernel_common.KernelFallbackWarning, stacklevel=3)
    return fallback(q, k, v, segment_ids)
  return dispatch.attention(q, k, v, segment_ids, fallback=fallback)


def masked_attention(q, k, v, mask, *, impl: str = "auto") -> jax.Array:
  """Attention under an explicit `[batch, q_len, k_len]` bool mask; q
  `[batch, q_len, heads, head_dim]`, k, v `[batch, k_len, kv_heads, head_dim]`.

  cuDNN's causal mask is aligned for q_len == k_len only and decode is bandwidth-bound, so
  'cudnn' runs XLA's implementation here.
  """
  resolved = resolve_attention_impl(impl, q.dtype, q.shape[-1])
  if resolved == "naive":
    return dot_product_attention(q, repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2]), mask)
  return _jax_nn_attention(q, k, v, mask[:, None], False, "xla", explicit=False)


def _jax_nn_attention(q, k, v, mask, is_causal: bool, impl: str, *, explicit: bool):
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                          implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      if explicit:
        raise ValueError(f"model.attention_impl='cudnn' cannot run q{q.shape} {q.dtype} here "
                         f"({reason}); use 'auto' or 'xla'") from None
      warnings.warn(f"cuDNN attention unavailable ({reason}); using XLA's", stacklevel=3)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation="xla")


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
  logits = jnp.einsum(f"{r}md,{r}ds->{r}ms", qg, k_cache.astype(q.dtype),
                      preferred_element_type=acc)
  logits = logits / jnp.sqrt(jnp.asarray(head_dim, acc))
  key_pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
  mask = causal_mask(q_positions, key_pos, num_valid_keys)  # [b, t, s]
  mask = jnp.broadcast_to(mask[:, None, None], (batch, kv_heads, group, q_len, max_len))
  logits = jnp.where(mask.reshape(logits.shape), logits, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum(f"{r}ms,{r}ds->{r}md", probs, v_cache).astype(q.dtype)  # [rows, g * t, d]
  out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, q_len, heads, head_dim)
