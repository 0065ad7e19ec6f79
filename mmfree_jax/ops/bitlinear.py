"""BitLinear implementations: the `model.bitlinear_impl` registry (`IMPLS`).

  autodiff  `quant.bitlinear` differentiated by JAX
  lean      the same forward and STE gradients, with a hand-written backward that keeps only
            what it needs (below)
  fused     lean with its input path (RMSNorm, absmax, int8 codes) in one Pallas kernel
            pass (`kernels.bitlinear_quant`, GPU/TPU)
  auto      fused on GPU/TPU, lean on CPU (`registry.resolve_bitlinear_impl`)
  int8      the integer forward the paper promises: int8 activation codes x ternary weight
            codes on the int8 matmul units (`lax.dot_general`, int32 accumulator), the two
            scales applied after (`quant.integer_output`); lean's backward (STE in the compute
            dtype). Exact integers: its accumulator is the fake-quant product times sx·sw.

`quant.bitlinear` differentiated by autodiff keeps, per layer, the fp32 de-quantized
activations `xq [..., in]` (for dW), the fp32 de-quantized weights `wq [in, out]` (for dx)
and the RMSNorm intermediates. This `jax.custom_vjp` keeps instead:

    x        [..., in]   the layer input (its producer usually keeps it alive anyway, and the
                         MLGRU's i/f/g projections share one)
    r        [..., 1]    the RMSNorm factor rsqrt(mean(x^2) + eps), fp32
    codes_x  [..., in]   int8 activation codes, and their scale sx [..., 1] fp32
    (kernel)             the ternary codes and their scale are recomputed from the kernel,
                         a parameter that is alive anyway (inside the scan over layers JAX
                         forwards the per-layer kernel slice instead of stacking a copy)

Backward (docs/architecture.md §1.1, straight-through estimator, no gradient through sx or sw):

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

from mmfree_jax import registry
from mmfree_jax.kernels import bitlinear_quant, dispatch
from mmfree_jax.numerics import quant
from mmfree_jax.numerics.dtypes import acc_dtype


def _check_operands(name: str, x, kernel, dtype) -> jnp.dtype:
  """The compute dtype (default: x's) after checking `x [..., d_in]` against `kernel
  [d_in, d_out]`."""
  if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(
      f"{name}: x {x.shape} and kernel {kernel.shape} do not match ([..., d_in] and [d_in, d_out])"
    )
  return jnp.dtype(dtype or x.dtype)


def _forward(x, kernel, norm_scale, eps, dtype):
  y, (_, codes_x, sx) = quant.bitlinear_fake_quant(x, kernel, norm_scale, eps, dtype)
  r = quant.rms_factor(x.astype(acc_dtype(x.dtype)), eps)  # CSE'd with the norm's by XLA
  return y, (x, r, codes_x, sx, kernel, norm_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bitlinear_lean(x, kernel, norm_scale, eps, dtype):
  return _forward(x, kernel, norm_scale, eps, dtype)[0]


def _bitlinear_lean_fwd(x, kernel, norm_scale, eps, dtype):
  return _forward(x, kernel, norm_scale, eps, dtype)


def _bitlinear_lean_bwd(eps, dtype, residuals, dy):
  del eps  # r was saved
  x, r, codes_x, sx, kernel, norm_scale = residuals
  stat = acc_dtype(x.dtype)
  # Re-materialize the de-quantized operands (STE: the quantizers are the identity).
  # No reshape to [batch * seq, ...]: with seq split over the context axis (and batch not
  # split the same way) merging the dims would make the partitioner gather the activations.
  lead = tuple(range(x.ndim - 1))
  xq = (codes_x.astype(stat) / sx).astype(dtype)  # [..., in]
  wq = quant.fake_quantize_weights(kernel).astype(dtype)  # [in, out]
  dy = dy.astype(dtype)  # [..., out]
  d_kernel = jax.lax.dot_general(xq, dy, ((lead, lead), ((), ()))).astype(kernel.dtype)
  dxn = jnp.matmul(dy, wq.T).astype(stat)  # dy wq^T
  # RMSNorm backward in fp32 (f64 under x64): xn = (x r) gamma.
  xf = x.astype(stat)
  gamma = norm_scale.astype(stat)
  u = xf * r
  d_gamma = jnp.sum(dxn * u, axis=lead).astype(norm_scale.dtype)
  du = dxn * gamma
  dxf = r * du - xf * (r * r * r) * jnp.mean(du * xf, axis=-1, keepdims=True)
  return dxf.astype(x.dtype), d_kernel, d_gamma


_bitlinear_lean.defvjp(_bitlinear_lean_fwd, _bitlinear_lean_bwd)


def bitlinear_lean(
  x: jax.Array,
  kernel: jax.Array,
  norm_scale: jax.Array,
  *,
  eps: float = quant.BITLINEAR_NORM_EPS,
  dtype: jnp.dtype | None = None,
) -> jax.Array:
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
  dtype = _check_operands("bitlinear_lean", x, kernel, dtype)
  return _bitlinear_lean(x, kernel, norm_scale, float(eps), dtype)


def _int8_output(x, codes_w, w_mean_abs, norm_scale, eps, dtype):
  _, codes_x, sx = quant.bitlinear_input(x, norm_scale, eps)
  acc = jax.lax.dot_general(
    codes_x, codes_w, (((codes_x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )  # exact: |acc| <= 128 d_in
  return quant.integer_output(acc, w_mean_abs, sx, dtype), (codes_x, sx)


def _int8_forward(x, kernel, norm_scale, eps, dtype):
  codes_w, _ = quant.quantize_weights_ternary(kernel)
  y, (codes_x, sx) = _int8_output(x, codes_w, quant.weight_mean_abs(kernel), norm_scale, eps, dtype)
  r = quant.rms_factor(x.astype(acc_dtype(x.dtype)), eps)
  return y, (x, r, codes_x, sx, kernel, norm_scale)  # lean's residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bitlinear_int8(x, kernel, norm_scale, eps, dtype):
  return _int8_forward(x, kernel, norm_scale, eps, dtype)[0]


_bitlinear_int8.defvjp(_int8_forward, _bitlinear_lean_bwd)


def bitlinear_int8(
  x: jax.Array,
  kernel: jax.Array,
  norm_scale: jax.Array,
  *,
  eps: float = quant.BITLINEAR_NORM_EPS,
  dtype: jnp.dtype | None = None,
) -> jax.Array:
  """BitLinear with an integer forward (int8 x ternary codes, int32 accumulator) and the lean
  STE backward.

  Args:
    x: `[..., d_in]`.
    kernel: `[d_in, d_out]` latent full-precision weights.
    norm_scale: `[d_in]` RMSNorm gamma.
    eps: RMSNorm epsilon.
    dtype: output dtype and the backward's matmul dtype (default: x's dtype).
  Returns:
    `[..., d_out]` in `dtype`.
  """
  dtype = _check_operands("bitlinear_int8", x, kernel, dtype)
  return _bitlinear_int8(x, kernel, norm_scale, float(eps), dtype)


def _fused_forward(x, kernel, norm_scale, eps, dtype, platform, interpret, frozen=False):
  codes_x, sx, r = bitlinear_quant.rmsnorm_quantize(
    x, norm_scale, eps, platform=platform, interpret=interpret
  )
  xq = (codes_x.astype(sx.dtype) / sx).astype(dtype)
  wq = kernel if frozen else quant.ste_weights(kernel)
  y = jnp.matmul(xq, wq.astype(dtype))  # the compute dtype, as in quant.bitlinear_fake_quant
  return y, (x, r, codes_x, sx, kernel, norm_scale)  # lean's residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _bitlinear_fused(x, kernel, norm_scale, eps, dtype, platform, interpret):
  return _fused_forward(x, kernel, norm_scale, eps, dtype, platform, interpret)[0]


def _bitlinear_fused_bwd(eps, dtype, platform, interpret, residuals, dy):
  del platform, interpret
  return _bitlinear_lean_bwd(eps, dtype, residuals, dy)


_bitlinear_fused.defvjp(_fused_forward, _bitlinear_fused_bwd)


def bitlinear_fused(
  x: jax.Array,
  kernel: jax.Array,
  norm_scale: jax.Array,
  *,
  eps: float = quant.BITLINEAR_NORM_EPS,
  dtype: jnp.dtype | None = None,
  platform: str | None = None,
  interpret=None,
) -> jax.Array:
  """`bitlinear_lean` with its input path (RMSNorm, per-token absmax, int8 codes) in one
  Pallas kernel pass (`kernels.bitlinear_quant`); the matmul stays an XLA dot.

  Args:
    x: `[..., d_in]`.
    kernel: `[d_in, d_out]` latent full-precision weights.
    norm_scale: `[d_in]` RMSNorm gamma.
    eps: RMSNorm epsilon.
    dtype: compute dtype of the matmul (default: x's dtype).
    platform: 'gpu' or 'tpu' kernel; None = `kernels.dispatch.current_platform()` (on CPU the
      TPU kernel, interpreted, with a warning).
    interpret: see `kernels.bitlinear_quant.rmsnorm_quantize`.
  Returns:
    `[..., d_out]` in the compute dtype. The codes equal lean's; the matmul reads
    `codes / sx` where lean reads `xn + (codes / sx - xn)` (its STE form), at most one ulp
    apart before the cast to the compute dtype. The backward is lean's.
  """
  dtype = _check_operands("bitlinear_fused", x, kernel, dtype)
  platform = platform or dispatch.kernel_platform_or_interpret("bitlinear_impl=fused")
  interpret = dispatch.interpret_mode(interpret)
  return _bitlinear_fused(x, kernel, norm_scale, float(eps), dtype, platform, interpret)


def _auto(x, kernel, norm_scale, *, eps=quant.BITLINEAR_NORM_EPS, dtype=None):
  impl = registry.resolve_bitlinear_impl("auto", dispatch.current_platform())
  return IMPLS[impl](x, kernel, norm_scale, eps=eps, dtype=dtype)


def resolve_impl(impl: str) -> str:
  """`model.bitlinear_impl` as it runs on the current platform (`auto` resolved); fails early
  on an unknown impl."""
  get_bitlinear(impl)
  return registry.resolve_bitlinear_impl(impl, dispatch.current_platform())


def freeze_weights(
  kernel: jax.Array, impl: str, dtype=None, *, keep_latent: bool = False
) -> tuple[str, jax.Array, jax.Array]:
  """Quantizes a BitLinear's latent kernel once, for inference loops (a decode step would
  otherwise re-quantize every weight at every token).

  Args:
    kernel: `[..., d_in, d_out]` latent weights; leading axes (stacked layers) each get their
      own scale.
    impl: `model.bitlinear_impl`; `auto` is resolved for the current platform here.
    dtype: the layer's compute dtype (default: the kernel's).
    keep_latent: compute only the scales and return the latent kernel itself: each
      `bitlinear_frozen(..., latent=True)` call then derives the weights with the stored scale
      in one element-wise pass, and no second copy of the weights exists. For a platform
      whose dots convert their operands anyway (XLA:CPU and bf16), that pass is the
      conversion, fused.
  Returns:
    `(impl, weights, w_mean_abs)` for `bitlinear_frozen`: for int8 the ternary codes (int8)
    and `mean|W|` `[...]` fp32; for the float impls `quant.ste_weights(kernel)` cast to the
    compute dtype (the very values their forward's matmul reads, so the outputs are the same;
    an fp32 latent kernel under bf16 compute freezes to half its bytes) and `mean|W|`.
  """
  impl = resolve_impl(impl)
  weights = lambda k, m: _weights_from_latent(k, m, impl, dtype)
  mean_abs = quant.weight_mean_abs
  for _ in range(kernel.ndim - 2):
    weights, mean_abs = jax.vmap(weights), jax.vmap(mean_abs)
  kernel = jax.lax.stop_gradient(kernel)
  scale = mean_abs(kernel)
  return impl, kernel if keep_latent else weights(kernel, scale), scale


def _weights_from_latent(kernel, w_mean_abs, impl: str, dtype):
  """What `bitlinear_frozen` multiplies by: the int8 codes or the float impls' STE weights in
  the compute dtype, of `kernel [d_in, d_out]` with its stored `w_mean_abs` (0-d)."""
  sw = 1.0 / w_mean_abs  # quant.weight_scale of the kernel
  if impl == "int8":
    return quant.quantize_weights_ternary(kernel, sw)[0]
  return quant.ste_weights(kernel, sw=sw).astype(dtype or kernel.dtype)


def bitlinear_frozen(
  x: jax.Array,
  weights: jax.Array,
  w_mean_abs: jax.Array,
  norm_scale: jax.Array,
  *,
  impl: str,
  eps: float = quant.BITLINEAR_NORM_EPS,
  dtype: jnp.dtype | None = None,
  latent: bool = False,
) -> jax.Array:
  """The forward of `impl` (resolved, as `freeze_weights` returns it) on frozen weights:
  `x [..., d_in]` → `[..., d_out]` in `dtype`, equal to the latent layer's output. Forward
  only (the weights carry no gradient). latent: `weights` is the latent kernel
  (`freeze_weights(keep_latent=True)`), quantized here with the stored scale."""
  dtype = _check_operands("bitlinear_frozen", x, weights, dtype)
  if latent:
    weights = _weights_from_latent(weights, w_mean_abs, impl, dtype)
  if impl == "int8":
    return _int8_output(x, weights, w_mean_abs, norm_scale, eps, dtype)[0]
  if impl == "fused":
    platform = dispatch.kernel_platform_or_interpret("bitlinear_impl=fused")
    return _fused_forward(
      x,
      weights,
      norm_scale,
      float(eps),
      dtype,
      platform,
      dispatch.interpret_mode(None),
      frozen=True,
    )[0]
  return quant.bitlinear_fake_quant(x, weights, norm_scale, eps, dtype, frozen=True)[0]


# The `model.bitlinear_impl` registry: name (`registry.BITLINEAR_IMPLS`) ->
# `fn(x, kernel, norm_scale, *, eps, dtype)`.
IMPLS: dict[str, Callable] = {
  "autodiff": quant.bitlinear,
  "lean": bitlinear_lean,
  "int8": bitlinear_int8,
  "fused": bitlinear_fused,
  "auto": _auto,
}


def get_bitlinear(impl: str) -> Callable:
  """`fn(x, kernel, norm_scale, *, eps, dtype)` for `model.bitlinear_impl`."""
  try:
    return IMPLS[impl]
  except KeyError:
    raise ValueError(
      f"unknown bitlinear_impl {impl!r}; choose one of "
      f"{registry.BITLINEAR_IMPLS} (model.bitlinear_impl in the config)"
    ) from None
