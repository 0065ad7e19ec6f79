"""Scale calibration of the converted student's BitLinears (`init_student_params(calibration=)`).

A weight copied from the teacher into a student BitLinear computes something of another scale
than the teacher's projection, for two reasons, both folded into the BitLinear's `norm_scale`
(its output is linear in that gamma: the int8 absmax activation codes do not depend on a
per-tensor factor):

1. **Ternary gain** (data-free). The absmean quantizer maps W to `Q(W) = mean|W| round(clip(
   W / mean|W|, -1, 1))`. For a Gaussian-like W this has a smaller norm than W (a third of the
   entries become 0, the large ones are clipped), so `Q(W) x` is a shrunken `W x`: the gain
   `a = <W, Q(W)> / <Q(W), Q(W)>` (the least-squares fit of W by `a Q(W)`, i.e. of `W x` by
   `a Q(W) x` for isotropic x) is ~1.34 for every kernel of a trained Transformer++.
   `ternary_gain` computes it per kernel (per layer for stacked `[L, in, out]` kernels).
   Its 'norm' kind, `||W|| / ||Q(W)||` (~1.51), keeps the output norm instead (the least-
   squares gain shrinks by the cosine of W and Q(W), ~0.89, and the shrinkage compounds
   through gate x up and the layers); `Calibration.block_gain` picks it inside the blocks, the
   head keeps the least-squares gain (its logits are the prediction: shrunk is calibrated).
2. **Input RMS** (needs teacher activations). Every student BitLinear RMS-normalises its
   input; the teacher's `o_proj` and `down_proj` see their input raw (the attention output,
   `silu(gate) * up`), whose per-token RMS r_t is far from 1 (0.07-0.6 in the d=128 teacher
   of experiments/convert.py). The copied projection then outputs `W x_t / r_t` instead of
   `W x_t`: the block adds a wrongly scaled update to the residual stream. The constant c
   minimising `sum_t ||c x_t / r_t - x_t||^2` is `mean_t r_t`, the mean per-token RMS of the
   teacher's input to that projection (`input_rms`, from `teacher_projection_inputs`).
   The i/f/g, gate/up and lm_head projections read an RMSNorm output in the teacher too (its
   gamma is folded in by `init_student_params`), so they need no input factor.

`Calibration` holds the factors; `init_student_params` multiplies them into the norm_scales.
`CALIBRATIONS` names the combinations (`distill.calibrate`, experiments/convert.py's
--calibrate); `named_calibration` builds one. The input RMS needs a batch of text:
`train.distill` takes the run's first training batch (the batch step 0 trains on, so no extra
tokens are read).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmfree_jax.numerics import quant

GAINS = ("lsq", "norm")
# name -> (ternary gain, its kind inside the blocks, teacher input RMS): 'none' the plain copy,
# 'ternary' the gain alone (data-free), 'rms' the input RMS alone, 'all' both, 'all_norm' both
# with the norm-preserving gain inside the blocks (the head's stays least-squares).
CALIBRATIONS = {
  "none": (False, "lsq", False),
  "ternary": (True, "lsq", False),
  "rms": (False, "lsq", True),
  "all": (True, "lsq", True),
  "all_norm": (True, "norm", True),
}


def ternary_gain(kernel: jax.Array, kind: str = "lsq") -> jax.Array:
  """Gain of the ternary quantization Q, fp32: 'lsq' the least-squares `<W, Q(W)> /
  <Q(W), Q(W)>`, 'norm' the norm-preserving `||W|| / ||Q(W)||` (larger: lsq = norm x the
  cosine of W and Q(W), ~0.89 for a Gaussian W).

  kernel: `[in, out]` (one gain, 0-d) or stacked `[layers, in, out]` (`[layers]`). Q is the
  BitLinear's own absmean quantizer (`quant.fake_quantize_weights`), per tensor.
  """
  if kind not in GAINS:
    raise ValueError(f"unknown gain {kind!r}; choose one of {GAINS}")

  def one(w):
    w = w.astype(jnp.float32)
    q = quant.fake_quantize_weights(w)
    den = jnp.sum(q * q)
    num = jnp.sum(w * q) if kind == "lsq" else jnp.sqrt(jnp.sum(w * w) * den)
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 1.0)

  if kernel.ndim == 2:
    return one(kernel)
  if kernel.ndim == 3:
    return jax.vmap(one)(kernel)
  raise ValueError(f"kernel must be [in, out] or [layers, in, out]; got {kernel.shape}")


def input_rms(activations: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over tokens of the per-token RMS of `activations [layers, batch, seq, width]`:
  `[layers]` fp32 (mask `[batch, seq]` bool: tokens counted; None: all)."""
  x = activations.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(x * x, axis=-1))  # [layers, batch, seq]
  if mask is None:
    return jnp.mean(rms, axis=(1, 2))
  m = mask.astype(jnp.float32)[None]
  return jnp.sum(rms * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m), 1.0)


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Per-layer factors folded into the student's norm_scales (None: factor 1).

  ternary: apply `ternary_gain` of each copied kernel (i/f/g/o, gate/up, down, lm_head).
  block_gain: its kind inside the blocks ('lsq' or 'norm'); the lm_head's is always 'lsq'.
  o_proj_rms, down_proj_rms: `[layers]` `input_rms` of the teacher's o_proj / down_proj inputs.
  """

  ternary: bool = False
  block_gain: str = "lsq"
  o_proj_rms: jax.Array | None = None
  down_proj_rms: jax.Array | None = None


def teacher_projection_inputs(
  teacher, tokens: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """The teacher's inputs to `o_proj` and `down_proj` on a calibration batch.

  teacher: a `TransformerLM`; tokens, segment_ids: `[batch, seq]` as for its forward.
  Returns `(o_inputs [layers, batch, seq, heads * head_dim], down_inputs [layers, batch,
  seq, intermediate])` in the compute dtype. Runs the model's own modules: each block's
  attention with its o_proj replaced by the identity, and `silu(gate) * up` from its fused
  gate/up projection.
  """
  from mmfree_jax.nn import blockwise  # the nn layer: convert/ sits above it
  from mmfree_jax.nn.model import layer_blocks, positions_in_document

  hidden = blockwise.transformer_hidden_states(teacher, tokens, segment_ids)
  batch, seq = tokens.shape
  if segment_ids is not None:
    positions = positions_in_document(segment_ids)
  else:
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  o_inputs, down_inputs = [], []
  for layer, block in enumerate(layer_blocks(teacher.blocks)):
    x = hidden[layer]
    attn = block.attn
    kernel = attn.o_proj.kernel[...]
    # Attention(x) = o_in @ W_o; with W_o = I the module returns o_in itself. set_value swaps
    # the array (`kernel[...] = ` would write into it, and a numpy leaf is a view of the
    # teacher's stacked params).
    attn.o_proj.kernel.set_value(jnp.eye(kernel.shape[0], dtype=kernel.dtype))
    try:
      o_in, _ = attn(block.attn_norm(x), positions, segment_ids=segment_ids)
    finally:
      attn.o_proj.kernel.set_value(kernel)
    mid = x + block.attn.o_proj(o_in)
    gate, up = jnp.split(block.mlp.gate_proj(block.mlp_norm(mid)), 2, axis=-1)
    o_inputs.append(o_in)
    down_inputs.append(jax.nn.silu(gate) * up)
  return jnp.stack(o_inputs), jnp.stack(down_inputs)


def calibration_from_teacher(
  teacher,
  tokens: jax.Array,
  segment_ids: jax.Array | None = None,
  mask: jax.Array | None = None,
  *,
  ternary: bool = True,
  block_gain: str = "lsq",
) -> Calibration:
  """`Calibration` with the input RMS of the teacher's o_proj/down_proj on this batch."""
  o_in, down_in = teacher_projection_inputs(teacher, tokens, segment_ids)
  return Calibration(
    ternary=ternary,
    block_gain=block_gain,
    o_proj_rms=input_rms(o_in, mask),
    down_proj_rms=input_rms(down_in, mask),
  )


def check_calibration(name: str) -> None:
  if name not in CALIBRATIONS:
    raise ValueError(f"unknown calibration {name!r}; choose one of {tuple(CALIBRATIONS)}")


def needs_batch(name: str) -> bool:
  """Whether calibration `name` reads the teacher's activations on a batch of text."""
  check_calibration(name)
  return CALIBRATIONS[name][2]


def named_calibration(
  name: str,
  teacher=None,
  tokens: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> Calibration:
  """The `Calibration` that `CALIBRATIONS[name]` describes; the input-RMS kinds run `teacher`
  (a `TransformerLM`) on `tokens [batch, seq]` (`calibration_from_teacher`)."""
  check_calibration(name)
  ternary, block_gain, rms = CALIBRATIONS[name]
  if not rms:
    return Calibration(ternary=ternary, block_gain=block_gain)
  if teacher is None or tokens is None:
    raise ValueError(f"calibration {name!r} needs the teacher and a batch of tokens")
  return calibration_from_teacher(
    teacher, tokens, segment_ids, mask, ternary=ternary, block_gain=block_gain
  )
