"""The `model.scan_type` registry for the MLGRU recurrence `h_t = f_t * h_{t-1} + i_t`.

Shapes and dtypes as in `numerics.recurrence`, which holds the pure-JAX implementations:

- `sequential`, `associative`, `chunked`, `sequential_custom_vjp`: `numerics.recurrence`.
- `pallas`: the Pallas kernel (`kernels/`) of the platform the program is built for (Triton on
  GPU, Mosaic on TPU; `kernels.dispatch.current_platform`), forward and reverse-time backward
  in one pass each, sharded with `shard_map`. On CPU it runs the TPU kernel interpreted (tests).
- `auto` (default): `pallas` on GPU/TPU, `sequential` on CPU (`registry.resolve_scan_type`).

The names are `registry.SCAN_TYPES` (jax-free, read by the config); `IMPLS` maps each to its
function. Under a mesh whose `context` axis splits the sequence (`parallel.sharding.
logical_sharding` with `activation_seq -> context`), every one of them runs per sequence shard
with the states passed between shards (`parallel.context_scan`).
"""

from __future__ import annotations

import functools
from typing import Callable

from mmfree_jax import registry
from mmfree_jax.kernels import dispatch
from mmfree_jax.numerics.recurrence import associative, chunked, sequential, sequential_custom_vjp
from mmfree_jax.parallel import context_scan, kernel_sharding


def pallas(f, i, initial_state=None):
  """The Pallas kernel for the current platform; inputs it cannot take (see the kernels) run
  `sequential` with a one-line warning. Shapes as in the module docstring."""
  platform = dispatch.kernel_platform_or_interpret("scan_type=pallas")
  return dispatch.recurrence(f, i, initial_state, platform=platform, fallback=sequential)


def _auto(f, i, h0=None, *, chunk_size):
  if f.shape[1] == 1:  # a decode step: one fused XLA op beats a kernel launch per token
    return sequential(f, i, h0)
  name = registry.resolve_scan_type("auto", dispatch.current_platform())
  return IMPLS[name](f, i, h0, chunk_size=chunk_size)


# name (`registry.SCAN_TYPES`) -> `fn(f, i, initial_state=None, *, chunk_size)`.
IMPLS: dict[str, Callable] = {
  "sequential": lambda f, i, h0=None, *, chunk_size: sequential(f, i, h0),
  "associative": lambda f, i, h0=None, *, chunk_size: associative(f, i, h0),
  "chunked": chunked,
  "sequential_custom_vjp": lambda f, i, h0=None, *, chunk_size: sequential_custom_vjp(f, i, h0),
  "pallas": lambda f, i, h0=None, *, chunk_size: pallas(f, i, h0),
  "auto": _auto,
}


def get_recurrence(scan_type: str, chunk_size: int = 64) -> Callable:
  """Returns `fn(f, i, initial_state=None) -> (h, final_state)` for a `scan_type` name."""
  try:
    impl = IMPLS[scan_type]
  except KeyError:
    raise ValueError(
      f"unknown scan_type {scan_type!r}; choose one of {registry.SCAN_TYPES} "
      "(model.scan_type in the config)"
    ) from None
  return functools.partial(_split_over_context, functools.partial(impl, chunk_size=chunk_size))


def _split_over_context(fn, f, i, initial_state=None):
  """`fn` over the whole sequence, or, when the active `parallel.kernel_sharding` (the
  trainer's `logical_sharding`) puts the sequence on mesh axes it divides, per sequence shard
  with the states passed between them (`parallel.context_scan`)."""
  split = kernel_sharding.seq_split(f.shape[1])
  if split is None:  # e.g. a decode step or a ragged prompt: unsplit
    return fn(f, i, initial_state)
  active = split[0]
  return context_scan.context_recurrence(
    fn,
    f,
    i,
    initial_state,
    mesh=active.mesh,
    context_axis=active.seq_axes,
    batch_axes=active.batch_axes,
    feature_axes=active.feature_axes,
  )


def linear_recurrence(
  f, i, initial_state=None, *, scan_type: str = "sequential", chunk_size: int = 64
):
  """`h_t = f_t * h_{t-1} + i_t` with the named implementation.

  Args:
    f: `[batch, seq, dim]` forget gates.
    i: `[batch, seq, dim]` inputs.
    initial_state: `[batch, dim]` or None (zeros).
  Returns:
    h `[batch, seq, dim]` in i's dtype, final state `[batch, dim]` fp32.
  """
  return get_recurrence(scan_type, chunk_size)(f, i, initial_state)
