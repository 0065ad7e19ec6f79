"""Causal self-attention on TPUs: JAX's Pallas splash attention kernel (Mosaic), as MaxText runs
it for its Llama-style models.

`jax.experimental.pallas.ops.tpu.splash_attention` is a flash attention (online softmax over
K/V blocks, fp32 statistics, never a `[seq, seq]` array in HBM) that skips the blocks its mask
leaves empty: under a causal mask about half of the grid. Forward, dq and dkv are three kernels
(its custom_vjp). How the Transformer++ window maps onto it:

- causal: a `CausalMask` per head; packed documents: `SegmentIds(q=ids, kv=ids)` (a pair
  attends only within one document; documents are contiguous runs of a window, so causal by
  index inside a document is causal by in-document position);
- grouped-query attention: the MHA kernel takes `kv_heads` dividing `heads` natively (query
  head h reads K/V head `h // (heads / kv_heads)` through its index map), so K/V are neither
  repeated in HBM nor re-read per query head of a group beyond what the grid does. The MQA
  variant is the `kv_heads == 1` special case of the same, so it is not used separately;
- the `1/sqrt(head_dim)` softmax scale multiplies q before the kernel (the kernel has none);
- a batch is `jax.vmap` of the per-example kernel (`[heads, seq, head_dim]` layout);
- a length that is not a multiple of 128 (the lane width; splash's K/V blocks must be
  multiples of it) is padded at the end: a real query never attends a later (padded) key, so
  the sliced output is exact;
- blocks: the largest of 512 / 256 / 128 dividing the padded length (512 is MaxText's
  default), the same for the forward and both backward kernels.

Inputs it cannot take fall back to the caller's reference with a one-line warning
(`common.KernelFallbackWarning`), or raise a ValueError naming the fix without a fallback:
dtypes other than fp32/bf16 (compiling for v5e, Mosaic rejects fp16 loads: "Invalid vector
type for load"; float64 would be computed with the kernel's fp32 statistics) and mismatched
shapes. Every head_dim
from 1 to 256 compiles for v5e (libtpu 0.0.42.1), so there is no head_dim check.

Shapes (the `ops.attention` layout): q `[batch, seq, heads, head_dim]`, k, v `[batch, seq,
kv_heads, head_dim]` (one dtype), segment_ids `[batch, seq]` int or None; returns `[batch,
seq, heads, head_dim]` in q's dtype. Reference: `numerics.attention.dot_product_attention` under
`numerics.attention.causal_mask` (tests/test_attention_tpu.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from mmfree_jax.kernels import common

LANES = 128  # splash's K/V blocks are multiples of the lane width
MAX_BLOCK = 512
SPLASH_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Name prefixes of the three kernels' Mosaic custom calls (visible in the compiled HLO).
KERNEL_NAMES = ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")


def block_size(seq: int) -> int:
  """The q/kv block for a (padded) length: the largest of 512, 256, 128 dividing it."""
  return common.largest_pow2_divisor(common.round_up(seq, LANES), MAX_BLOCK)


def unsupported(q, k, v, segment_ids=None, q_offset: int = 0) -> str | None:
  """A reason string when the kernel cannot take these inputs, else None. With `q_offset`
  (a chunk of queries against the keys of the window up to its end) k, v hold `q_offset +
  seq` positions."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    return (
      f"expects q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, "
      f"head_dim] of one shape; got q{q.shape}, k{k.shape}, v{v.shape}"
    )
  batch, seq, heads, head_dim = q.shape
  if k.shape[:2] != (batch, q_offset + seq) or k.shape[3] != head_dim or heads % k.shape[2]:
    return (
      f"k/v {k.shape} do not match q {q.shape} at offset {q_offset} (same batch and "
      "head_dim, q_offset + seq keys, kv_heads dividing heads)"
    )
  if segment_ids is not None and segment_ids.shape != (batch, seq):
    return f"segment_ids must be [batch, seq] = {(batch, seq)}; got {segment_ids.shape}"
  dtypes = {jnp.dtype(t.dtype) for t in (q, k, v)}
  if len(dtypes) != 1:
    return f"mixed input dtypes {sorted(str(d) for d in dtypes)} (cast them to one dtype)"
  if jnp.dtype(q.dtype) not in SPLASH_DTYPES:
    return f"dtype {q.dtype} is not supported (splash attention compiles for float32 and bfloat16)"
  return None


def _kernel(heads: int, q_len: int, kv_len: int, offset: int, block: int, interpret: bool | str):
  """The per-example splash kernel for `heads` query heads, `q_len` queries starting at key
  position `offset` against `kv_len` keys. Built at each trace: it holds jax arrays (a cached
  one would leak tracers across traces); the numpy block mask behind them is cached by splash
  itself (`process_mask`)."""
  mask = splash.MultiHeadMask([splash.CausalMask((q_len, kv_len), offset=offset)] * heads)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  interpret_arg = pltpu.InterpretParams() if interpret == "tpu" else bool(interpret)
  return splash.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret_arg
  )


def _splash(q, k, v, segment_ids, interpret, block, kv_segment_ids=None, q_offset=0):
  """The kernel on one shard, `[batch, seq, heads, head_dim]` layout in and out."""
  _, seq, heads, head_dim = q.shape
  kv_len = k.shape[1]
  block = block or block_size(seq)
  q_pad, kv_pad = common.round_up(seq, block), common.round_up(kv_len, block)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  q = (q.astype(acc) * (1.0 / np.sqrt(head_dim))).astype(q.dtype)  # one rounding in bf16
  to_kernel = lambda t, padded: jnp.pad(
    jnp.swapaxes(t, 1, 2),  # [batch, heads, padded, head_dim]
    ((0, 0), (0, 0), (0, padded - t.shape[1]), (0, 0)),
  )
  q, k, v = to_kernel(q, q_pad), to_kernel(k, kv_pad), to_kernel(v, kv_pad)
  kernel_for = lambda interpret_arg: _kernel(heads, q_pad, kv_pad, q_offset, block, interpret_arg)
  if segment_ids is None:
    call = lambda interpret_arg: jax.vmap(kernel_for(interpret_arg))(q, k, v)
  else:
    # pads get their own id (-1): a padded query attends itself and other pads, never a token
    pad_ids = lambda ids, padded: jnp.pad(
      ids.astype(jnp.int32), ((0, 0), (0, padded - ids.shape[1])), constant_values=-1
    )
    q_ids = pad_ids(segment_ids, q_pad)
    kv_ids = pad_ids(segment_ids if kv_segment_ids is None else kv_segment_ids, kv_pad)
    call = lambda interpret_arg: jax.vmap(
      lambda q, k, v, qi, ki: kernel_for(interpret_arg)(q, k, v, splash.SegmentIds(qi, ki))
    )(q, k, v, q_ids, kv_ids)
  out = common.run_kernel(call, compiled_on=("tpu",), interpret=interpret)
  return jnp.swapaxes(out[:, :, :seq], 1, 2)


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  interpret: bool | str | None = None,
  block: int | None = None,
  fallback: Callable | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_offset: int = 0,
) -> jax.Array:
  """Causal (segment-masked) softmax attention with the splash kernel; see the module docstring.

  Args:
    q: `[batch, seq, heads, head_dim]` fp32 or bf16.
    k, v: `[batch, seq, kv_heads, head_dim]`, q's dtype, kv_heads dividing heads.
    segment_ids: `[batch, seq]` int document ids of packed windows, or None.
    interpret: None (the compiled kernel when the program is lowered for TPU, also AOT from a
      CPU host; Pallas' interpreter elsewhere), False, True (the generic interpreter) or
      "tpu" (`pltpu.InterpretParams()`).
    block: the q/kv block, a multiple of 128 (the length is padded to a multiple of it);
      None = `block_size(seq)`.
    fallback: `fallback(q, k, v, segment_ids)` run (after a one-line warning) for inputs the
      kernel cannot take; None raises a ValueError naming why.
    kv_segment_ids, q_offset: a chunk of queries (context parallelism): q holds the window's
      positions `[q_offset, q_offset + seq)`, k and v (and `kv_segment_ids`, `[batch,
      q_offset + seq]`) its positions `[0, q_offset + seq)`; the causal mask is by position
      (splash's `CausalMask` offset), static per trace.
  Returns:
    `[batch, seq, heads, head_dim]` in q's dtype.
  """
  if block is not None and (block < LANES or block % LANES):
    raise ValueError(f"splash attention block={block} must be a positive multiple of {LANES}")
  reason = unsupported(q, k, v, segment_ids, q_offset)
  if reason is not None:
    return common.fall_back("splash attention", reason, fallback, q, k, v, segment_ids)
  return _splash(q, k, v, segment_ids, interpret, block, kv_segment_ids, q_offset)
