"""Layer loops for inference, with the models' layer-loop contract (`nn.model.LayerLoop`):
`loop(blocks, x, per_layer, body) -> (x, outs)`, `body(block, x, per_layer_slice) -> (x,
out)`; `per_layer` (and `outs`) either pytrees whose leaves carry a leading layer axis or a
list with one entry per layer (the Transformer++'s per-layer KV caches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _take(tree, l):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, l, 0, keepdims=False), tree)


def in_place_layers(blocks: nnx.Module, x: jax.Array, per_layer, body):
  """A loop over the stacked layers whose carry holds the stacked params behind an
  optimization barrier: each step computes its own layer's slice of any element-wise pass
  over the weights (the fp32 conversion of bf16 weights on XLA:CPU, a frozen scale's
  quantization), fused. Given the params as scanned inputs, XLA:CPU moves such a pass ahead
  of the loop and keeps its result for every layer at once (`plan.CPU_CONVERTS_DOT_OPERANDS`).

  `per_layer`: stacked (leading layer axis) or None. Returns the final x and the stacked outs
  (None where `body` returns None).
  """
  graphdef, params = nnx.split(blocks)
  num_layers = jax.tree.leaves(params)[0].shape[0]
  out_shapes = jax.eval_shape(
    lambda p, x, xs: body(nnx.merge(graphdef, _take(p, 0)), x, _take(xs, 0))[1],
    params,
    x,
    per_layer,
  )
  outs = jax.tree.map(lambda s: jnp.zeros((num_layers,) + s.shape, s.dtype), out_shapes)

  def step(l, carry):
    x, outs, params = carry
    params = jax.lax.optimization_barrier(params)
    x, out = body(nnx.merge(graphdef, _take(params, l)), x, _take(per_layer, l))
    outs = jax.tree.map(
      lambda o, v: jax.lax.dynamic_update_index_in_dim(o, v.astype(o.dtype), l, 0), outs, out
    )
    return x, outs, params

  x, outs, _ = jax.lax.fori_loop(0, num_layers, step, (x, outs, params))
  return x, outs


def ordered_after(module: nnx.Module, x: jax.Array) -> nnx.Module:
  """`module` with its float params unchanged in value (+0) but computed only once `x` is:
  an element-wise pass XLA puts before a dot then runs where the weights are used. XLA:CPU
  drops an optimization barrier outside a loop, and ran every unrolled layer's conversion of
  bf16 weights up front (`plan.CPU_CONVERTS_DOT_OPERANDS`). The zero is a finite element of
  `x` times 0, which XLA does not fold for floats."""
  v = x.reshape(-1)[0]
  zero = jnp.where(jnp.isfinite(v), v, 0) * 0
  graphdef, params = nnx.split(module)
  return nnx.merge(
    graphdef,
    jax.tree.map(
      lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params
    ),
  )


def ordered(body):
  """`body` whose block is `ordered_after` the block's input."""
  return lambda block, x, layer_inputs: body(ordered_after(block, x), x, layer_inputs)
