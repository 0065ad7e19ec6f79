"""The quantized inference model of the MatMul-free LM: `PackedLM`.

`PackedLM` is a `MatMulFreeLM` whose tensors are stored once and whose BitLinears are each an
`nn.quantized.QuantizedLinear` in one storage format (code formats: '2bit', 'base3', 'int8',
'float32', 'bfloat16', also on disk; frozen formats: 'frozen', 'latent_scale', what
`mmfree_jax.infer` makes of a latent model for decoding and scoring). It runs the model's own
`__call__` (embed, the `MatMulFreeBlock` wiring, the MLGRU's T=1 decode shortcut, head).
Why one model: the trained model's structure already is the inference program, so swapping
each BitLinear for one quantized linear leaves one forward to fix and test; the formats
differ only in the class that reads them.

Layers are stored so that a decode step reads every weight where it lies (slicing a stacked
`[layers, ...]` array for a matmul copies the slice on XLA:CPU): the bit-packed formats keep
stacked leaves, and their layer scan (`read_in_place`) leaves the codes (`PackedCodes`)
unsliced: each product reads its layer's codes at a traced index, so the program holds one
layer, not all of them unrolled; the other code formats and 'frozen' keep one block per
layer, unrolled; 'latent_scale' keeps the stacked blocks for `infer`'s layer loops. The
embedding stays full precision, or int8 rows with per-row absmax scales (`int8_embedding`:
half of bf16's bytes, a lossy step the model then sees exactly).

`export_packed(model, fmt)` makes the stored tensors (`PackedParams`, also what
`export.reader` reads) and `PackedLM(params, spec)` the model; `forward` and `decode` are its
call as functions of the tensors.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mmfree_jax.config import ModelConfig
from mmfree_jax.nn import layers
from mmfree_jax.nn.model import MatMulFreeBlock, MatMulFreeLM, RecurrentState, unroll_blocks
from mmfree_jax.nn.quantized import (  # noqa: F401  (the formats are part of this API)
  CODE_FORMATS,
  DEFAULT_METHOD,
  FORMATS,
  FROZEN,
  FROZEN_FORMATS,
  LATENT_SCALE,
  LUT_MAX_ROWS,
  PACKED,
  PackedCodes,
  PackedLinear,
  PackedWeight,
  QuantizedLinear,
  holds_planes,
)
from mmfree_jax.numerics import quant
from mmfree_jax.numerics import ternary_packing as packing
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.ops import bitlinear


class PackedBlock(NamedTuple):
  """The tensors of one layer, or of all layers stacked (every leaf `[layers, ...]`)."""

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
  """A model's stored tensors. `blocks`: one `PackedBlock` of stacked leaves where `fmt` keeps
  the layers stacked (`stacked`), else a tuple of per-layer `PackedBlock`s."""

  embedding: jax.Array  # [vocab, d] float, or int8 codes when embedding_scale is given
  blocks: PackedBlock | tuple[PackedBlock, ...]
  final_norm: jax.Array
  lm_head: PackedLinear
  embedding_scale: jax.Array | None = None  # [vocab] fp32: row ≈ codes / scale


@dataclasses.dataclass(frozen=True)
class PackedSpec:
  """Static description (hashable): the model config, storage format and how its product is
  computed (`method`: the matvec method of a code format; for a frozen format the resolved
  `bitlinear_impl` whose forward it runs)."""

  cfg: ModelConfig
  fmt: str
  method: str = DEFAULT_METHOD


def stacked(fmt: str) -> bool:
  """Whether `fmt` stores its layers stacked (module docstring)."""
  return fmt == LATENT_SCALE or CODE_FORMATS.get(fmt) == PACKED


def stack_packed_blocks(blocks: list[PackedBlock]) -> PackedBlock:
  """Per-layer blocks → one block of `[layers, ...]` leaves."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)


def packed_layers(params: PackedParams) -> tuple[PackedBlock, ...]:
  """The stored blocks as a tuple (one stacked block for the stacked formats)."""
  return (params.blocks,) if isinstance(params.blocks, PackedBlock) else params.blocks


def pack_kernel(kernel: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
  """`kernel [in, out]` → codes stored in code format `fmt` and the scale mean|W| (floored)."""
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


def _export_linear(layer, fmt: str, method: str, index: int | None = None) -> PackedLinear:
  """`layer`'s kernel in `fmt` (layer `index` of a stacked one if given)."""
  kernel, norm_scale = layer.kernel[...], layer.norm_scale[...]
  if index is not None:
    kernel, norm_scale = kernel[index], norm_scale[index]
  if fmt in FROZEN_FORMATS:
    keep_latent = fmt == LATENT_SCALE
    _, w, scale = bitlinear.freeze_weights(kernel, layer.impl, layer.dtype, keep_latent=keep_latent)
    return PackedLinear(w, scale, norm_scale)
  w, scale = pack_kernel(kernel, fmt)
  if holds_planes(fmt, method):  # as loading a stored directory does
    w = packing.packed_to_planes(w, fmt, kernel.shape[0])
  return PackedLinear(w, scale, norm_scale)


def _check_export(model, fmt: str, method: str) -> None:
  if not isinstance(model, MatMulFreeLM) or isinstance(model, PackedLM):
    raise TypeError(f"export_packed needs a latent MatMulFreeLM; got {type(model).__name__}")
  if fmt not in FORMATS:
    raise ValueError(f"unknown packed format {fmt!r}; choose one of {tuple(CODE_FORMATS)}")
  if fmt in CODE_FORMATS and method not in packing.MATVEC_METHODS:
    raise ValueError(f"unknown matvec method {method!r}; choose one of {packing.MATVEC_METHODS}")


def export_packed(
  model: MatMulFreeLM, fmt: str = "2bit", method: str = DEFAULT_METHOD, int8_embedding: bool = False
) -> tuple[PackedParams, PackedSpec]:
  """Quantizes every BitLinear of the latent `model` once into `fmt` (a code format, or a
  frozen one: `method` is then the model's resolved `bitlinear_impl`), and the embedding to
  int8 rows if `int8_embedding`.

  Returns the stored tensors and the static spec to run them with.
  """
  _check_export(model, fmt, method)
  if fmt in FROZEN_FORMATS:
    method = bitlinear.resolve_impl(model.cfg.bitlinear_impl)
  b, bounds = model.blocks, model.layer_lower_bounds()

  def block(index):  # None: all layers, stacked as the model holds them
    take = (lambda a: a) if index is None else (lambda a: a[index])
    lin = functools.partial(_export_linear, fmt=fmt, method=method, index=index)
    return PackedBlock(
      attn_norm=take(b.attn_norm.scale[...]),
      i_proj=lin(b.attn.i_proj),
      f_proj=lin(b.attn.f_proj),
      g_proj=lin(b.attn.g_proj),
      o_proj=lin(b.attn.o_proj),
      g_norm=take(b.attn.g_norm.scale[...]),
      mlp_norm=take(b.mlp_norm.scale[...]),
      gate_proj=lin(b.mlp.gate_proj),
      down_proj=lin(b.mlp.down_proj),
      lower_bound=take(bounds),
    )

  if fmt == LATENT_SCALE:  # the stacked kernels themselves: no per-layer copy
    blocks = block(None)
  else:
    blocks = [block(l) for l in range(model.cfg.num_layers)]
    blocks = stack_packed_blocks(blocks) if stacked(fmt) else tuple(blocks)
  embedding, embedding_scale = model.embedding[...], None
  if int8_embedding:
    embedding, embedding_scale = quantize_embedding(embedding)
  head = _export_linear(model.lm_head, fmt, method)
  params = PackedParams(embedding, blocks, model.final_norm.scale[...], head, embedding_scale)
  return params, PackedSpec(model.cfg, fmt, method)


def bitlinear_weight_bytes(params: PackedParams, include_scales: bool = True) -> int:
  """Bytes of all BitLinear weights (codes, and their per-matrix scales if asked): what a
  decode step must read."""
  names = ("i_proj", "f_proj", "g_proj", "o_proj", "gate_proj", "down_proj")
  linears = [params.lm_head] + [
    getattr(block, name) for block in packed_layers(params) for name in names
  ]
  return int(sum(l.w.nbytes + (l.scale.nbytes if include_scales else 0) for l in linears))


def _block(template: MatMulFreeBlock, p: PackedBlock, spec: PackedSpec, layers) -> MatMulFreeBlock:
  """A copy of the abstract `template` holding `p`'s tensors, its BitLinears
  `QuantizedLinear`s (`layers`: as `QuantizedLinear` takes it)."""
  block = nnx.merge(*nnx.split(template))
  linear = functools.partial(
    QuantizedLinear, fmt=spec.fmt, method=spec.method, dtype=spec.cfg.compute_dtype, layers=layers
  )
  block.attn_norm.scale = PackedWeight(p.attn_norm)
  block.attn.g_norm.scale = PackedWeight(p.g_norm)
  block.mlp_norm.scale = PackedWeight(p.mlp_norm)
  for proj in ("i_proj", "f_proj", "g_proj", "o_proj"):
    setattr(block.attn, proj, linear(getattr(p, proj)))
  block.mlp.gate_proj, block.mlp.down_proj = linear(p.gate_proj), linear(p.down_proj)
  return block


def read_in_place(blocks: nnx.Module, x: jax.Array, per_layer, body):
  """`PackedLM`'s loop over stacked blocks (`nn.model.LayerLoop`): a `lax.scan` whose steps
  take their layer's slice of every leaf but the `PackedCodes`, which they read where they
  lie (a scan over them would copy each layer's codes out of the stack at every token)."""
  graphdef, codes, rest = nnx.split(blocks, PackedCodes, ...)

  def step(x, xs):
    rest_l, layer_inputs = xs
    return body(nnx.merge(graphdef, codes, rest_l), x, layer_inputs)

  return jax.lax.scan(step, x, (rest, per_layer))


def packed_layer_loop(blocks, x: jax.Array, per_layer, body):
  """`PackedLM`'s own layer loop: unrolled over per-layer blocks, `read_in_place` over
  stacked ones."""
  if isinstance(blocks, collections.abc.Sequence):
    return unroll_blocks(blocks, x, per_layer, body)
  return read_in_place(blocks, x, per_layer, body)


class PackedLM(MatMulFreeLM):
  """The quantized MatMul-free LM (module docstring): a `MatMulFreeLM` (its `__call__`,
  `init_state`, `cfg`) on stored tensors, `PackedWeight` variables (`nnx.split` gives them),
  so `generate`, `eval` and the lm-eval adapter take it as they take the latent model.
  `fmt`, `method`: as `PackedSpec`.
  """

  def __init__(self, params: PackedParams, spec: PackedSpec):  # pylint: disable=super-init-not-called
    if spec.fmt not in FORMATS:
      raise ValueError(f"unknown packed format {spec.fmt!r}; choose one of {tuple(CODE_FORMATS)}")
    cfg = self.cfg = spec.cfg
    self.fmt, self.method = spec.fmt, spec.method
    self.embedding = PackedWeight(params.embedding)
    scale = params.embedding_scale
    self.embedding_scale = None if scale is None else PackedWeight(scale)
    template = nnx.eval_shape(lambda: MatMulFreeBlock(cfg, rngs=nnx.Rngs(params=0)))
    if isinstance(params.blocks, PackedBlock):
      self.blocks = _block(template, params.blocks, spec, cfg.num_layers)
      bounds = params.blocks.lower_bound
    else:
      self.blocks = nnx.data(nnx.List([_block(template, b, spec, None) for b in params.blocks]))
      bounds = jnp.stack([b.lower_bound for b in params.blocks])
    self.stored_lower_bounds = PackedWeight(bounds)
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
    self.final_norm.scale = PackedWeight(params.final_norm)
    self.lm_head = QuantizedLinear(
      params.lm_head, fmt=spec.fmt, method=spec.method, dtype=cfg.compute_dtype
    )

  @classmethod
  def from_model(
    cls,
    model: MatMulFreeLM,
    fmt: str = "2bit",
    method: str = DEFAULT_METHOD,
    int8_embedding: bool = False,
  ):
    """Quantizes an in-memory latent model (`export_packed`)."""
    return cls(*export_packed(model, fmt, method, int8_embedding))

  @property
  def spec(self) -> PackedSpec:
    return PackedSpec(self.cfg, self.fmt, self.method)

  def packed_params(self) -> PackedParams:
    """The stored tensors as `PackedParams` (as `export_packed` made them)."""
    linear = lambda q: PackedLinear(q.w[...], q.scale[...], q.norm_scale[...])

    def block(b, lower_bound):
      return PackedBlock(
        b.attn_norm.scale[...],
        *(linear(getattr(b.attn, n)) for n in ("i_proj", "f_proj", "g_proj", "o_proj")),
        b.attn.g_norm.scale[...],
        b.mlp_norm.scale[...],
        linear(b.mlp.gate_proj),
        linear(b.mlp.down_proj),
        lower_bound,
      )

    bounds = self.stored_lower_bounds[...]
    if isinstance(self.blocks, collections.abc.Sequence):
      blocks = tuple(block(b, bounds[l]) for l, b in enumerate(self.blocks))
    else:
      blocks = block(self.blocks, bounds)
    scale = None if self.embedding_scale is None else self.embedding_scale[...]
    head = linear(self.lm_head)
    return PackedParams(self.embedding[...], blocks, self.final_norm.scale[...], head, scale)

  def layer_lower_bounds(self) -> jax.Array:
    """The stored effective forget-gate lower bounds `[layers, d]`."""
    return self.stored_lower_bounds[...]

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The model's lookup; int8 rows (exact in every compute dtype) are then de-quantized."""
    x = super().embed_tokens(tokens)
    if self.embedding_scale is None:
      return x
    scale = jnp.take(self.embedding_scale[...], tokens, axis=0)[..., None]
    return quant.dequantize_int8(x, scale, self.cfg.compute_dtype)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    state: RecurrentState | None = None,
    layer_loop=None,
    apply_head: bool = True,
  ) -> tuple[jax.Array, RecurrentState]:
    """`MatMulFreeLM.__call__`, the layers run by `layer_loop` (default `packed_layer_loop`:
    as the format stores them)."""
    return super().__call__(
      tokens,
      segment_ids=segment_ids,
      state=state,
      layer_loop=layer_loop or packed_layer_loop,
      apply_head=apply_head,
    )


def init_state(spec: PackedSpec, batch: int) -> RecurrentState:
  """Zero state `[layers, batch, d]` fp32, as `MatMulFreeLM.init_state`."""
  cfg = spec.cfg
  return RecurrentState(
    jnp.zeros((cfg.num_layers, batch, cfg.d_model), acc_dtype(cfg.compute_dtype))
  )


def forward(
  params: PackedParams,
  tokens: jax.Array,
  *,
  spec: PackedSpec,
  segment_ids: jax.Array | None = None,
  state: RecurrentState | None = None,
) -> tuple[jax.Array, RecurrentState]:
  """`PackedLM(params, spec)(tokens, ...)`: `tokens [B, T]` int32 → (logits `[B, T, vocab]`
  compute dtype, final state). Jit it with `spec` bound."""
  return PackedLM(params, spec)(tokens, segment_ids=segment_ids, state=state)


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
