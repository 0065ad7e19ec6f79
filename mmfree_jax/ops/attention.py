"""The `model.attention_impl` registry (names: `registry.ATTENTION_IMPLS`) for the Transformer++.

`causal_attention` (training windows) dispatches to the Pallas splash attention kernel on TPU
(`kernels.attention_tpu`), `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA's
elsewhere) or the naive T x T softmax (`numerics.attention.dot_product_attention`, the numerics
reference); `masked_attention` is the same under an explicit mask through `jax.nn`. RoPE, the
masks and the KV-cache attention of prefill and decode (any backend, whatever `attention_impl`
says) are `numerics.attention`.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from mmfree_jax import registry
from mmfree_jax.kernels import common as kernel_common
from mmfree_jax.kernels import dispatch
from mmfree_jax.numerics.attention import causal_mask, dot_product_attention, repeat_kv
from mmfree_jax.parallel import context_attention, kernel_sharding


def resolve_attention_impl(
  impl: str, dtype, head_dim: int, *, seq: int | None = None, platform: str | None = None
) -> str:
  """`registry.resolve_attention_impl` for inputs of `dtype` on `platform` ('gpu', 'tpu' or
  'cpu'; None = `kernels.dispatch.current_platform()`, which sees an AOT target's TPU mesh from
  a CPU host). `seq` None: a training window of any length."""
  return registry.resolve_attention_impl(
    impl, jnp.dtype(dtype).name, head_dim, seq=seq, platform=platform or dispatch.current_platform()
  )


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
  split = kernel_sharding.seq_split(q.shape[1])
  if split is not None:  # the window split over the context axis
    active = split[0]
    return context_attention.context_attention(
      _shard_attention(resolved, impl),
      q,
      k,
      v,
      segment_ids,
      mesh=active.mesh,
      context_axis=active.seq_axes,
      batch_axes=active.batch_axes,
      feature_axes=active.feature_axes,
    )
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


def _shard_attention(resolved: str, impl: str):
  """The per-shard attention of `parallel.context_attention`: this shard's queries against the
  gathered window's keys, causal by global position (`q_offset`)."""

  def masked(q, k, v, q_segments, k_segments, q_offset):
    batch, q_len, heads = q.shape[:3]
    q_pos = jnp.broadcast_to(q_offset + jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    k_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (batch, k.shape[1]))
    mask = causal_mask(q_pos, k_pos, None, q_segments, k_segments)
    if resolved == "naive" or (resolved == "splash" and q.dtype == jnp.float64):
      return dot_product_attention(q, repeat_kv(k, heads), repeat_kv(v, heads), mask)
    return _jax_nn_attention(
      q,
      k,
      v,
      mask[:, None],
      False,
      "cudnn" if resolved == "cudnn" else "xla",
      explicit=impl == "cudnn",
    )

  if resolved != "splash":
    return masked
  # The platform is read here, outside the shard_map (inside it no mesh is active).
  if dispatch.kernel_platform_or_interpret("attention_impl=splash") != "tpu":
    warnings.warn(
      "model.attention_impl='splash' is a TPU (Mosaic) kernel; running XLA's "
      "attention on this GPU (use 'auto' or 'cudnn')",
      kernel_common.KernelFallbackWarning,
      stacklevel=4,
    )
    return masked
  return lambda *args: _context_splash(masked, *args)


def _context_splash(masked, q, k, v, q_segments, k_segments, q_offset):
  """Splash per context shard: its mask is static, so shard j runs branch j of a `lax.switch`
  (one kernel per shard position), whose keys are the window's first `(j + 1) * q_len` (later
  ones are all in the future: no compute, no block visits) under a causal mask of offset
  `j * q_len`. Inputs the kernel cannot take: `masked` (XLA's) per shard, with a warning."""
  q_len = q.shape[1]
  fallback_args = lambda q, k, v, s: masked(q, k, v, s, k_segments, q_offset)

  def branch(j):
    def run(q, k, v, q_segments, k_segments):
      kv = slice(0, (j + 1) * q_len)
      fallback = lambda q, k_, v_, s: fallback_args(q, k, v, s)
      return dispatch.attention(
        q,
        k[:, kv],
        v[:, kv],
        q_segments,
        fallback=fallback,
        kv_segment_ids=None if k_segments is None else k_segments[:, kv],
        q_offset=j * q_len,
      )

    return run

  branches = [branch(j) for j in range(k.shape[1] // q_len)]
  return jax.lax.switch(q_offset // q_len, branches, q, k, v, q_segments, k_segments)


def _splash_attention(q, k, v, segment_ids):
  """The splash kernel where it runs (TPU; CPU interpreted, with the dispatcher's warning);
  XLA's attention, with a warning, on a GPU and for inputs the kernel cannot take."""
  fallback = lambda q, k, v, s: causal_attention(
    q, k, v, s, impl="naive" if q.dtype == jnp.float64 else "xla"
  )
  if dispatch.kernel_platform_or_interpret("attention_impl=splash") != "tpu":
    warnings.warn(
      "model.attention_impl='splash' is a TPU (Mosaic) kernel; running XLA's "
      "attention on this GPU (use 'auto' or 'cudnn')",
      kernel_common.KernelFallbackWarning,
      stacklevel=3,
    )
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
      return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn"
      )
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      if explicit:
        raise ValueError(
          f"model.attention_impl='cudnn' cannot run q{q.shape} {q.dtype} here "
          f"({reason}); use 'auto' or 'xla'"
        ) from None
      warnings.warn(f"cuDNN attention unavailable ({reason}); using XLA's", stacklevel=3)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")
