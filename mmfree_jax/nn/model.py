"""Language models: the MatMul-free LM (HGRNBitForCausalLM) and the Transformer++ baseline.

Both: `embed → L stacked blocks (lax.scan over a leading 'layers' axis) → RMSNorm → head`, and
`model(tokens [batch, seq], segment_ids=None, state=None) -> (logits [batch, seq, vocab],
state)`. The state is what decoding carries: for the MatMul-free LM a constant-size
`RecurrentState` (`h [layers, batch, d]` fp32), for the Transformer++ a `KVCache`.
`model.init_state(batch, max_len)` makes an empty one; feeding a prompt with it is the prefill,
feeding `[batch, 1]` tokens with the returned state is a decode step.

Each model has one `__call__`: embed, its blocks in a layer loop, head. The loop is the
model's own (`own_layer_loop`: `lax.scan` over the stacked blocks, unrolled over the
Transformer++'s per-layer KV caches) unless the caller passes one (`LayerLoop`): how a trained
model runs for decoding and scoring on a platform is `mmfree_jax.infer`'s business.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfree_jax.config import REMAT_POLICIES, ModelConfig
from mmfree_jax.nn import layers
from mmfree_jax.numerics import mlgru
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.parallel.context_positions import (  # noqa: F401  (the model's API)
  positions_in_document,
  reset_mask,
)
from mmfree_jax.parallel.sharding import constrain


class RecurrentState(NamedTuple):
  """MatMul-free decoding state: `h [layers, batch, d]` fp32. Independent of context length."""

  h: jax.Array


class KVCache(NamedTuple):
  """Transformer++ decoding state: one array per layer in `k` and in `v`, each `[batch *
  kv_heads, head_dim, max_len]` (`layers.kv_cache_shape`: heads-major, positions minor; no
  row axis for batch 1 with one K/V head), and `index`, the int32 number of positions
  already filled.

  Per-layer arrays rather than one stacked `[layers, ...]` array: XLA slices a layer out of a
  stacked array with a copy, so every decode step would move the whole cache once more.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  index: jax.Array


def check_token_ids(tokens, vocab_size: int) -> None:
  """Host-side check at the data boundary: ids must lie in [0, vocab_size).

  Inside jit an out-of-range id cannot raise, and `jnp.take` would return NaN rows, so the
  data pipeline, eval and generation call this on concrete token arrays.
  """
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(
      f"token ids must be in [0, {vocab_size}); got min {tokens.min()}, max {tokens.max()}. "
      "The tokenizer and model.vocab_size disagree: set --config.model.vocab_size to the "
      "tokenizer's vocabulary size (or larger)"
    )


def stack_blocks(
  make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
) -> nnx.Module:
  """Builds `num_layers` blocks whose params carry a leading 'layers' axis."""

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(key):
    return make_block(nnx.Rngs(params=key))

  return make(jax.random.split(rngs.params(), num_layers))


def scan_blocks(blocks: nnx.Module, x: jax.Array, per_layer, body, remat: str):
  """Runs `body(block, x, per_layer_slice) -> (x, out)` over the stacked blocks with lax.scan.

  Returns the final x and the per-layer outputs stacked on a leading axis.
  """
  graphdef, params = nnx.split(blocks)

  def step(x, xs):
    block_params, layer_inputs = xs
    return body(nnx.merge(graphdef, block_params), x, layer_inputs)

  if REMAT_POLICIES[remat] is not None:
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(step, x, (params, per_layer))


def layer_blocks(blocks: nnx.Module) -> list[nnx.Module]:
  """The stacked blocks as one module per layer, whose params are static slices `p[l]`.

  For decode steps, unrolled: a `lax.scan` copies each layer's weights (and cache slice) out
  of the stacked arrays at every token, while a static slice feeding the layer's first fusion
  is read in place.
  """
  graphdef, params = nnx.split(blocks)
  num_layers = jax.tree.leaves(params)[0].shape[0]
  return [nnx.merge(graphdef, jax.tree.map(lambda a, l=l: a[l], params)) for l in range(num_layers)]


def unroll_blocks(blocks, x: jax.Array, per_layer, body):
  """Runs `body(block, x, per_layer_slice) -> (x, out)` over a sequence of per-layer blocks,
  unrolled. `per_layer`: a list with one entry per layer, or a pytree of stacked leaves
  (sliced statically). Returns the final x and the outs in `per_layer`'s form (a list, or
  stacked on a leading axis)."""
  per_layer_list = isinstance(per_layer, list)
  outs = []
  for l, block in enumerate(blocks):
    layer_inputs = per_layer[l] if per_layer_list else jax.tree.map(lambda a, l=l: a[l], per_layer)
    x, out = body(block, x, layer_inputs)
    outs.append(out)
  if not per_layer_list:
    outs = jax.tree.map(lambda *o: jnp.stack(o), *outs)
  return x, outs


class LayerLoop(Protocol):
  """`loop(blocks, x, per_layer, body) -> (x, outs)`: runs `body(block, x, per_layer_slice)
  -> (x, out)` over the stacked `blocks` (an `nnx.Module` whose params carry a leading
  'layers' axis). `per_layer`: a pytree with a leading layer axis on each leaf, or a list with
  one entry per layer; `outs` in the same form."""

  def __call__(
    self, blocks: nnx.Module, x: jax.Array, per_layer, body
  ) -> tuple[jax.Array, object]: ...


def own_layer_loop(remat: str) -> LayerLoop:
  """The models' own loop: `scan_blocks` (with the `remat` policy) over stacked inputs;
  unrolled over static slices where the inputs are a per-layer list (the Transformer++'s
  KV caches: XLA copies a layer out of a stacked cache at every step)."""

  def loop(blocks, x, per_layer, body):
    if isinstance(per_layer, list):
      return unroll_blocks(layer_blocks(blocks), x, per_layer, body)
    return scan_blocks(blocks, x, per_layer, body, remat)

  return loop


class _LMBase(nnx.Module):
  """Embedding table, input checks and the head shared by both models."""

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
    if not isinstance(tokens, jax.core.Tracer):
      check_token_ids(tokens, self.cfg.vocab_size)
    # Gather from a table whole along 'embed' (vocab stays split on its axis): the table's
    # 'embed' axis (fsdp) would meet the batch's (data x fsdp) in the gathered activations,
    # a move the SPMD partitioner can only make by replicating them (and their gradient).
    table = constrain(self.embedding[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)
    return constrain(x, ("activation_batch", "activation_seq", "activation_embed"))

  def head(self, x: jax.Array) -> jax.Array:
    """`x [batch, seq, d]` (the last block's output) → logits `[batch, seq, vocab]`."""
    return constrain(
      self.lm_head(self.final_norm(x)), ("activation_batch", "activation_seq", "activation_vocab")
    )

  def check_segments(self, tokens, segment_ids):
    if segment_ids is not None and segment_ids.shape != tokens.shape:
      raise ValueError(f"segment_ids shape {segment_ids.shape} != tokens shape {tokens.shape}")


class MatMulFreeBlock(nnx.Module):
  """`x + MLGRU(RMSNorm(x))`, then `x + GLU(RMSNorm(x))`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
    self.attn = layers.MLGRU(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
    self.mlp = layers.GLU(cfg, rngs=rngs)

  def __call__(self, x, lower_bound, *, initial_state=None, reset=None):
    """`x [batch, seq, d]`, `lower_bound [d]` → `x`, final recurrent state `[batch, d]`."""
    return mmfree_block(
      x,
      lower_bound,
      attn_norm=self.attn_norm,
      attn=self.attn,
      mlp_norm=self.mlp_norm,
      mlp=self.mlp,
      initial_state=initial_state,
      reset=reset,
    )


def mmfree_block(x, lower_bound, *, attn_norm, attn, mlp_norm, mlp, initial_state=None, reset=None):
  """The MatMul-free block's wiring on any parts (callables as `MatMulFreeBlock`'s: the
  trained layers, or stored codes in `nn.packed`): `x [batch, seq, d]`, `lower_bound [d]`,
  `initial_state [batch, d]` or None → `x`, final recurrent state `[batch, d]`."""
  y, h_last = attn(attn_norm(x), lower_bound, initial_state=initial_state, reset=reset)
  x = x + y
  x = x + mlp(mlp_norm(x))
  return constrain(x, ("activation_batch", "activation_seq", "activation_embed")), h_last


class MatMulFreeLM(_LMBase):
  """HGRNBitForCausalLM: ternary BitLinear everywhere (lm_head included), MLGRU + GLU blocks."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.kind != "mmfree":
      raise ValueError(f"MatMulFreeLM needs model.kind='mmfree'; got {cfg.kind!r}")
    self.cfg = cfg
    d, dtype = cfg.d_model, cfg.weight_dtype
    self.embedding = layers.param(
      rngs, layers.normal_init(0.02), (cfg.vocab_size, d), dtype, ("vocab", "embed")
    )
    if cfg.use_lower_bound:
      self.lower_bounds = layers.param(
        None, nnx.initializers.zeros, (cfg.num_layers, d), dtype, ("layers", "embed")
      )
    self.blocks = stack_blocks(lambda r: MatMulFreeBlock(cfg, rngs=r), cfg.num_layers, rngs)
    self.final_norm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=dtype)
    self.lm_head = layers.BitLinear(
      d,
      cfg.vocab_size,
      axes=("embed", "vocab"),
      kernel_init=layers.normal_init(0.02),
      dtype=cfg.compute_dtype,
      param_dtype=dtype,
      impl=cfg.bitlinear_impl,
      rngs=rngs,
    )

  def layer_lower_bounds(self) -> jax.Array:
    """`[layers, d]` fp32 (f64 under a float64 config): `cumsum(softmax(lower_bounds, 0), 0)
    - p[0]` (layer 0 gets 0)."""
    cfg = self.cfg
    if not cfg.use_lower_bound:
      return jnp.zeros((cfg.num_layers, cfg.d_model), acc_dtype(cfg.compute_dtype))
    lower = mlgru.layer_lower_bounds(self.lower_bounds[...], cfg.compute_dtype)
    # whole on every device (a few KB): left on the parameter's 'embed' layout, each layer's
    # slice is resharded to its gates' feature layout, and on several slices XLA picks the
    # partners of that reshard across them (the data-center network)
    return constrain(lower, (None, None))

  def init_state(self, batch: int, max_len: int | None = None) -> RecurrentState:
    """Zero state `[layers, batch, d]` fp32; `max_len` is accepted and unused (no limit)."""
    del max_len
    return RecurrentState(
      jnp.zeros((self.cfg.num_layers, batch, self.cfg.d_model), acc_dtype(self.cfg.compute_dtype))
    )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    state: RecurrentState | None = None,
    layer_loop: LayerLoop | None = None,
    apply_head: bool = True,
  ) -> tuple[jax.Array, RecurrentState]:
    """
    Args:
      tokens: `[batch, seq]` int32 ids in [0, vocab).
      segment_ids: `[batch, seq]` document ids of a packed window; with
        `reset_at_doc_start` the recurrence restarts at each new document.
      state: `RecurrentState` to continue from (prefill/decode) or None (zeros).
      layer_loop: runs the blocks (default `own_layer_loop`; `mmfree_jax.infer` passes its
        plan's).
      apply_head: False returns the last block's output `[batch, seq, d]` instead of logits
        (the chunked loss, `numerics.chunked_loss`, applies `head` to it chunk by chunk).
    Returns:
      logits `[batch, seq, vocab]` in the compute dtype, the final `RecurrentState`.
    """
    self.check_segments(tokens, segment_ids)
    x = self.embed_tokens(tokens)
    reset = None
    if segment_ids is not None and self.cfg.reset_at_doc_start:
      reset = reset_mask(segment_ids)

    def body(block, x, layer_inputs):
      lower_bound, h0 = layer_inputs
      return block(x, lower_bound, initial_state=h0, reset=reset)

    h0 = None if state is None else state.h
    layer_loop = layer_loop or own_layer_loop(self.cfg.remat)
    x, h_last = layer_loop(self.blocks, x, (self.layer_lower_bounds(), h0), body)
    return (self.head(x) if apply_head else x), RecurrentState(h_last)


class TransformerBlock(nnx.Module):
  """LLaMA block: `x + Attention(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
    self.attn = layers.Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype)
    self.mlp = layers.SwiGLU(cfg, rngs=rngs)

  def __call__(self, x, positions, *, segment_ids=None, cache=None, cache_index=None):
    y, new_cache = self.attn(
      self.attn_norm(x), positions, segment_ids=segment_ids, cache=cache, cache_index=cache_index
    )
    x = x + y
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("activation_batch", "activation_seq", "activation_embed")), new_cache


class TransformerLM(_LMBase):
  """Transformer++ baseline: RoPE attention, SwiGLU with the same I, untied full-precision head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.kind != "transformer":
      raise ValueError(f"TransformerLM needs model.kind='transformer'; got {cfg.kind!r}")
    self.cfg = cfg
    d, dtype = cfg.d_model, cfg.weight_dtype
    self.embedding = layers.param(
      rngs, layers.normal_init(0.02), (cfg.vocab_size, d), dtype, ("vocab", "embed")
    )
    self.blocks = stack_blocks(lambda r: TransformerBlock(cfg, rngs=r), cfg.num_layers, rngs)
    self.final_norm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=dtype)
    self.lm_head = layers.Dense(
      d,
      cfg.vocab_size,
      axes=("embed", "vocab"),
      kernel_init=layers.normal_init(0.02),
      dtype=cfg.compute_dtype,
      param_dtype=dtype,
      rngs=rngs,
    )

  def init_state(self, batch: int, max_len: int) -> KVCache:
    """Empty KV cache of `max_len` positions (memory grows with the context)."""
    cfg = self.cfg
    shape = layers.kv_cache_shape(batch, max_len, cfg.num_kv_heads or cfg.num_heads, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers))
    return KVCache(zeros(), zeros(), jnp.zeros((), jnp.int32))

  def _check_state(self, state: KVCache, batch: int) -> None:
    """The cache must be one `init_state(batch, max_len)` makes (shapes are static)."""
    cfg = self.cfg
    shapes = [tuple(a.shape) for a in state.k + state.v]
    max_len = shapes[0][-1] if shapes and shapes[0] else 0
    want = layers.kv_cache_shape(batch, max_len, cfg.num_kv_heads or cfg.num_heads, cfg.head_dim)
    if (len(state.k), len(state.v)) != (cfg.num_layers,) * 2 or any(s != want for s in shapes):
      raise ValueError(
        f"KV cache of {len(state.k)} layers of {shapes[:1]} does not fit this "
        f"model ({cfg.num_layers} layers of {want} at batch {batch}); make it "
        f"with model.init_state({batch}, max_len)"
      )

  @staticmethod
  def _check_room(state: KVCache, seq: int) -> None:
    """`seq` more positions must fit: past the end, the in-place cache write would clamp its
    offset and overwrite the last positions silently. Checked where the fill is known (always
    for the static `seq`; the filled count only outside jit, where it is concrete)."""
    max_len = state.k[0].shape[-1] if state.k else 0
    filled = None if isinstance(state.index, jax.core.Tracer) else int(state.index)
    if seq + (filled or 0) > max_len:
      raise ValueError(
        f"KV cache of {max_len} positions has {filled or 0} filled and cannot "
        f"take {seq} more; make it with model.init_state(batch, max_len) for "
        f"max_len >= prompt + new tokens"
      )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    state: KVCache | None = None,
    layer_loop: LayerLoop | None = None,
    apply_head: bool = True,
  ) -> tuple[jax.Array, KVCache | None]:
    """Same contract as `MatMulFreeLM.__call__`; the state is a `KVCache` (None without),
    whose per-layer caches go to the layer loop as a list (one `(k, v)` per layer)."""
    self.check_segments(tokens, segment_ids)
    if state is not None and segment_ids is not None:
      raise ValueError(
        "segment_ids (packed training windows) cannot be combined with a KV "
        "cache; decode one document per row"
      )
    if state is not None:
      self._check_state(state, tokens.shape[0])
      self._check_room(state, tokens.shape[1])
    x = self.embed_tokens(tokens)
    batch, seq = tokens.shape
    if segment_ids is not None:
      positions = positions_in_document(segment_ids)
    else:
      offset = 0 if state is None else state.index
      positions = jnp.broadcast_to(offset + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    cache_index = None if state is None else state.index

    def body(block, x, layer_cache):
      return block(
        x, positions, segment_ids=segment_ids, cache=layer_cache, cache_index=cache_index
      )

    layer_loop = layer_loop or own_layer_loop(self.cfg.remat)
    per_layer = None if state is None else list(zip(state.k, state.v))
    x, caches = layer_loop(self.blocks, x, per_layer, body)
    if state is not None:
      state = KVCache(tuple(k for k, _ in caches), tuple(v for _, v in caches), state.index + seq)
    return (self.head(x) if apply_head else x), state


def build_model(cfg: ModelConfig, rngs: nnx.Rngs | int = 0) -> nnx.Module:
  """Instantiates the model `cfg.kind` names (`mmfree` or `transformer`)."""
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs)
  if cfg.kind == "mmfree":
    return MatMulFreeLM(cfg, rngs=rngs)
  if cfg.kind == "transformer":
    return TransformerLM(cfg, rngs=rngs)
  raise ValueError(f"unknown model.kind {cfg.kind!r}")


def abstract_model(cfg: ModelConfig) -> nnx.Module:
  """The model with `jax.ShapeDtypeStruct` leaves: no allocation (count a 2.7B on a laptop)."""
  return nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(params=0)))


def count_params(model_or_state) -> int:
  """Number of parameters (works on abstract models too)."""
  state = (
    nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.Module)
    else model_or_state
  )
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def decode(model: nnx.Module, tokens: jax.Array, state):
  """One decode step: `tokens [batch, 1]`, state → `(logits [batch, 1, vocab], new state)`."""
  if tokens.ndim != 2 or tokens.shape[1] != 1:
    raise ValueError(f"decode takes tokens [batch, 1]; got {tokens.shape}")
  return model(tokens, state=state)
