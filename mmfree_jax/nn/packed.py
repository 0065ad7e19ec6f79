"""Inference export of a MatMul-free LM with packed ternary weights, and its decode step.

`export_packed(model, fmt)` quantizes every BitLinear kernel of a trained `MatMulFreeLM`
once (docs/architecture.md §1: codes = clip(round_even(W / mean|W|), -1, 1), scale = mean|W|
with the 1e-5 floor) and stores the codes as

    '2bit'      4 codes per byte (2 bits/weight)        } packing.pack_ternary, unpacked on
    'base3'     5 codes per byte (1.6 bits/weight)      } the fly by packing.packed_matvec
    'int8'      one int8 code per weight
    'float32' / 'bfloat16'  the codes as floats (the plain-storage baselines)

with the per-tensor scale; norm scales and lower bounds stay full precision, and so does the
embedding unless it is stored as int8 rows with per-row absmax scales (`int8_embedding`: half
the bytes of bf16, and a lossy step the rest of the model then sees exactly).
In memory the bit-packed formats hold their codes as the matvec method reads them: bytes as
stored for 'lut' and 'unpack', bit planes (`ternary_packing.to_planes`, 2 bits/weight, so
base-3 grows by a quarter) for 'popcount', the default: AND + popcount over whole words is
the fastest exact product on XLA:CPU from 1 to 64 rows (decoding; benchmarks/RESULTS.md §7),
and within ~1.1-1.7x of unpacking to fp32 on a 256-token prefill.
`decode(params, tokens [B, 1], state, spec=...)` is one decode step of the MLGRU model on
these weights and `forward(params, tokens [B, T], spec=...)` the full-sequence forward (prefill,
scoring); `PackedLM` wraps both behind the `MatMulFreeLM` call contract (`model(tokens,
segment_ids=, state=) -> (logits, RecurrentState)`, `init_state`, `cfg`), so generation and
every evaluation run on it unchanged. Its blocks are wired by the trained model's own
`nn.model.mmfree_block` (MLGRU and GLU: `nn.layers.mlgru_mix`, `glu_mix`), each BitLinear
replaced by one on stored codes, which computes `y = (x_codes @ w_codes) * mean|W| / sx` from
int8 activation codes with an exact integer accumulator, so all formats give bit-identical
logits, equal to `model.decode` up to float round-off (the float model multiplies
de-quantized values, `sum (c_x / sx)(c_w / sw)`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mmfree_jax import registry
from mmfree_jax.config import ModelConfig
from mmfree_jax.nn import layers
from mmfree_jax.nn.model import (
  MatMulFreeLM,
  RecurrentState,
  check_token_ids,
  mmfree_block,
  reset_mask,
)
from mmfree_jax.numerics import quant
from mmfree_jax.numerics import ternary_packing as packing
from mmfree_jax.numerics.dtypes import acc_dtype

# The packed-format registry: name -> how the ternary codes are stored (PACKED = bit-packed by
# `ternary_packing`, else that dtype). Export, loading and decode all read it.
PACKED = "packed"
CODE_FORMATS = {
  "2bit": PACKED,
  "base3": PACKED,
  "int8": jnp.int8,
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
}
# With method 'lut', bit-packed formats use the lookup-table matvec up to this many rows
# (tokens) per product: its table and gathered partial sums grow with the rows, while
# unpacking a block of codes and multiplying costs about the same for any row count. Both
# are exact. One CPU run, ms for the 2.7B's gate_proj (2560 x 13824) at 1 / 2 / 4 / 8 rows:
# 2-bit LUT 2.5 / 10.7 / 21 / 59 against unpack 7.3 / 7.4 / 8.6 / 10; base-3 LUT 2.2 / 9.7 /
# 25 / 57 against unpack 12.9 / 13.7 / 13.4 / 13.0 (a 1024 x 1024 matrix: the LUT wins to 2
# rows for both formats).
LUT_MAX_ROWS = {"2bit": 2, "base3": 2}
DEFAULT_METHOD = registry.DEFAULT_MATVEC_METHOD


class PackedLinear(NamedTuple):
  """One BitLinear (or a stack of them with a leading layer axis).

  `w`: packed uint8 `[..., packed_length(in), out]`, bit planes uint32 `[..., 2, out,
  plane_words(in)]` (method 'popcount'), or codes `[..., in, out]` (int8/float);
  `scale`: `[...]` fp32 `max(mean|W|, 1e-5)`; `norm_scale`: `[..., in]` the RMSNorm gamma.
  """

  w: jax.Array
  scale: jax.Array
  norm_scale: jax.Array


class PackedBlock(NamedTuple):
  """The parameters of one layer, or of all layers stacked (every leaf `[layers, ...]`)."""

  attn_norm: jax.Array
  i_proj: PackedLinear
  f_proj: PackedLinear
  g_proj: PackedLinear
  o_proj: PackedLinear
  g_norm: jax.Array
  mlp_norm: jax.Array
  gate_proj: PackedLinear
  down_proj: PackedLinear
  lower_bound: jax.Array  # [d] the effective forget-gate lower bound of this layer


class PackedParams(NamedTuple):
  """`blocks` is how the layers are stored, so that a decode step reads every weight where it
  lies (slicing a stacked `[layers, ...]` array for a matmul copies the slice on XLA:CPU,
  which doubles the bytes a step moves):

  - bit-packed formats ('2bit', 'base3'): one `PackedBlock` of stacked leaves, scanned over.
    The LUT matvec reads a layer's codes in place (`packed_matvec(layer=)`), so the scan
    copies nothing, and the program holds one layer, not all of them unrolled (compiled, the
    unrolled 2.7B generate took ~0.3 GB of the process's memory).
  - integer and float code formats: a tuple of per-layer `PackedBlock`s, unrolled.
  """

  embedding: jax.Array  # [vocab, d] float, or int8 codes when embedding_scale is given
  blocks: PackedBlock | tuple[PackedBlock, ...]
  final_norm: jax.Array
  lm_head: PackedLinear
  embedding_scale: jax.Array | None = None  # [vocab] fp32: row ≈ codes / scale


@dataclasses.dataclass(frozen=True)
class PackedSpec:
  """Static description (hashable): the model config, storage format and matvec method."""

  cfg: ModelConfig
  fmt: str
  method: str = DEFAULT_METHOD


def stacked(fmt: str) -> bool:
  """Whether `fmt` stores its layers stacked (see `PackedParams`)."""
  return CODE_FORMATS[fmt] == PACKED


def holds_planes(fmt: str, method: str) -> bool:
  """Whether codes of `fmt` are held in memory as bit planes (`ternary_packing.to_planes`)
  for `method`: 'popcount' on a bit-packed format."""
  return method == "popcount" and stacked(fmt)


def stack_packed_blocks(blocks: list[PackedBlock]) -> PackedBlock:
  """Per-layer blocks → one block of `[layers, ...]` leaves."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)


def packed_layers(params: PackedParams) -> tuple[PackedBlock, ...]:
  """The stored blocks as a tuple (one stacked block for the bit-packed formats)."""
  return (params.blocks,) if isinstance(params.blocks, PackedBlock) else params.blocks


def pack_kernel(kernel: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
  """`kernel [in, out]` → codes stored in `fmt` and the scale mean|W| (floored)."""
  codes, _ = quant.quantize_weights_ternary(kernel)
  scale = quant.weight_mean_abs(kernel)
  if CODE_FORMATS[fmt] == PACKED:
    w = packing.pack_ternary(codes, fmt, axis=0)
  else:
    w = codes.astype(CODE_FORMATS[fmt])
  return w, scale


def quantize_embedding(embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`[vocab, d]` float → int8 codes `[vocab, d]` and per-row scales `[vocab]` fp32 (the
  int8 absmax quantizer of the activations, applied to each row)."""
  codes, scale = quant.quantize_activations_int8(embedding)
  return codes, scale[:, 0]


def embed(params: PackedParams, tokens: jax.Array, dtype) -> jax.Array:
  """`tokens [B, T]` → rows `[B, T, d]` in `dtype` (de-quantized if stored as int8)."""
  rows = jnp.take(params.embedding, tokens, axis=0)
  if params.embedding_scale is None:
    return rows.astype(dtype)
  scale = jnp.take(params.embedding_scale, tokens, axis=0)[..., None]
  return quant.dequantize_int8(rows, scale, dtype)


def _export_linear(layer, fmt: str, method: str, index: int | None = None) -> PackedLinear:
  """Packs `layer`'s kernel (layer `index` of a stacked one if given)."""
  kernel, norm_scale = layer.kernel[...], layer.norm_scale[...]
  if index is not None:
    kernel, norm_scale = kernel[index], norm_scale[index]
  w, scale = pack_kernel(kernel, fmt)
  if holds_planes(fmt, method):  # as loading a stored directory does
    w = packing.packed_to_planes(w, fmt, kernel.shape[0])
  return PackedLinear(w, scale, norm_scale)


def export_packed(
  model: MatMulFreeLM, fmt: str = "2bit", method: str = DEFAULT_METHOD, int8_embedding: bool = False
) -> tuple[PackedParams, PackedSpec]:
  """Quantizes and packs every BitLinear of `model` (latent weights are quantized once), and
  the embedding to int8 rows if `int8_embedding`.

  Returns the packed parameter pytree and the static spec to decode with.
  """
  if not isinstance(model, MatMulFreeLM):
    raise TypeError(f"export_packed needs a MatMulFreeLM; got {type(model).__name__}")
  if fmt not in CODE_FORMATS:
    raise ValueError(f"unknown packed format {fmt!r}; choose one of {tuple(CODE_FORMATS)}")
  if method not in packing.MATVEC_METHODS:
    raise ValueError(f"unknown matvec method {method!r}; choose one of {packing.MATVEC_METHODS}")
  b = model.blocks
  lower_bounds = model.layer_lower_bounds()
  blocks = []
  for l in range(model.cfg.num_layers):
    lin = functools.partial(_export_linear, fmt=fmt, method=method, index=l)
    blocks.append(
      PackedBlock(
        attn_norm=b.attn_norm.scale[l],
        i_proj=lin(b.attn.i_proj),
        f_proj=lin(b.attn.f_proj),
        g_proj=lin(b.attn.g_proj),
        o_proj=lin(b.attn.o_proj),
        g_norm=b.attn.g_norm.scale[l],
        mlp_norm=b.mlp_norm.scale[l],
        gate_proj=lin(b.mlp.gate_proj),
        down_proj=lin(b.mlp.down_proj),
        lower_bound=lower_bounds[l],
      )
    )
  embedding, embedding_scale = model.embedding[...], None
  if int8_embedding:
    embedding, embedding_scale = quantize_embedding(embedding)
  blocks = stack_packed_blocks(blocks) if stacked(fmt) else tuple(blocks)
  params = PackedParams(
    embedding,
    blocks,
    model.final_norm.scale[...],
    _export_linear(model.lm_head, fmt, method),
    embedding_scale,
  )
  return params, PackedSpec(model.cfg, fmt, method)


def bitlinear_weight_bytes(params: PackedParams, include_scales: bool = True) -> int:
  """Bytes of all BitLinear weights (codes, and their per-matrix scales if asked): what a
  decode step must read."""
  names = ("i_proj", "f_proj", "g_proj", "o_proj", "gate_proj", "down_proj")
  linears = [params.lm_head] + [
    getattr(block, name) for block in packed_layers(params) for name in names
  ]
  return int(sum(l.w.nbytes + (l.scale.nbytes if include_scales else 0) for l in linears))


def _matvec(
  x_codes: jax.Array, w: jax.Array, spec: PackedSpec, n_in: int, layer: jax.Array | None = None
) -> jax.Array:
  """Exact `x_codes @ w_codes` (integers), `[rows, in]` int8 → `[rows, out]`; `layer`: the
  layer of a stacked `w [layers, ...]`."""
  if holds_planes(spec.fmt, spec.method):
    return packing.planes_matvec(x_codes, w, n_in, layer=layer)
  if CODE_FORMATS[spec.fmt] == PACKED:
    if spec.method == "lut" and x_codes.shape[0] > LUT_MAX_ROWS[spec.fmt]:
      # many rows (prefill, big batches): unpack and multiply, a block of columns at a time
      return packing.unpacked_matmul(x_codes, w, spec.fmt, n_in, layer=layer)
    return packing.packed_matvec(x_codes, w, spec.fmt, n_in, spec.method, layer=layer)
  if spec.fmt == "int8":
    return jax.lax.dot(x_codes, w, preferred_element_type=jnp.int32)
  # float storage: products and sums of small integers are exact in the fp32 accumulator
  return jnp.matmul(x_codes.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _bitlinear(
  p: PackedLinear, x: jax.Array, spec: PackedSpec, layer: jax.Array | None = None
) -> jax.Array:
  """BitLinear on stored codes: `[..., in]` → `[..., out]` in the compute dtype (`layer`: of
  stacked codes; the scales are that layer's already)."""
  _, codes, sx = quant.bitlinear_input(x, p.norm_scale, quant.BITLINEAR_NORM_EPS)
  lead = codes.shape[:-1]
  acc = _matvec(codes.reshape(-1, codes.shape[-1]), p.w, spec, x.shape[-1], layer)
  return quant.integer_output(
    acc.reshape(lead + acc.shape[-1:]), p.scale, sx, spec.cfg.compute_dtype
  )


def _at(block: PackedBlock, index: jax.Array) -> PackedBlock:
  """Layer `index` of a stacked block: norms and scales sliced, codes left stacked."""
  take = lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False)
  return PackedBlock(
    *(
      PackedLinear(v.w, take(v.scale), take(v.norm_scale))
      if isinstance(v, PackedLinear)
      else take(v)
      for v in block
    )
  )


def _block(x, h0, layer: PackedBlock, spec: PackedSpec, reset=None, index=None):
  """One MLGRU + GLU block on stored codes, wired as the trained model's
  (`nn.model.mmfree_block`): `x [B, T, d]`, `h0 [B, d]` fp32 or None → (x, final h [B, d]).

  `reset [B, T]` bool restarts the recurrence (forget gate 0) where a new document starts.
  `index`: with a stacked `layer`, the (traced) layer to run.
  """
  cfg = spec.cfg
  if index is not None:
    layer = _at(layer, index)
  linear = lambda p: functools.partial(_bitlinear, p, spec=spec, layer=index)
  norm = lambda scale: functools.partial(quant.rms_norm, scale=scale, eps=cfg.rms_norm_eps)
  attn = functools.partial(
    layers.mlgru_mix,
    i_proj=linear(layer.i_proj),
    f_proj=linear(layer.f_proj),
    g_proj=linear(layer.g_proj),
    o_proj=linear(layer.o_proj),
    g_norm=norm(layer.g_norm),
    cfg=cfg,
  )
  mlp = functools.partial(
    layers.glu_mix, gate_proj=linear(layer.gate_proj), down_proj=linear(layer.down_proj)
  )
  return mmfree_block(
    x,
    layer.lower_bound,
    attn_norm=norm(layer.attn_norm),
    attn=attn,
    mlp_norm=norm(layer.mlp_norm),
    mlp=mlp,
    initial_state=h0,
    reset=reset,
  )


def init_state(spec: PackedSpec, batch: int) -> RecurrentState:
  """Zero state `[layers, batch, d]` fp32, as `MatMulFreeLM.init_state`."""
  cfg = spec.cfg
  return RecurrentState(
    jnp.zeros((cfg.num_layers, batch, cfg.d_model), acc_dtype(cfg.compute_dtype))
  )


def decode(
  params: PackedParams, tokens: jax.Array, state: RecurrentState, *, spec: PackedSpec
) -> tuple[jax.Array, RecurrentState]:
  """One decode step: `tokens [batch, 1]` int32 → `(logits [batch, 1, vocab], new state)`.

  Same contract as `mmfree_jax.decode` on the float model. Jit it with `spec` bound
  (`jax.jit(functools.partial(decode, spec=spec))`).
  """
  if tokens.ndim != 2 or tokens.shape[1] != 1:
    raise ValueError(f"decode takes tokens [batch, 1]; got {tokens.shape}")
  return forward(params, tokens, spec=spec, state=state)


def forward(
  params: PackedParams,
  tokens: jax.Array,
  *,
  spec: PackedSpec,
  segment_ids: jax.Array | None = None,
  state: RecurrentState | None = None,
) -> tuple[jax.Array, RecurrentState]:
  """The full-sequence forward (prefill, scoring) on stored codes: `MatMulFreeLM.__call__`'s
  contract. `tokens [B, T]` int32 → (logits `[B, T, vocab]` compute dtype, final state).

  Layers run as stored (`PackedParams`): scanned over for the bit-packed formats, unrolled
  for the others, each reading its weights where they lie; a one-token step with a state
  skips the recurrence's scan.
  """
  cfg = spec.cfg
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
  if not isinstance(tokens, jax.core.Tracer):
    check_token_ids(tokens, cfg.vocab_size)
  if segment_ids is not None and segment_ids.shape != tokens.shape:
    raise ValueError(f"segment_ids shape {segment_ids.shape} != tokens shape {tokens.shape}")
  reset = None
  if segment_ids is not None and cfg.reset_at_doc_start:
    reset = reset_mask(segment_ids)
  x = embed(params, tokens, cfg.compute_dtype)
  h0 = None if state is None else state.h
  if not isinstance(params.blocks, PackedBlock):  # a tuple of layers
    h = []
    for l, layer in enumerate(params.blocks):
      x, h_l = _block(x, None if h0 is None else h0[l], layer, spec, reset)
      h.append(h_l)
    h = jnp.stack(h)
  else:
    body = lambda x, xs: _block(x, xs[1], params.blocks, spec, reset, index=xs[0])
    x, h = jax.lax.scan(body, x, (jnp.arange(cfg.num_layers), h0))
  x = quant.rms_norm(x, params.final_norm, cfg.rms_norm_eps)
  return _bitlinear(params.lm_head, x, spec), RecurrentState(h)


class PackedWeight(nnx.Variable):
  """A stored inference tensor of `PackedLM` (codes, scales, embeddings, norms)."""


class PackedLM(nnx.Module):
  """A packed model behind the `MatMulFreeLM` interface: `model(tokens [B, T], segment_ids=,
  state=) -> (logits, RecurrentState)`, `init_state(batch)`, `cfg`; `nnx.split` gives the
  stored tensors (`PackedWeight` variables), so `generate`, `eval` and the lm-eval adapter
  take it as they take the latent model.
  """

  def __init__(self, params: PackedParams, spec: PackedSpec):
    if spec.fmt not in CODE_FORMATS:
      raise ValueError(f"unknown packed format {spec.fmt!r}; choose one of {tuple(CODE_FORMATS)}")
    self.cfg = spec.cfg
    self.fmt = spec.fmt
    self.method = spec.method
    self.weights = nnx.data(jax.tree.map(PackedWeight, params))

  @classmethod
  def from_model(
    cls,
    model: MatMulFreeLM,
    fmt: str = "2bit",
    method: str = DEFAULT_METHOD,
    int8_embedding: bool = False,
  ):
    """Packs an in-memory latent model (`export_packed`)."""
    return cls(*export_packed(model, fmt, method, int8_embedding))

  @property
  def spec(self) -> PackedSpec:
    return PackedSpec(self.cfg, self.fmt, self.method)

  def packed_params(self) -> PackedParams:
    return jax.tree.map(
      lambda v: v[...], self.weights, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )

  def init_state(self, batch: int, max_len: int | None = None) -> RecurrentState:
    """Zero state `[layers, batch, d]` fp32; `max_len` is accepted and unused (no limit)."""
    del max_len
    return init_state(self.spec, batch)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    state: RecurrentState | None = None,
  ) -> tuple[jax.Array, RecurrentState]:
    return forward(
      self.packed_params(), tokens, spec=self.spec, segment_ids=segment_ids, state=state
    )
