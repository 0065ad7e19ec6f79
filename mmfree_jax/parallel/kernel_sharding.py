"""Running the Pallas kernels under a device mesh (`jax.shard_map`).

XLA cannot partition a Mosaic or Triton custom call ("Mosaic kernels cannot be automatically
partitioned"), so each kernel runs per shard inside `shard_map`:

- the recurrence is element-wise over batch and features: `f, i, h [batch, seq, dim]` are split
  as `(batch_axes, None, feature_axes)` and the states `[batch, dim]` as `(batch_axes,
  feature_axes)`; time stays whole, so there is no communication at all;
- the quantizer reduces over a row: `x [..., d]` is split over its rows (`batch_axes` on the
  leading dim) with `d` whole on every shard (a `d` sharded elsewhere is gathered first);
- attention over whole windows is independent per example and per head: q, k, v `[batch, seq,
  heads, head_dim]` are split as `(batch_axes, None, feature_axes, None)`.

The mesh comes from `kernel_sharding(...)` (the trainer enters it through
`parallel.sharding.logical_sharding`) or is passed explicitly. A dimension the mesh axes do not
divide is replicated (each shard computes it whole: still correct). Without a mesh, or on a
single device, the kernel runs as is.

Placement: the kernels (`kernels/`) call these wrappers, so this module, and `parallel/` with
it, sits below `kernels/` in the import layers; the wrappers take the kernel as a function
argument and import nothing from the package (tests/test_architecture.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Axes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class KernelSharding:
  """Where the kernels' batch and feature dims live on `mesh`; `seq_axes`: where the sequence
  is split (context parallelism: `ops.recurrence` then runs `parallel.context_scan`)."""

  mesh: Mesh
  batch_axes: Axes = ("data", "fsdp")
  feature_axes: Axes = "tensor"
  seq_axes: Axes = None


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mmfree_kernel_sharding", default=None)
# The mesh of a sharding `suspended()` inside its own shard_map: still the devices the kernels
# are built for (an AOT compile for TPU from a CPU host would otherwise pick the CPU paths).
_SUSPENDED_MESH: contextvars.ContextVar = contextvars.ContextVar(
  "mmfree_kernel_sharding_suspended_mesh", default=None
)


@contextlib.contextmanager
def kernel_sharding(
  mesh: Mesh,
  batch_axes: Axes = ("data", "fsdp"),
  feature_axes: Axes = "tensor",
  seq_axes: Axes = None,
):
  """Kernels traced inside the block run per shard of `mesh` (module docstring).

  It is read while tracing, and `jax.jit` caches traces by function and argument types only:
  enter it inside the jitted function (as `train.steps` does with `logical_sharding`).
  """
  token = _ACTIVE.set(KernelSharding(mesh, batch_axes, feature_axes, seq_axes))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def suspended():
  """Kernels traced inside the block run as is: for code already inside a `shard_map`. The
  mesh stays known to `mesh()` (the kernels' platform is its devices')."""
  outer = _ACTIVE.get()
  mesh_token = _SUSPENDED_MESH.set(outer.mesh if outer is not None else _SUSPENDED_MESH.get())
  token = _ACTIVE.set(None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)
    _SUSPENDED_MESH.reset(mesh_token)


def active() -> KernelSharding | None:
  return _ACTIVE.get()


def mesh() -> Mesh | None:
  """The mesh of the active sharding, or of the one suspended around this code (inside its
  shard_map), else None: its devices are the platform the kernels are traced for."""
  sharding = _ACTIVE.get()
  return sharding.mesh if sharding is not None else _SUSPENDED_MESH.get()


def seq_split(seq: int) -> tuple[KernelSharding, int] | None:
  """`(active sharding, shards)` when the active sharding splits a `seq`-long sequence over
  its `seq_axes` (more than one shard, dividing `seq`), else None: a decode step or a ragged
  prompt runs unsplit."""
  shards = seq_shards()
  if shards == 1 or seq % shards:
    return None
  return _ACTIVE.get(), shards


def seq_shards() -> int:
  """How many shards the active sharding splits a sequence into (1 when it does not)."""
  sharding = _ACTIVE.get()
  if sharding is None or sharding.seq_axes is None:
    return 1
  return _axes_size(sharding.mesh, sharding.seq_axes)


def _axes_size(mesh: Mesh, axes: Axes) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _fit(mesh: Mesh, axes: Axes, size: int) -> Axes:
  """The axes when their product divides `size`, else None (replicated)."""
  return axes if size % _axes_size(mesh, axes) == 0 else None


def _get(sharding: KernelSharding | None) -> KernelSharding | None:
  sharding = sharding or _ACTIVE.get()
  if sharding is None or sharding.mesh.size == 1:
    return None
  return sharding


def recurrence(
  fn: Callable,
  f: jax.Array,
  i: jax.Array,
  initial_state: jax.Array | None = None,
  *,
  sharding: KernelSharding | None = None,
):
  """`fn(f, i, initial_state) -> (h, final_state)` per shard; shapes as in `ops.recurrence`."""
  sharding = _get(sharding)
  if sharding is None:
    return fn(f, i, initial_state)
  batch, _, dim = f.shape
  b = _fit(sharding.mesh, sharding.batch_axes, batch)
  d = _fit(sharding.mesh, sharding.feature_axes, dim)
  seq_spec, state_spec = P(b, None, d), P(b, d)
  if initial_state is None:
    body, args, in_specs = (lambda f, i: fn(f, i, None)), (f, i), (seq_spec, seq_spec)
  else:
    body, args = fn, (f, i, initial_state)
    in_specs = (seq_spec, seq_spec, state_spec)
  return jax.shard_map(
    body, mesh=sharding.mesh, in_specs=in_specs, out_specs=(seq_spec, state_spec), check_vma=False
  )(*args)


def rowwise(
  fn: Callable, x: jax.Array, *replicated: jax.Array, sharding: KernelSharding | None = None
):
  """`fn(x, *replicated) -> outputs [..., k]` per shard of x's rows (the leading dim on the
  batch axes, a `[batch, seq, ..., d]` x's seq dim on the `seq_axes`, the last dim whole);
  `replicated` (e.g. gamma) is on every shard whole.

  The seq dim stays split under context parallelism: with it whole, every context shard would
  gather the whole sequence's rows and quantize all of them (a `[batch, seq, d]` activation
  and its codes per chip, per BitLinear)."""
  sharding = _get(sharding)
  if sharding is None:
    return fn(x, *replicated)
  mesh = sharding.mesh
  b = _fit(mesh, sharding.batch_axes, x.shape[0])
  s = _fit(mesh, sharding.seq_axes, x.shape[1]) if x.ndim > 2 else None
  row_spec = P(b, s, *([None] * (x.ndim - 2))) if x.ndim > 2 else P(b, None)
  return jax.shard_map(
    fn,
    mesh=sharding.mesh,
    in_specs=(row_spec,) + tuple(P() for _ in replicated),
    out_specs=row_spec,
    check_vma=False,
  )(x, *replicated)


def attention(
  fn: Callable,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  sharding: KernelSharding | None = None,
):
  """`fn(q, k, v, segment_ids) -> out` per shard for attention over whole windows: q, out
  `[batch, seq, heads, head_dim]`, k, v `[batch, seq, kv_heads, head_dim]`, segment_ids
  `[batch, seq]` or None. Batch goes on `batch_axes`, heads on `feature_axes` (the projections'
  'inner' features are the heads side by side); seq and head_dim stay whole, so there is no
  communication. K/V heads the feature axes do not divide are repeated first, each `r` times
  with the smallest `r` that makes them divide (query head h keeps reading the copy of its
  K/V head `h // (heads / kv_heads)`); heads the axes do not divide are replicated."""
  sharding = _get(sharding)
  if sharding is None:
    return fn(q, k, v, segment_ids)
  mesh = sharding.mesh
  heads, kv_heads = q.shape[2], k.shape[2]
  b = _fit(mesh, sharding.batch_axes, q.shape[0])
  h = _fit(mesh, sharding.feature_axes, heads)
  if h is not None and kv_heads % _axes_size(mesh, h):
    repeat = math.lcm(kv_heads, _axes_size(mesh, h)) // kv_heads  # divides heads // kv_heads
    k, v = (jnp.repeat(t, repeat, axis=2) for t in (k, v))
  spec = P(b, None, h, None)
  if segment_ids is None:
    body, args, in_specs = (lambda q, k, v: fn(q, k, v, None)), (q, k, v), (spec,) * 3
  else:
    body, args, in_specs = fn, (q, k, v, segment_ids), (spec,) * 3 + (P(b, None),)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
