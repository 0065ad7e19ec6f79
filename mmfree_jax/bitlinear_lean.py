"""Memory-lean BitLinear: the same forward and STE gradients as `quant.bitlinear`, with a
hand-written backward that keeps only what it needs.

`quant.bitlinear` differentiated by autodiff keeps, per layer, the fp32 de-quantized
activations `xq [..., in]` (for dW), the fp32 de-quantized weights `wq [in, out]` (for dx)
and the RMSNorm intermediates. This `jax.custom_vjp` keeps instead:

    x        [..., in]   the layer input (its producer usually keeps it alive anyway, and the
                         MLGRU's i/f/g projections share one)
    r        [..., 1]    the RMSNorm factor rsqrt(mean(x^2) + eps), fp32
    codes_x  [..., in]   int8 activation codes, and their scale sx [..., 1] fp32
    sw       []          the ternary weight scale; the codes are recomputed from the kernel,
                         a parameter that is alive anyway (inside the scan over layers JAX
                         forwards the per-layer kernel slice instead of stacking a copy)

Backward (DESIGN.md §1, straight-through estimator, no gradient through sx or sw):

    xq = codes_x / sx,  wq = clip(round_even(W sw), -1, 1) / sw
    dW = xq^T · dy,     d(xn) = dy · wq^T
    then the RMSNorm backward: u = x r, dgamma = sum(d(xn) u), du = d(xn) gamma,
    dx = r du - x r^3 mean(du x)

The forward computes the very same expressions as `quant.bitlinear` (including the
`x + (q - x)` form of the STE), so the outputs are identical; the gradients equal the
autodiff ones up to round-off (dW uses `codes_x / sx` where autodiff uses `xn + (q - xn)`,
which differ by at most an ulp).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mmfree_jax import quant

BITLINEAR_IMPLS = ("autodiff", "lean")


def _stat_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)  # norm statistics and scales: fp32 (f64 stays)


def _forward(x, kernel, norm_scale, eps, dtype):
  stat = _stat_dtype(x.dtype)
  xf = x.astype(stat)  # upcast as quant.bitlinear does
  r = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  xn = quant.rms_norm(xf, norm_scale, eps)  # the same expression as r above (CSE'd by XLA)
  codes_x, sx = quant.quantize_activations_int8(xn)
  xq = quant.straight_through(xn, (codes_x.astype(sx.dtype) / sx).astype(xn.dtype))
  codes_w, sw = quant.quantize_weights_ternary(kernel)
  wq = quant.straight_through(kernel, (codes_w.astype(sw.dtype) / sw).astype(kernel.dtype))
  # The matmul runs in the compute dtype (bf16 on accelerators), as in quant.bitlinear.
  y = jnp.matmul(xq.astype(dtype), wq.astype(dtype))
  return y, (x, r, codes_x, sx, kernel, sw, norm_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bitlinear_lean(x, kernel, norm_scale, eps, dtype):
  return _forward(x, kernel, norm_scale, eps, dtype)[0]


def _bitlinear_lean_fwd(x, kernel, norm_scale, eps, dtype):
  return _forward(x, kernel, norm_scale, eps, dtype)


def _bitlinear_lean_bwd(eps, dtype, residuals, dy):
  del eps  # r was saved
  x, r, codes_x, sx, kernel, sw, norm_scale = residuals
  stat = _stat_dtype(x.dtype)
  d_in, d_out = kernel.shape
  # Re-materialize the de-quantized operands (STE: the quantizers are the identity).
  xq = (codes_x.astype(stat) / sx).astype(dtype).reshape(-1, d_in)             # [N, in]
  codes_w = jnp.clip(jnp.round(kernel.astype(sw.dtype) * sw), -1.0, 1.0)       # half-even
  wq = (codes_w / sw).astype(kernel.dtype).astype(dtype)                       # [in, out]
  dy2 = dy.astype(dtype).reshape(-1, d_out)                                    # [N, out]
  d_kernel = jnp.matmul(xq.T, dy2).astype(kernel.dtype)                        # xq^T dy
  dxn = jnp.matmul(dy2, wq.T).astype(stat).reshape(x.shape)                    # dy wq^T
  # RMSNorm backward in fp32 (f64 under x64): xn = (x r) gamma.
  xf = x.astype(stat)
  gamma = norm_scale.astype(stat)
  u = xf * r
  d_gamma = jnp.sum((dxn * u).reshape(-1, d_in), axis=0).astype(norm_scale.dtype)
  du = dxn * gamma
  dxf = r * du - xf * (r * r * r) * jnp.mean(du * xf, axis=-1, keepdims=True)
  return dxf.astype(x.dtype), d_kernel, d_gamma


_bitlinear_lean.defvjp(_bitlinear_lean_fwd, _bitlinear_lean_bwd)


def bitlinear_lean(x: jax.Array, kernel: jax.Array, norm_scale: jax.Array, *,
                   eps: float = quant.BITLINEAR_NORM_EPS,
                   dtype: jnp.dtype | None = None) -> jax.Array:
  """`quant.bitlinear` (quantize=True) with the memory-lean custom backward.

  Args:
    x: `[..., d_in]`.
    kernel: `[d_in, d_out]` latent full-precision weights.
    norm_scale: `[d_in]` RMSNorm gamma.
    eps: RMSNorm epsilon.
    dtype: compute dtype of the matmul (default: x's dtype).
  Returns:
    `[..., d_out]` in the compute dtype.
  """
  if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"bitlinear_lean: x {x.shape} and kernel {kernel.shape} do not match "
                     "([..., d_in] and [d_in, d_out])")
  dtype = jnp.dtype(dtype or x.dtype)
  return _bitlinear_lean(x, kernel, norm_scale, float(eps), dtype)


def get_bitlinear(impl: str) -> Callable:
  """`fn(x, kernel, norm_scale, *, eps, dtype)` for `model.bitlinear_impl`."""
  if impl == "autodiff":
    return quant.bitlinear
  if impl == "lean":
    return bitlinear_lean
  raise ValueError(f"unknown bitlinear_impl {impl!r}; choose one of {BITLINEAR_IMPLS} "
                   "(model.bitlinear_impl in the config)")
