"""What the Pallas kernels share: the supported dtypes, the fallback warning, small helpers.

A kernel asked for something it cannot run (a dtype it was not written for, a shape it cannot
tile) never shows the user a Triton/Mosaic trace: it falls back to its pure-JAX reference (the
registries in `ops` pass it in) and says why in one `KernelFallbackWarning` line, or, called
without a fallback, raises a ValueError that names the fix.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

# Inputs the kernels load and upcast to their fp32 state/statistics.
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class KernelFallbackWarning(UserWarning):
  """A Pallas kernel could not run these inputs; the pure-JAX reference ran instead."""


def warn_fallback(kernel: str, reason: str) -> None:
  """One line: which kernel, why, and that the reference runs instead."""
  warnings.warn(
    f"{kernel}: {reason}; running the pure-JAX reference instead",
    KernelFallbackWarning,
    stacklevel=3,
  )


def fall_back(kernel: str, reason: str, fallback: Callable | None, *args):
  """`fallback(*args)` after the one-line warning, or a ValueError with the reason if there
  is no fallback (a kernel called directly)."""
  if fallback is None:
    raise ValueError(f"{kernel}: {reason}")
  warn_fallback(kernel, reason)
  return fallback(*args)


def unsupported_dtype(*arrays, interpret=None) -> str | None:
  """A reason string when the arrays' dtypes differ or one is not a kernel dtype, else None.

  float64 (state and statistics in f64, for the f64 reference tests) is accepted only in an
  explicit interpret mode: Mosaic has no f64 and the compiled kernels are written for fp32.
  """
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if len(dtypes) != 1:
    return f"mixed input dtypes {sorted(str(d) for d in dtypes)} (cast them to one dtype)"
  (dtype,) = dtypes
  if dtype == jnp.float64 and interpret:
    return None
  if dtype not in KERNEL_DTYPES:
    return (
      f"dtype {dtype} is not supported (kernels take {', '.join(str(d) for d in KERNEL_DTYPES)})"
    )
  return None


def check_recurrence_shapes(f, i, initial_state) -> tuple[int, int, int]:
  """`(batch, seq, dim)` of `f, i: [batch, seq, dim]`; a ValueError for mismatched shapes or an
  `initial_state` that is not `[batch, dim]` (the same checks as `ops.recurrence`)."""
  if f.shape != i.shape or f.ndim != 3:
    raise ValueError(
      f"recurrence expects f and i of the same shape [batch, seq, dim]; got "
      f"f{f.shape} and i{i.shape}"
    )
  batch, seq, dim = f.shape
  if initial_state is not None and initial_state.shape != (batch, dim):
    raise ValueError(
      f"initial_state must be [batch, dim] = {(batch, dim)}; got {initial_state.shape}"
    )
  return batch, seq, dim


def largest_pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two that divides n and is at most cap."""
  block = 1
  while block * 2 <= cap and n % (block * 2) == 0:
    block *= 2
  return block


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def run_kernel(call: Callable, *, compiled_on: tuple[str, ...], interpret):
  """Runs `call(interpret_arg)`, a pallas_call wrapper.

  `interpret=None` decides when lowering (`lax.platform_dependent`): the compiled kernel where
  the program is lowered for one of `compiled_on` (e.g. ('tpu',), also for an AOT target from
  a CPU host), Pallas' interpreter on CPU (tests), and a ValueError for any other platform
  (lowering for CUDA from a CPU host without `dispatch.kernel_platform("gpu")` would otherwise
  embed the interpreted TPU kernel in the GPU program). Any other value is passed through.
  """
  if interpret is not None:
    return call(interpret)
  branches = {platform: functools.partial(call, False) for platform in compiled_on}
  branches.setdefault("cpu", functools.partial(call, True))
  refuse = lambda: jax.tree.map(
    functools.partial(_refuse_p.bind, compiled_on=compiled_on), call(True)
  )
  return jax.lax.platform_dependent(**branches, default=refuse)


def _refuse_lowering(ctx, x, *, compiled_on):
  platforms = ", ".join(ctx.module_context.platforms)
  raise ValueError(
    f"a Pallas kernel compiled for {'/'.join(compiled_on)} is being lowered for {platforms}, "
    "where only Pallas' slow interpreter could run it; lower inside "
    "`mmfree_jax.kernels.dispatch.kernel_platform('gpu')` (or 'tpu') to get that "
    "platform's kernel, or choose a pure-JAX scan_type / bitlinear_impl / attention_impl"
  )


# Identity that refuses to lower: marks an interpreted kernel on a platform it must not reach.
_refuse_p = jax.extend.core.Primitive("mmfree_interpreted_kernel_refused")
_refuse_p.def_abstract_eval(lambda x, **_: x)
_refuse_p.def_impl(lambda x, **_: x)
mlir.register_lowering(_refuse_p, _refuse_lowering)
# Gradients and vmap pass through: the marked forward already refuses to lower.
ad.primitive_jvps[_refuse_p] = lambda primals, tangents, **kw: (
  _refuse_p.bind(*primals, **kw),
  tangents[0],
)
batching.primitive_batchers[_refuse_p] = lambda args, dims, **kw: (
  _refuse_p.bind(*args, **kw),
  dims[0],
)
