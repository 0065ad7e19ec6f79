"""Gated linear recurrence `h_t = f_t h_{t-1} + i_t` as a Pallas kernel for TPUs (Mosaic).

recurrentgemma's Pallas LRU scan is the prior art. Features go in lanes: `[batch, seq, dim]`
is viewed as `[batch, seq, dim/128, 128]`, so one time step of a feature block is a whole
(sublane x lane) tile and time is an untiled leading axis the loop indexes freely. The grid
is `(batch, feature blocks, time blocks)`; the time axis is sequential ("arbitrary") and the
fp32 state is carried across its blocks in a VMEM scratch, so each block of `f, i` is read
from HBM once and `h` written once. The backward is the reverse-time recurrence, itself a
kernel walking the time blocks in reverse:

    dh_t = do_t + f_{t+1} dh_{t+1}   (seeded by the final state's cotangent)
    di_t = dh_t,  df_t = dh_t h_{t-1},  dh0 = f_0 dh_0

`h_{t-1}` at the first row of a time block comes from a small `[batch, blocks, dim]` array of
the block-boundary states. Residuals are `f` and the output `h` (in the output dtype): exact
for fp32 inputs; for bf16 inputs `df` sees `h` rounded to bf16. A length that the time block
does not divide is padded with `f = 1, i = 0` (the state passes through unchanged). The
reference is `mmfree_jax.numerics.recurrence.sequential` (same expressions, same order for fp32).
Document resets are the caller's `f = 0`.

Shapes: `f, i: [batch, seq, dim]` (fp32, bf16 or fp16, one dtype; dim a multiple of 128, else
the reference runs with a warning), `initial_state: [batch, dim]` or None; returns `h [batch,
seq, dim]` in i's dtype and the final state `[batch, dim]` fp32.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmfree_jax.kernels import common
from mmfree_jax.numerics.dtypes import acc_dtype

LANES = 128
# Sublane rows of 128 features per grid step: 8 rows = one fp32 vreg (1024 features).
_MAX_ROWS = 8
MAX_TIME_BLOCK = 128


class _Tiling(NamedTuple):
  time_block: int
  rows: int  # feature rows of 128 lanes per block
  # None (compiled when lowered for TPU, interpreted elsewhere), False, True (the generic
  # interpreter) or "tpu" (the TPU interpreter, pltpu.InterpretParams)
  interpret: bool | str | None


def choose_time_block(seq: int, max_block: int = MAX_TIME_BLOCK) -> int:
  """The whole sequence when short, else the largest power of two <= max_block dividing it
  (at least 8), else max_block (the sequence is then padded)."""
  if seq <= max_block:
    return seq
  block = common.largest_pow2_divisor(seq, max_block)
  return block if block >= 8 else max_block


def _interpret_arg(interpret):
  if interpret == "tpu":
    return pltpu.InterpretParams()
  return bool(interpret)


def _forward_kernel(f_ref, i_ref, h0_ref, h_ref, h_last_ref, carry_ref):
  # f_ref, i_ref, h_ref: [time_block, rows, 128]; h0_ref, h_last_ref, carry_ref: [rows, 128].
  @pl.when(pl.program_id(2) == 0)
  def _():
    carry_ref[...] = h0_ref[...]

  acc = carry_ref.dtype

  def step(t, h):
    h = f_ref[t].astype(acc) * h + i_ref[t].astype(acc)
    h_ref[t] = h.astype(h_ref.dtype)
    return h

  h = jax.lax.fori_loop(0, f_ref.shape[0], step, carry_ref[...])
  carry_ref[...] = h
  h_last_ref[...] = h  # the block index is constant over time: the last write lands


def _backward_kernel(
  f_ref, h_ref, dh_ref, h_prev_ref, dh_last_ref, df_ref, di_ref, dh0_ref, carry_ref
):
  # Time blocks arrive in reverse. carry = f_{t+1} dh_{t+1}; h_prev_ref: h before this block.
  @pl.when(pl.program_id(2) == 0)
  def _():
    carry_ref[...] = dh_last_ref[...]

  block = f_ref.shape[0]
  acc = carry_ref.dtype

  def grads(t, carry, h_prev):
    dh = dh_ref[t].astype(acc) + carry
    di_ref[t] = dh.astype(di_ref.dtype)
    df_ref[t] = (dh * h_prev).astype(df_ref.dtype)
    return f_ref[t].astype(acc) * dh

  def step(k, carry):
    t = block - 1 - k
    return grads(t, carry, h_ref[t - 1].astype(acc))

  carry = jax.lax.fori_loop(0, block - 1, step, carry_ref[...])
  carry = grads(0, carry, h_prev_ref[...])
  carry_ref[...] = carry
  dh0_ref[...] = carry


def _specs(tiling: _Tiling, n_blocks: int, reverse: bool):
  time = (lambda s: n_blocks - 1 - s) if reverse else (lambda s: s)
  seq = pl.BlockSpec(
    (None, tiling.time_block, tiling.rows, LANES), lambda b, d, s: (b, time(s), d, 0)
  )
  state = pl.BlockSpec((None, tiling.rows, LANES), lambda b, d, s: (b, d, 0))
  boundary = pl.BlockSpec((None, None, tiling.rows, LANES), lambda b, d, s: (b, time(s), d, 0))
  return seq, state, boundary


def _pallas(kernel, tiling, grid, in_specs, out_specs, out_shape, name, acc, *args):
  call = lambda interpret: pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=[pltpu.VMEM((tiling.rows, LANES), acc)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=_interpret_arg(interpret),
    name=name,
  )(*args)
  return common.run_kernel(call, compiled_on=("tpu",), interpret=tiling.interpret)


def _grid(shape, tiling):
  batch, seq, rows_total, _ = shape
  return (batch, pl.cdiv(rows_total, tiling.rows), seq // tiling.time_block)


def _forward(f, i, h0, tiling):
  # f, i: [B, T, R, 128] (T a multiple of the time block); h0: [B, R, 128] fp32.
  grid = _grid(f.shape, tiling)
  seq, state, _ = _specs(tiling, grid[2], reverse=False)
  out_shape = (jax.ShapeDtypeStruct(f.shape, i.dtype), jax.ShapeDtypeStruct(h0.shape, h0.dtype))
  return _pallas(
    _forward_kernel,
    tiling,
    grid,
    [seq, seq, state],
    [seq, state],
    out_shape,
    "mmfree_recurrence_fwd",
    h0.dtype,
    f,
    i,
    h0,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _recurrence(f, i, h0, tiling):
  return tuple(_forward(f, i, h0, tiling))


def _recurrence_fwd(f, i, h0, tiling):
  h, h_last = _forward(f, i, h0, tiling)
  return (h, h_last), (f, h, h0)  # h has i's dtype


def _recurrence_bwd(tiling, residuals, cotangents):
  f, h, h0 = residuals
  dh, dh_last = cotangents
  grid = _grid(f.shape, tiling)
  block = tiling.time_block
  # The state entering each time block: h0, then the last row of every block but the last.
  h_prev = jnp.concatenate([h0[:, None], h[:, block - 1 : -1 : block].astype(h0.dtype)], axis=1)
  seq, state, boundary = _specs(tiling, grid[2], reverse=True)
  out_shape = (
    jax.ShapeDtypeStruct(f.shape, f.dtype),
    jax.ShapeDtypeStruct(f.shape, h.dtype),
    jax.ShapeDtypeStruct(h0.shape, h0.dtype),
  )
  return tuple(
    _pallas(
      _backward_kernel,
      tiling,
      grid,
      [seq, seq, seq, boundary, state],
      [seq, seq, state],
      out_shape,
      "mmfree_recurrence_bwd",
      h0.dtype,
      f,
      h,
      dh.astype(h.dtype),
      h_prev,
      dh_last.astype(h0.dtype),
    )
  )


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def recurrence_tpu(
  f: jax.Array,
  i: jax.Array,
  initial_state: jax.Array | None = None,
  *,
  interpret: bool | str | None = None,
  time_block: int | None = None,
  fallback: Callable | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`h_t = f_t h_{t-1} + i_t` with the Mosaic kernel (module docstring for shapes).

  Args:
    f, i: `[batch, seq, dim]`, one dtype of fp32 / bf16 / fp16, dim a multiple of 128.
    initial_state: `[batch, dim]` (used in fp32) or None (zeros).
    interpret: None (the compiled kernel when the program is lowered for TPU, also AOT from
      a CPU host; Pallas' interpreter elsewhere), False (always compile for TPU), True (the
      generic interpreter) or "tpu" (the TPU interpreter, `pltpu.InterpretParams()`).
    time_block: steps per grid step; default `choose_time_block(seq)`.
    fallback: `fn(f, i, initial_state)` run (with a `KernelFallbackWarning`) for inputs the
      kernel cannot take (the registry passes `numerics.recurrence.sequential`); None raises a
      ValueError naming the reason instead.
  Returns:
    `(h [batch, seq, dim] in i's dtype, final_state [batch, dim] fp32)`.
  """
  batch, seq, dim = common.check_recurrence_shapes(f, i, initial_state)
  reason = common.unsupported_dtype(f, i, interpret=interpret)
  if reason is None and dim % LANES:
    reason = (
      f"feature dim {dim} is not a multiple of the {LANES} TPU lanes (make d_model a "
      f"multiple of {LANES})"
    )
  if reason is None and seq == 0:
    reason = "empty sequence"
  if reason is not None:
    return common.fall_back("recurrence_tpu", reason, fallback, f, i, initial_state)
  if time_block is None:
    time_block = choose_time_block(seq)
  elif not isinstance(time_block, int) or time_block < 1:
    raise ValueError(f"time_block must be a positive int; got {time_block!r}")
  rows_total = dim // LANES
  tiling = _Tiling(time_block, min(_MAX_ROWS, rows_total), interpret)
  acc = acc_dtype(f.dtype)
  h0 = jnp.zeros((batch, dim), acc) if initial_state is None else initial_state.astype(acc)
  pad = common.round_up(seq, time_block) - seq
  if pad:  # f = 1, i = 0: the state passes through the padded tail unchanged
    f = jnp.concatenate([f, jnp.ones((batch, pad, dim), f.dtype)], axis=1)
    i = jnp.concatenate([i, jnp.zeros((batch, pad, dim), i.dtype)], axis=1)
  lanes = lambda x: x.reshape(*x.shape[:-1], rows_total, LANES)
  h, h_last = _recurrence(lanes(f), lanes(i), lanes(h0), tiling)
  h = h.reshape(batch, seq + pad, dim)[:, :seq]
  return h, h_last.reshape(batch, dim)
