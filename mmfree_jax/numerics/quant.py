"""Ternary weight and int8 activation quantization with a straight-through estimator.

Pure functions only; `layers.BitLinear` wraps parameters around `bitlinear`.
The formulas are docs/architecture.md §1 (they follow the reference's fused kernels):

    xn = rmsnorm(x) * gamma                       eps 1e-6, statistics in fp32
    sx = 127 / max(max|xn|, 1e-5)                 per token
    xq = clip(round_half_away(xn * sx), -128, 127) / sx
    sw = 1 / max(mean|W|, 1e-5)                   per tensor
    wq = clip(round_half_even(W * sw), -1, 1) / sw
    y  = xq @ wq

Backward is the straight-through estimator: the quantizer (rounding, clipping and its scales)
is the identity, i.e. `q(x) = x + stop_gradient(quantize(x) - x)`.

`quantization_strength(s)` (distillation's quantization ramp) makes `bitlinear` use
`x + s * stop_gradient(quantize(x) - x)` for both operands: s = 0 is the float layer, s = 1
the ternary one. It is read when `bitlinear` is traced, like a logical-axis-rules context.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.dtypes import acc_dtype

BITLINEAR_NORM_EPS = 1e-6
ACT_SCALE_FLOOR = 1e-5
WEIGHT_SCALE_FLOOR = 1e-5
ACT_QMAX = 127.0
ACT_QMIN = -128.0


def round_half_away_from_zero(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer, ties away from zero (the reference's Triton kernel).

  Exact for every float: only true ties (|x - trunc(x)| == 0.5) move away from zero; the rest
  use round-to-nearest (`floor(|x| + 0.5)` would send 0.49999997 to 1).
  """
  truncated = jnp.trunc(x)
  is_tie = jnp.abs(x - truncated) == 0.5
  return jnp.where(is_tie, truncated + jnp.sign(x), jnp.round(x))


def rms_factor(x: jax.Array, eps: float) -> jax.Array:
  """`rsqrt(mean(x^2) + eps)` over the last axis, `[..., 1]` in x's dtype (pass fp32/f64)."""
  return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
  """RMSNorm over the last axis; statistics in fp32 (or f64), result in x's dtype.

  Args:
    x: `[..., d]` any float dtype.
    scale: `[d]` or None (no scale).
    eps: added to the mean square.
  """
  stat_dtype = acc_dtype(x.dtype)
  xf = x.astype(stat_dtype)
  y = xf * rms_factor(xf, eps)
  if scale is not None:
    y = y * scale.astype(stat_dtype)
  return y.astype(x.dtype)


def activation_scale(x: jax.Array) -> jax.Array:
  """Per-token int8 absmax scale `127 / max(max|x|, 1e-5)`, `[..., 1]` in fp32 (or f64)."""
  stat_dtype = acc_dtype(x.dtype)
  amax = jnp.max(jnp.abs(x.astype(stat_dtype)), axis=-1, keepdims=True)
  return ACT_QMAX / jnp.maximum(amax, ACT_SCALE_FLOOR)


def quantize_activations_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Int8 absmax codes and their scale.

  Args:
    x: `[..., d]` float.
  Returns:
    codes: `[..., d]` int8 in [-128, 127]; scale: `[..., 1]` fp32 with x ≈ codes / scale.
  """
  sx = activation_scale(x)
  codes = jnp.clip(round_half_away_from_zero(x.astype(sx.dtype) * sx), ACT_QMIN, ACT_QMAX)
  return codes.astype(jnp.int8), sx


def dequantize_int8(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """`codes / scale` in `dtype`: the inverse of `quantize_activations_int8` (scale broadcasts
  against codes, e.g. `[..., 1]` against `[..., d]`)."""
  return (codes.astype(scale.dtype) / scale).astype(dtype)


def fake_quantize_activations(x: jax.Array) -> jax.Array:
  """De-quantized int8 absmax activations `codes / scale`, same shape and dtype as x (no STE)."""
  codes, sx = quantize_activations_int8(x)
  return dequantize_int8(codes, sx, x.dtype)


def weight_scale(w: jax.Array) -> jax.Array:
  """Per-tensor ternary scale `1 / max(mean|W|, 1e-5)`, a 0-d fp32 (or f64) array."""
  return 1.0 / weight_mean_abs(w)


def weight_mean_abs(w: jax.Array) -> jax.Array:
  """`max(mean|W|, 1e-5)`, 0-d fp32 (or f64): the value of a ternary code 1."""
  return jnp.maximum(jnp.mean(jnp.abs(w.astype(acc_dtype(w.dtype)))), WEIGHT_SCALE_FLOOR)


def quantize_weights_ternary(
  w: jax.Array, sw: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Ternary codes and their scale.

  Args:
    w: latent full-precision kernel, any shape.
    sw: its `weight_scale`, if already computed (frozen inference); None computes it.
  Returns:
    codes: int8 in {-1, 0, 1}, w's shape; scale: 0-d fp32 with w ≈ codes / scale.
  """
  sw = weight_scale(w) if sw is None else sw
  codes = jnp.clip(jnp.round(w.astype(sw.dtype) * sw), -1.0, 1.0)  # jnp.round is half-even
  return codes.astype(jnp.int8), sw


def fake_quantize_weights(w: jax.Array, sw: jax.Array | None = None) -> jax.Array:
  """De-quantized ternary weights `codes / scale` in {-1, 0, +1}·mean|W| (no STE); `sw` as
  in `quantize_weights_ternary`."""
  codes, sw = quantize_weights_ternary(w, sw)
  return (codes.astype(sw.dtype) / sw).astype(w.dtype)


def straight_through(x: jax.Array, quantized: jax.Array, strength=None) -> jax.Array:
  """Forward value `quantized` (or `x + strength * (quantized - x)`), gradient of the identity
  with respect to x."""
  if strength is None:
    return x + jax.lax.stop_gradient(quantized - x)
  return x + jnp.asarray(strength, x.dtype) * jax.lax.stop_gradient(quantized - x)


_STRENGTH = contextvars.ContextVar("quantization_strength", default=None)


@contextlib.contextmanager
def quantization_strength(strength):
  """Within the block, `bitlinear` fake-quantizes with this strength (a float or a traced
  scalar in [0, 1]); only the autodiff BitLinear reads it."""
  token = _STRENGTH.set(strength)
  try:
    yield
  finally:
    _STRENGTH.reset(token)


def bitlinear_input(x: jax.Array, norm_scale: jax.Array, eps: float):
  """The BitLinear input path: RMSNorm in fp32, then per-token int8 absmax.

  Args:
    x: `[..., d_in]` any float dtype.
    norm_scale: `[d_in]` RMSNorm gamma.
  Returns:
    `(xn, codes, sx)`: the normalized input `[..., d_in]` fp32 (f64 under x64), its int8 codes
    `[..., d_in]` and per-token scale `[..., 1]` fp32, with `xn ≈ codes / sx`.
  """
  xn = rms_norm(x.astype(acc_dtype(x.dtype)), norm_scale, eps)
  codes, sx = quantize_activations_int8(xn)
  return xn, codes, sx


def ste_weights(kernel: jax.Array, strength=None, sw: jax.Array | None = None) -> jax.Array:
  """The weights the float BitLinear forward multiplies by: the STE form of the de-quantized
  ternary kernel, `[d_in, d_out]` in the kernel's dtype (`sw` as in
  `quantize_weights_ternary`)."""
  return straight_through(kernel, fake_quantize_weights(kernel, sw), strength)


def bitlinear_fake_quant(
  x: jax.Array,
  kernel: jax.Array,
  norm_scale: jax.Array,
  eps: float,
  dtype,
  strength=None,
  *,
  frozen: bool = False,
) -> tuple[jax.Array, tuple]:
  """The one BitLinear forward with de-quantized operands and STE (every float impl runs it).

  Returns `y [..., d_out]` in `dtype` and `(xn, codes_x, sx)` for custom backwards.
  strength: None (full quantization) or s in [0, 1], see `quantization_strength`.
  frozen: `kernel` already is `ste_weights(latent)` (decode: quantized once, not per token).
  """
  xn, codes_x, sx = bitlinear_input(x, norm_scale, eps)
  xq = straight_through(xn, (codes_x.astype(sx.dtype) / sx).astype(xn.dtype), strength)
  wq = kernel if frozen else ste_weights(kernel, strength)
  # The matmul runs in the compute dtype (bf16 on accelerators), as the reference does.
  y = jnp.matmul(xq.astype(dtype), wq.astype(dtype))
  return y, (xn, codes_x, sx)


def integer_output(acc: jax.Array, w_mean_abs: jax.Array, sx: jax.Array, dtype) -> jax.Array:
  """`y = (x_codes @ w_codes) * mean|W| / sx`: a BitLinear output from its exact integer
  accumulator `acc [..., d_out]`, in `dtype` (the integer and packed paths)."""
  stat = sx.dtype
  return (acc.astype(stat) * w_mean_abs.astype(stat) / sx).astype(dtype)


def bitlinear(
  x: jax.Array,
  kernel: jax.Array,
  norm_scale: jax.Array,
  *,
  eps: float = BITLINEAR_NORM_EPS,
  dtype: jnp.dtype | None = None,
  quantize: bool = True,
) -> jax.Array:
  """BitLinear forward: RMSNorm, int8 activations, ternary weights, matmul; STE backward.

  Args:
    x: `[..., d_in]`.
    kernel: `[d_in, d_out]` latent full-precision weights.
    norm_scale: `[d_in]` RMSNorm gamma.
    eps: RMSNorm epsilon (1e-6 as in the reference's FusedBitLinear).
    dtype: compute dtype of the matmul (default: x's dtype). Scales stay fp32.
    quantize: False replaces both quantizers by the identity (a plain RMSNorm+Linear); used
      to check that STE gradients equal those of the unquantized layer.
  Returns:
    `[..., d_out]` in the compute dtype.
  """
  dtype = dtype or x.dtype
  if quantize:
    return bitlinear_fake_quant(x, kernel, norm_scale, eps, dtype, _STRENGTH.get())[0]
  xn = rms_norm(x.astype(acc_dtype(x.dtype)), norm_scale, eps)
  return jnp.matmul(xn.astype(dtype), kernel.astype(dtype))
