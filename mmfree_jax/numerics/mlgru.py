"""The MLGRU's element-wise formulas (docs/architecture.md §1.2), shared by the training layer
(`nn.layers.MLGRU`) and the packed inference model (`nn.packed`):

    f = lb + (1 - lb) * sigmoid(f_pre)        forget gate with this layer's lower bound
    i = silu(i_pre) * (1 - f)                 input, tied to the forget gate
    h_t = f_t * h_{t-1} + i_t                 (`ops.recurrence`)
    o = g * h * sigmoid(h)                    g = RMSNorm(g_pre): the output gate
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.dtypes import acc_dtype


def gates(f_pre: jax.Array, i_pre: jax.Array, lower_bound: jax.Array):
  """Forget gate and input of the recurrence.

  Args:
    f_pre, i_pre: `[..., d]` pre-activations (any float dtype).
    lower_bound: `[d]` this layer's forget-gate lower bound (zeros = none).
  Returns:
    `(f, i)`, each `[..., d]` in the accumulation dtype (fp32, f64 under x64).
  """
  acc = acc_dtype(f_pre.dtype)
  lb = lower_bound.astype(acc)
  f = lb + (1.0 - lb) * jax.nn.sigmoid(f_pre.astype(acc))
  i = jax.nn.silu(i_pre.astype(acc)) * (1.0 - f)
  return f, i


def output(g: jax.Array, h: jax.Array) -> jax.Array:
  """`g * h * sigmoid(h)` (the reference's FusedRMSNormSwishGate after its norm), `[..., d]`."""
  return g * h * jax.nn.sigmoid(h)


def layer_lower_bounds(raw: jax.Array, dtype) -> jax.Array:
  """`[layers, d]` effective lower bounds `cumsum(softmax(raw, 0), 0) - p[0]` (layer 0 gets 0)
  from the raw `[layers, d]` parameter, in the accumulation dtype of `dtype`."""
  p = jax.nn.softmax(raw.astype(acc_dtype(dtype)), axis=0)
  return jnp.cumsum(p, axis=0) - p[0]
