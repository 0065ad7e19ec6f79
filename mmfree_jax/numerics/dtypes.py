"""The accumulation dtype: one rule for every statistic, scale, gate, state and logit.

bf16 has 8 mantissa bits: a mean of squares, an absmax scale, a recurrent state summed over
thousands of steps or a log-sum-exp over a 32k vocabulary loses digits in it. Everything that
accumulates runs in fp32, and in f64 when the inputs are f64 (the float64 reference tests).
"""

from __future__ import annotations

import jax.numpy as jnp


def acc_dtype(dtype) -> jnp.dtype:
  """fp32 for bf16/fp16/fp32 `dtype`, f64 for f64."""
  return jnp.promote_types(dtype, jnp.float32)
