"""Block-by-block access to the models, for layer-wise distillation.

`transformer_hidden_states`: the residual stream of a TransformerLM before each block and after
the last, `[layers + 1, batch, seq, d]`. `mmfree_block_outputs`: every MatMul-free block
applied to *given* per-layer inputs (e.g. the teacher's), independently, `[layers, batch, seq,
d]`. Both run the same stacked blocks and `lax.scan` as the models' own forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.nn.model import (
  MatMulFreeLM,
  TransformerLM,
  positions_in_document,
  reset_mask,
  scan_blocks,
)


def transformer_hidden_states(
  model: TransformerLM, tokens: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
  """`[layers + 1, batch, seq, d]` in the compute dtype: entry l is block l's input, entry
  `layers` the last block's output (before the final norm).

  tokens, segment_ids: `[batch, seq]`, as for `model(tokens, segment_ids=...)`.
  """
  model.check_segments(tokens, segment_ids)
  x = model.embed_tokens(tokens)
  batch, seq = tokens.shape
  if segment_ids is not None:
    positions = positions_in_document(segment_ids)
  else:
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

  def body(block, x, _):
    y, _ = block(x, positions, segment_ids=segment_ids)
    return y, y

  _, outputs = scan_blocks(model.blocks, x, None, body, model.cfg.remat)
  return jnp.concatenate([x[None], outputs], axis=0)


def mmfree_block_outputs(
  model: MatMulFreeLM, inputs: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
  """Block l of the student applied to `inputs[l]`, for every l: `[layers, batch, seq, d]`.

  inputs: `[layers, batch, seq, d]` (e.g. `transformer_hidden_states(teacher, ...)[:-1]`).
  segment_ids: `[batch, seq]`; with `reset_at_doc_start` the recurrence restarts per document.
  """
  cfg = model.cfg
  if inputs.ndim != 4 or inputs.shape[0] != cfg.num_layers or inputs.shape[-1] != cfg.d_model:
    raise ValueError(
      f"inputs must be [num_layers={cfg.num_layers}, batch, seq, "
      f"d_model={cfg.d_model}]; got {inputs.shape}"
    )
  reset = None
  if segment_ids is not None and cfg.reset_at_doc_start:
    reset = reset_mask(segment_ids)

  def body(block, carry, layer_inputs):
    lower_bound, x = layer_inputs
    y, _ = block(x.astype(cfg.compute_dtype), lower_bound, reset=reset)
    return carry, y

  _, outputs = scan_blocks(
    model.blocks,
    jnp.zeros((), cfg.compute_dtype),
    (model.layer_lower_bounds(), inputs),
    body,
    cfg.remat,
  )
  return outputs
