"""Gated linear recurrence `h_t = f_t h_{t-1} + i_t` as a Pallas kernel for GPUs (Triton).

The shape of fla's `fused_recurrent_hgrn`: the grid is batch x feature blocks, each program
walks the whole sequence with its block of the state in registers (fp32), reading `f_t, i_t`
and writing `h_t` once. The backward is the reverse-time recurrence, itself a kernel:

    dh_t = do_t + f_{t+1} dh_{t+1}   (dh_T seeded by the final state's cotangent)
    di_t = dh_t,  df_t = dh_t h_{t-1},  dh0 = f_0 dh_0

Residuals are `f` and the output `h` (in the output dtype, as fla): exact for fp32 inputs; for
bf16 inputs `df` sees `h` rounded to bf16. The pure-JAX reference is
`mmfree_jax.numerics.recurrence.sequential`; with fp32 inputs both compute the very same
expressions in the same order. Document resets are the caller's `f = 0`.

Shapes: `f, i: [batch, seq, dim]` (fp32, bf16 or fp16, one dtype), `initial_state: [batch,
dim]` or None; returns `h [batch, seq, dim]` in i's dtype and the final state `[batch, dim]`
fp32. Any `seq`; a `dim` without a power-of-two factor of 16 is padded to a multiple of 32.
`interpret=True` runs the kernel on any backend (tests on CPU); the default runs the compiled
kernel when lowered for a GPU and the interpreter elsewhere.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.kernels import common
from mmfree_jax.numerics.dtypes import acc_dtype

GPU_PLATFORMS = ("cuda", "rocm")  # lowering platforms Pallas compiles through Triton
# Two programs per SM of an H100/H200 (132 SMs) before a feature block grows past 32.
_TARGET_PROGRAMS = 264


class _Tiling(NamedTuple):
  block_d: int
  num_warps: int
  interpret: bool | None  # None: compiled when lowered for a GPU, interpreted elsewhere


def choose_block_d(batch: int, dim: int) -> int:
  """Feature block: a power of two dividing dim, at most 128, small enough to fill the GPU."""
  block = common.largest_pow2_divisor(dim, 128)
  while block > 32 and batch * (dim // block) < _TARGET_PROGRAMS:
    block //= 2
  return block


def _forward_kernel(f_ref, i_ref, h0_ref, h_ref, h_last_ref):
  # f_ref, i_ref, h_ref: [seq, block_d]; h0_ref, h_last_ref: [block_d] in the state dtype.
  acc = h0_ref.dtype

  def step(t, h):
    h = f_ref[t, :].astype(acc) * h + i_ref[t, :].astype(acc)
    h_ref[t, :] = h.astype(h_ref.dtype)
    return h

  h_last_ref[...] = jax.lax.fori_loop(0, f_ref.shape[0], step, h0_ref[...])


def _backward_kernel(f_ref, h_ref, dh_ref, h0_ref, dh_last_ref, df_ref, di_ref, dh0_ref):
  seq = f_ref.shape[0]
  h0 = h0_ref[...]
  acc = h0.dtype

  def step(k, carry):  # carry = f_{t+1} dh_{t+1}
    t = seq - 1 - k
    dh = dh_ref[t, :].astype(acc) + carry
    di_ref[t, :] = dh.astype(di_ref.dtype)
    h_prev = jnp.where(t > 0, h_ref[jnp.maximum(t - 1, 0), :].astype(acc), h0)
    df_ref[t, :] = (dh * h_prev).astype(df_ref.dtype)
    return f_ref[t, :].astype(acc) * dh

  dh0_ref[...] = jax.lax.fori_loop(0, seq, step, dh_last_ref[...])


def _call(
  kernel,
  tiling: _Tiling,
  args,
  out_shape,
  n_seq_in: int,
  n_state_in: int,
  n_seq_out: int,
  n_state_out: int,
):
  batch, seq, dim = args[0].shape
  seq_spec = pl.BlockSpec((None, seq, tiling.block_d), lambda b, d: (b, 0, d))
  state_spec = pl.BlockSpec((None, tiling.block_d), lambda b, d: (b, d))
  call = lambda interpret: pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(batch, dim // tiling.block_d),
    in_specs=[seq_spec] * n_seq_in + [state_spec] * n_state_in,
    out_specs=[seq_spec] * n_seq_out + [state_spec] * n_state_out,
    compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=1),
    interpret=bool(interpret),
    name="mmfree_recurrence_fwd" if kernel is _forward_kernel else "mmfree_recurrence_bwd",
  )(*args)
  return common.run_kernel(call, compiled_on=GPU_PLATFORMS, interpret=tiling.interpret)


def _forward(f, i, h0, tiling):
  batch, seq, dim = f.shape
  out_shape = (
    jax.ShapeDtypeStruct((batch, seq, dim), i.dtype),
    jax.ShapeDtypeStruct((batch, dim), h0.dtype),
  )
  return _call(_forward_kernel, tiling, (f, i, h0), out_shape, 2, 1, 1, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _recurrence(f, i, h0, tiling):
  return tuple(_forward(f, i, h0, tiling))


def _recurrence_fwd(f, i, h0, tiling):
  h, h_last = _forward(f, i, h0, tiling)
  return (h, h_last), (f, h, h0)  # h has i's dtype


def _recurrence_bwd(tiling, residuals, cotangents):
  f, h, h0 = residuals
  dh, dh_last = cotangents
  out_shape = (
    jax.ShapeDtypeStruct(f.shape, f.dtype),
    jax.ShapeDtypeStruct(f.shape, h.dtype),
    jax.ShapeDtypeStruct(h0.shape, h0.dtype),
  )
  df, di, dh0 = _call(
    _backward_kernel,
    tiling,
    (f, h, dh.astype(h.dtype), h0, dh_last.astype(h0.dtype)),
    out_shape,
    3,
    2,
    2,
    1,
  )
  return df, di, dh0


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def recurrence_gpu(
  f: jax.Array,
  i: jax.Array,
  initial_state: jax.Array | None = None,
  *,
  interpret: bool | None = None,
  block_d: int | None = None,
  num_warps: int | None = None,
  fallback: Callable | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`h_t = f_t h_{t-1} + i_t` with the Triton kernel (module docstring for shapes).

  Args:
    f, i: `[batch, seq, dim]`, one dtype of fp32 / bf16 / fp16.
    initial_state: `[batch, dim]` (any float dtype, used in fp32) or None (zeros).
    interpret: None (the compiled kernel when the program is lowered for a GPU, also AOT from a
      CPU host; Pallas' interpreter elsewhere), False (always compile) or True (interpret).
    block_d: feature block (a power of two dividing dim); default `choose_block_d`.
    num_warps: Triton warps per program; default 1 per 64 features.
    fallback: `fn(f, i, initial_state)` run (with a `KernelFallbackWarning`) for inputs the
      kernel cannot take (the registry passes `numerics.recurrence.sequential`); None raises a
      ValueError naming the reason instead.
  Returns:
    `(h [batch, seq, dim] in i's dtype, final_state [batch, dim] fp32)`.
  """
  batch, seq, dim = common.check_recurrence_shapes(f, i, initial_state)
  reason = common.unsupported_dtype(f, i, interpret=interpret)
  if reason is None and seq == 0:
    reason = "empty sequence"
  if reason is not None:
    return common.fall_back("recurrence_gpu", reason, fallback, f, i, initial_state)
  acc = acc_dtype(f.dtype)
  h0 = jnp.zeros((batch, dim), acc) if initial_state is None else initial_state.astype(acc)
  pad = 0
  if block_d is None:
    if common.largest_pow2_divisor(dim, 16) < 16:  # e.g. dim = 100: pad to a multiple of 32
      pad = common.round_up(dim, 32) - dim
    block_d = choose_block_d(batch, dim + pad)
  elif block_d & (block_d - 1) or dim % block_d:
    raise ValueError(f"block_d={block_d} must be a power of two dividing dim={dim}")
  if pad:  # padded features: f = i = 0, state 0; sliced off below
    widen = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    f, i, h0 = widen(f), widen(i), widen(h0)
  tiling = _Tiling(
    block_d, num_warps or max(1, block_d // 64), None if interpret is None else bool(interpret)
  )
  h, h_last = _recurrence(f, i, h0, tiling)
  if pad:
    h, h_last = h[..., :dim], h_last[..., :dim]
  return h, h_last
