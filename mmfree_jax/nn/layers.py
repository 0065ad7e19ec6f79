"""Flax NNX layers. They own parameters (with logical axis names) and call the pure numerics
in `quant`, `recurrence` and `attention`.

MatMul-free: `BitLinear`, `MLGRU` (token mixer), `GLU` (ternary channel mixer).
Transformer++: `Dense`, `Attention` (RoPE, causal, KV cache), `SwiGLU`.
Shared: `RMSNorm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmfree_jax.config import ModelConfig
from mmfree_jax.numerics import attention as attn_ref
from mmfree_jax.numerics import mlgru, quant
from mmfree_jax.ops import attention as attn_lib
from mmfree_jax.ops import bitlinear, recurrence

Initializer = nnx.initializers.Initializer


def normal_init(stddev: float) -> Initializer:
  return nnx.initializers.normal(stddev)


def xavier_uniform_init(gain: float) -> Initializer:
  """torch's `xavier_uniform_(gain=g)`: U(±g·sqrt(6/(fan_in+fan_out)))."""
  return nnx.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def param(rngs: nnx.Rngs | None, init, shape, dtype, axes) -> nnx.Param:
  key = rngs.params() if rngs is not None else jax.random.key(0)
  # eager_sharding=False: params are placed by the trainer (jit out_shardings), so building a
  # model needs no mesh (notebooks, eval_shape, tests).
  return nnx.Param(init(key, shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """RMSNorm with scale `scale [dim]` (init 1). `[..., dim]` → same shape, x's dtype."""

  def __init__(self, dim: int, *, eps: float, axis: str = "embed", param_dtype=jnp.float32):
    self.eps = eps
    self.scale = param(None, nnx.initializers.ones, (dim,), param_dtype, (axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return quant.rms_norm(x, self.scale[...], self.eps)


class BitLinear(nnx.Module):
  """RMSNorm + int8 activations + ternary weights, no bias (docs/architecture.md §1).

  Params: `kernel [in, out]` (latent full precision), `norm_scale [in]`.
  `[..., in]` → `[..., out]` in the compute dtype. `impl` picks the backward:
  'autodiff' (`quant.bitlinear`) or 'lean' (`bitlinear_lean`, same numbers, less memory).
  For inference, `nn.quantized.QuantizedLinear` takes its place, quantized once.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str, str],
    kernel_init: Initializer,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    eps: float = quant.BITLINEAR_NORM_EPS,
    impl: str = "autodiff",
    rngs: nnx.Rngs,
  ):
    bitlinear.get_bitlinear(impl)  # fails early on an unknown impl
    self.eps = eps
    self.dtype = dtype
    self.impl = impl
    self.kernel = param(rngs, kernel_init, (in_features, out_features), param_dtype, axes)
    self.norm_scale = param(None, nnx.initializers.ones, (in_features,), param_dtype, (axes[0],))

  def __call__(self, x: jax.Array) -> jax.Array:
    fn = bitlinear.get_bitlinear(self.impl)
    return fn(x, self.kernel[...], self.norm_scale[...], eps=self.eps, dtype=self.dtype)


class Dense(nnx.Module):
  """Plain linear layer without bias: `kernel [in, out]`. `[..., in]` → `[..., out]`."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str, str],
    kernel_init: Initializer,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (in_features, out_features), param_dtype, axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class MLGRU(nnx.Module):
  """MatMul-free linear GRU token mixer (HGRNBitAttention, 1 head, expand_ratio 1).

  `x [batch, seq, d]` → `y [batch, seq, d]`, final state `[batch, d_in]` fp32.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = d_in = cfg.d_model
    self.cfg = cfg
    proj = dict(
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      rngs=rngs,
      kernel_init=xavier_uniform_init(2**-2.5),
      impl=cfg.bitlinear_impl,
    )
    self.i_proj = BitLinear(d, d_in, axes=("embed", "inner"), **proj)
    self.f_proj = BitLinear(d, d_in, axes=("embed", "inner"), **proj)
    self.g_proj = BitLinear(d, d_in, axes=("embed", "inner"), **proj)
    self.o_proj = BitLinear(d_in, d, axes=("inner", "embed"), **proj)
    self.g_norm = RMSNorm(d_in, eps=cfg.rms_norm_eps, axis="inner", param_dtype=cfg.weight_dtype)

  def __call__(
    self,
    x: jax.Array,
    lower_bound: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    reset: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """
    Args:
      x: `[batch, seq, d]`.
      lower_bound: `[d_in]` forget-gate lower bound of this layer (zeros = none).
      initial_state: `[batch, d_in]` fp32 or None.
      reset: `[batch, seq]` bool, True where a new document starts (forget gate set to 0).
    """
    return mlgru_mix(
      x,
      lower_bound,
      i_proj=self.i_proj,
      f_proj=self.f_proj,
      g_proj=self.g_proj,
      o_proj=self.o_proj,
      g_norm=self.g_norm,
      cfg=self.cfg,
      initial_state=initial_state,
      reset=reset,
    )


def mlgru_mix(
  x: jax.Array,
  lower_bound: jax.Array,
  *,
  i_proj,
  f_proj,
  g_proj,
  o_proj,
  g_norm,
  cfg: ModelConfig,
  initial_state: jax.Array | None = None,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The MLGRU's wiring, on any projections and norm (callables `[..., in]` → `[..., out]`):
  the trained layer's BitLinears, or stored codes (`nn.packed`). Arguments and results as
  `MLGRU.__call__`. One step with a state (`seq` 1, a decode step) skips the scan."""
  f, i = mlgru.gates(f_proj(x), i_proj(x), lower_bound)
  if reset is not None:
    f = jnp.where(reset[..., None], 0.0, f)
  if x.shape[1] == 1 and initial_state is not None:
    h = f * initial_state[:, None] + i
    h_last = h[:, 0]
  else:
    h, h_last = recurrence.linear_recurrence(
      f, i, initial_state, scan_type=cfg.scan_type, chunk_size=cfg.chunk_size
    )
  g = g_norm(g_proj(x).astype(f.dtype))
  o = mlgru.output(g, h)
  return o_proj(o.astype(cfg.compute_dtype)), h_last


class GLU(nnx.Module):
  """Ternary GLU channel mixer (HGRNBitMLP). `[batch, seq, d]` → `[batch, seq, d]`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, inter = cfg.d_model, cfg.intermediate_size
    common = dict(
      dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, impl=cfg.bitlinear_impl
    )
    # gate and up are fused in one BitLinear: one input norm, one weight scale.
    self.gate_proj = BitLinear(
      d, 2 * inter, axes=("embed", "mlp"), kernel_init=normal_init(0.02), **common
    )
    self.down_proj = BitLinear(
      inter,
      d,
      axes=("mlp", "embed"),
      kernel_init=normal_init(0.02 / (2 * cfg.num_layers) ** 0.5),
      **common,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return glu_mix(x, gate_proj=self.gate_proj, down_proj=self.down_proj)


def glu_mix(x: jax.Array, *, gate_proj, down_proj) -> jax.Array:
  """`down(silu(gate) * up)` with gate and up from one fused projection (callables, as in
  `mlgru_mix`). `[batch, seq, d]` → `[batch, seq, d]`."""
  gate, up = jnp.split(gate_proj(x), 2, axis=-1)
  return down_proj(jax.nn.silu(gate) * up)


class SwiGLU(nnx.Module):
  """LLaMA MLP, full precision, fused gate/up. `[batch, seq, d]` → `[batch, seq, d]`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, inter = cfg.d_model, cfg.intermediate_size
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.gate_proj = Dense(
      d, 2 * inter, axes=("embed", "mlp"), kernel_init=normal_init(0.02), **common
    )
    self.down_proj = Dense(
      inter,
      d,
      axes=("mlp", "embed"),
      kernel_init=normal_init(0.02 / (2 * cfg.num_layers) ** 0.5),
      **common,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = jnp.split(self.gate_proj(x), 2, axis=-1)
    return self.down_proj(jax.nn.silu(gate) * up)


def kv_cache_shape(batch: int, max_len: int, kv_heads: int, head_dim: int) -> tuple:
  """The shape of one layer's K cache and of its V cache: `[batch * kv_heads, head_dim,
  max_len]`, row `b * kv_heads + j` = batch row b, K/V head j; `[head_dim, max_len]` when
  there is a single row (batch 1, one K/V head).

  Heads-major with positions on the minor axis, so a decode step streams every cached byte
  once, in long contiguous rows: both attention matmuls (`numerics.attention.kv_cache_attention`)
  then run at close to copy bandwidth on XLA:CPU, ~1.4x faster than with `[max_len,
  head_dim]` rows (measured). The batch and head axes are fused, and a size-1 one dropped,
  because XLA:CPU's dot does so, and any reshape between the in-place update and the dot costs
  a full copy of the layer's cache at every token (seen in the optimized HLO).
  """
  rows = batch * kv_heads
  return ((rows,) if rows > 1 else ()) + (head_dim, max_len)


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE, grouped K/V heads and an optional KV cache.

  `x [batch, seq, d]` → `[batch, seq, d]`; with a cache (`kv_cache_shape`) the new
  keys/values are written at `cache_index` and the updated cache returned. With
  `num_kv_heads < num_heads` query head h attends with K/V head `h // (heads / kv_heads)`
  (Llama's `repeat_kv`); the cache holds only the kv_heads.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.cfg = cfg
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.q_proj = Dense(d, d, axes=("embed", "inner"), kernel_init=normal_init(0.02), **common)
    kv_width = (cfg.num_kv_heads or cfg.num_heads) * cfg.head_dim  # grouped-query K/V
    self.k_proj = Dense(
      d, kv_width, axes=("embed", "inner"), kernel_init=normal_init(0.02), **common
    )
    self.v_proj = Dense(
      d, kv_width, axes=("embed", "inner"), kernel_init=normal_init(0.02), **common
    )
    self.o_proj = Dense(
      d,
      d,
      axes=("inner", "embed"),
      kernel_init=normal_init(0.02 / (2 * cfg.num_layers) ** 0.5),
      **common,
    )

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    *,
    segment_ids=None,
    cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index=None,
  ):
    """
    Args:
      x: `[batch, seq, d]`.
      positions: `[batch, seq]` int, RoPE positions (restart at each document when packed).
      segment_ids: `[batch, seq]` document ids (attention stays inside a document) or None.
      cache: `(k, v)`, each `[batch * kv_heads, head_dim, max_len]` (`kv_cache_shape`), or
        None.
      cache_index: scalar int, number of tokens already in the cache.
    Returns:
      y `[batch, seq, d]`, updated cache (or None).
    """
    batch, seq, _ = x.shape
    heads, head_dim = self.cfg.num_heads, self.cfg.head_dim
    kv_heads = self.cfg.num_kv_heads or heads
    split = lambda t, n: t.reshape(batch, seq, n, head_dim)
    impl = self.cfg.attention_impl
    q = attn_ref.rope(split(self.q_proj(x), heads), positions, self.cfg.rope_theta)
    k = attn_ref.rope(split(self.k_proj(x), kv_heads), positions, self.cfg.rope_theta)
    v = split(self.v_proj(x), kv_heads)
    if cache is None:
      out = attn_lib.causal_attention(q, k, v, segment_ids, impl=impl)
      new_cache = None
    else:
      k_cache, v_cache = cache
      # Only the `seq` new positions move; the update is in place on the loop-carried (or
      # donated) buffer, which the attention then reads as stored.
      to_cache = lambda t: t.transpose(0, 2, 3, 1).reshape(k_cache.shape[:-1] + (seq,))
      k_cache = jax.lax.dynamic_update_slice_in_dim(
        k_cache, to_cache(k).astype(k_cache.dtype), cache_index, axis=-1
      )
      v_cache = jax.lax.dynamic_update_slice_in_dim(
        v_cache, to_cache(v).astype(v_cache.dtype), cache_index, axis=-1
      )
      out = attn_ref.kv_cache_attention(q, k_cache, v_cache, positions, cache_index + seq)
      new_cache = (k_cache, v_cache)
    return self.o_proj(out.reshape(batch, seq, heads * head_dim)), new_cache
