"""Fused BitLinear input path as Pallas kernels: RMSNorm + per-token int8 absmax in one pass.

Per row (token) of `x [N, d]`, reading `x` once (statistics in fp32):

    r     = rsqrt(mean(x^2) + eps)                 [N, 1] fp32 (kept for the backward)
    xn    = x r gamma
    scale = 127 / max(max|xn|, 1e-5)               [N, 1] fp32
    codes = clip(round_half_away(xn scale), -128, 127)   [N, d] int8

the formulas of `numerics.quant.rms_norm` and `numerics.quant.quantize_activations_int8` (the
pure-JAX reference, `rmsnorm_quantize_reference`), in the same order. The matmul stays an XLA
dot. GPU: a block of rows per program (narrow rows share one), each row padded to a power of two
with masked loads. TPU: blocks of rows with the whole row in lanes. Statistics are fp32 (f64 for
f64 inputs, interpret mode only).

How equal: every step is element-wise or a max except the row sum of squares, whose order is the
compiler's. Interpreted on CPU with a power-of-two d, the kernels (GPU and TPU) and the reference
sum in the same order: r, scale and codes are bitwise equal (tests/test_kernels.py, 1e5 rows per
dtype). With another d, XLA orders the reference's row sum and the kernel's (zero-padded to a
power of two on GPU) differently: r may move by an ulp, and a code whose `xn * scale` lies within
a few ulps of a half-integer may flip by one (measured 0-1 flips in 4.8M codes at d=48 and in
7.7M at d=384; the test bounds the rate at 1e-5). Compiled, Triton and Mosaic pick their own
reduction order (and fused multiply-adds), so expect the same: a flip only at a rounding
boundary, never more than one code step (not measured on a device here).

`ops.bitlinear.bitlinear_fused` (`model.bitlinear_impl=fused`) runs it in the forward, with
the memory-lean backward (same residuals: x, r, codes, scale).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.kernels import common
from mmfree_jax.numerics import quant
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.parallel import kernel_sharding

PLATFORMS = ("gpu", "tpu")
GPU_PLATFORMS = ("cuda", "rocm")  # lowering platforms Pallas compiles through Triton
# Rows per TPU block: a multiple of 32 (int8 tiles are 32 x 128), about 2 MiB of fp32 rows.
_TPU_BLOCK_BYTES = 2 * 1024 * 1024
_TPU_MAX_ROWS = 512
# Values a GPU program holds (rows x padded features): one row of up to 4096, or several
# narrower ones.
_GPU_BLOCK_ELEMENTS = 16384
# A row lives in registers (GPU) or 32 rows in VMEM (TPU): wider rows run the reference.
MAX_FEATURES = 16384


def _round_half_away(v):
  """`quant.round_half_away_from_zero` without `round` (Triton has none): `t = trunc(v)`, and
  one step away from zero when `|v - t| >= 0.5`. `v - trunc(v)` is exact for every float, so
  the result equals the reference's for every input (tested)."""
  t = jnp.trunc(v)
  away = jnp.where(v > 0, 1.0, -1.0).astype(v.dtype)
  return jnp.where(jnp.abs(v - t) >= 0.5, t + away, t)


def _quantize_rows(x, gamma, eps, acc):
  """x: [rows, d] (loaded), gamma: [1, d] → (codes, scale [rows, 1], r [rows, 1]) in acc."""
  x = x.astype(acc)
  r = quant.rms_factor(x, eps)
  xn = x * r * gamma.astype(acc)
  amax = jnp.max(jnp.abs(xn), axis=-1, keepdims=True)
  scale = quant.ACT_QMAX / jnp.maximum(amax, quant.ACT_SCALE_FLOOR)
  codes = jnp.clip(_round_half_away(xn * scale), quant.ACT_QMIN, quant.ACT_QMAX)
  return codes, scale, r


def rmsnorm_quantize_reference(x: jax.Array, gamma: jax.Array, eps: float):
  """Pure JAX (`numerics.quant.bitlinear_input`, `numerics.quant.rms_factor`): `x [..., d]`,
  `gamma [d]` → codes int8 `[..., d]`, scale and r fp32 `[..., 1]`."""
  _, codes, scale = quant.bitlinear_input(x, gamma, eps)
  return codes, scale, quant.rms_factor(x.astype(acc_dtype(x.dtype)), eps)


def _tpu_kernel(x_ref, g_ref, codes_ref, scale_ref, r_ref, *, eps):
  codes, scale, r = _quantize_rows(x_ref[...], g_ref[...], eps, scale_ref.dtype)
  codes_ref[...] = codes.astype(jnp.int32).astype(jnp.int8)
  scale_ref[...] = scale
  r_ref[...] = r


def _gpu_kernel(x_ref, g_ref, codes_ref, scale_ref, r_ref, *, eps, n, d, d_pow2):
  # A block of rows per program, each padded to d_pow2 lanes with zeros (they change no sum or
  # max); rows of a ragged last block past n are masked (Triton does not mask them itself).
  rows = x_ref.shape[0]
  cols = pl.ds(0, d_pow2)
  rows_in = (pl.program_id(0) * rows + jnp.arange(rows) < n)[:, None]
  cols_in = (jnp.arange(d_pow2) < d)[None, :]
  x = plgpu.load(x_ref.at[:, cols], mask=rows_in & cols_in, other=0.0)
  g = plgpu.load(g_ref.at[cols], mask=cols_in[0], other=0.0)[None]
  acc = scale_ref.dtype
  xf = x.astype(acc)
  # The mean over the true d (the padded zeros add nothing to the sum).
  r = jax.lax.rsqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True) / d + eps)
  xn = xf * r * g.astype(acc)
  amax = jnp.max(jnp.abs(xn), axis=-1, keepdims=True)
  scale = quant.ACT_QMAX / jnp.maximum(amax, quant.ACT_SCALE_FLOOR)
  codes = jnp.clip(_round_half_away(xn * scale), quant.ACT_QMIN, quant.ACT_QMAX)
  plgpu.store(codes_ref.at[:, cols], codes.astype(jnp.int8), mask=rows_in & cols_in)
  plgpu.store(scale_ref.at[:, :], scale, mask=rows_in)
  plgpu.store(r_ref.at[:, :], r, mask=rows_in)


def _tpu_rows(n: int, d: int) -> int:
  rows = max(32, min(_TPU_MAX_ROWS, _TPU_BLOCK_BYTES // (4 * d)) // 32 * 32)
  return n if n <= rows else rows


def _out_shapes(n, d, dtype):
  acc = acc_dtype(dtype)
  return (
    jax.ShapeDtypeStruct((n, d), jnp.int8),
    jax.ShapeDtypeStruct((n, 1), acc),
    jax.ShapeDtypeStruct((n, 1), acc),
  )


def _call_tpu(x2, gamma, eps, interpret):
  n, d = x2.shape
  rows = _tpu_rows(n, d)
  row_block = pl.BlockSpec((rows, d), lambda r: (r, 0))
  stat_block = pl.BlockSpec((rows, 1), lambda r: (r, 0))
  call = lambda interpret: pl.pallas_call(
    functools.partial(_tpu_kernel, eps=eps),
    out_shape=_out_shapes(n, d, x2.dtype),
    grid=(pl.cdiv(n, rows),),
    in_specs=[row_block, pl.BlockSpec((1, d), lambda r: (0, 0))],
    out_specs=[row_block, stat_block, stat_block],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    interpret=pltpu.InterpretParams() if interpret == "tpu" else bool(interpret),
    name="mmfree_rmsnorm_quantize",
  )(x2, gamma.reshape(1, d))
  return common.run_kernel(call, compiled_on=("tpu",), interpret=interpret)


def _call_gpu(x2, gamma, eps, interpret):
  n, d = x2.shape
  d_pow2 = pl.next_power_of_2(d)
  # Rows per program: about _GPU_BLOCK_ELEMENTS values, so narrow rows share a program.
  rows = max(1, min(pl.next_power_of_2(n), _GPU_BLOCK_ELEMENTS // d_pow2))
  row = pl.BlockSpec((rows, d), lambda r: (r, 0))
  stat = pl.BlockSpec((rows, 1), lambda r: (r, 0))
  call = lambda interpret: pl.pallas_call(
    functools.partial(_gpu_kernel, eps=eps, n=n, d=d, d_pow2=d_pow2),
    out_shape=_out_shapes(n, d, x2.dtype),
    grid=(pl.cdiv(n, rows),),
    in_specs=[row, pl.BlockSpec((d,), lambda r: (0,))],
    out_specs=[row, stat, stat],
    compiler_params=plgpu.CompilerParams(
      num_warps=min(8, max(1, rows * d_pow2 // 512)), num_stages=1
    ),
    interpret=bool(interpret),
    name="mmfree_rmsnorm_quantize",
  )(x2, gamma)
  return common.run_kernel(call, compiled_on=GPU_PLATFORMS, interpret=interpret)


def rmsnorm_quantize(
  x: jax.Array,
  gamma: jax.Array,
  eps: float = quant.BITLINEAR_NORM_EPS,
  *,
  platform: str,
  interpret: bool | str | None = None,
):
  """Fused RMSNorm + int8 absmax quantization (module docstring).

  Args:
    x: `[..., d]` fp32 / bf16 / fp16.
    gamma: `[d]` RMSNorm scale.
    eps: RMSNorm epsilon.
    platform: 'gpu' (Triton) or 'tpu' (Mosaic) kernel.
    Under `parallel.kernel_sharding.kernel_sharding(mesh)` it runs per shard of x's leading dim.
    interpret: None (the compiled kernel when the program is lowered for `platform`, also AOT
      from a CPU host; Pallas' interpreter elsewhere), False (always compile), True (the
      generic interpreter) or "tpu" (the TPU interpreter; platform 'tpu' only).
  Returns:
    codes int8 `[..., d]`, scale fp32 `[..., 1]` (x·r·gamma ≈ codes / scale), r fp32 `[..., 1]`;
    equal to the reference's as the module docstring says.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}; got {platform!r}")
  d = x.shape[-1]
  if gamma.shape != (d,):
    raise ValueError(f"gamma must be [d] = ({d},); got {gamma.shape}")
  reason = common.unsupported_dtype(x, interpret=interpret)
  if reason is None and x.size == 0:
    reason = "empty input"
  if reason is None and d > MAX_FEATURES:
    reason = f"rows of {d} features exceed the kernel's {MAX_FEATURES}"
  if reason is not None:  # the reference is numerics.quant: always there to fall back on
    common.warn_fallback(f"rmsnorm_quantize[{platform}]", reason)
    return rmsnorm_quantize_reference(x, gamma, eps)
  call = _call_gpu if platform == "gpu" else _call_tpu

  def local(x, gamma):  # one shard: rows of x whole
    codes, scale, r = call(x.reshape(-1, d), gamma, float(eps), interpret)
    lead = x.shape[:-1]
    return codes.reshape(*lead, d), scale.reshape(*lead, 1), r.reshape(*lead, 1)

  if x.ndim == 1:
    return local(x, gamma)
  return kernel_sharding.rowwise(local, x, gamma)
