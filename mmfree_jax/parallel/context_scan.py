"""The MLGRU recurrence `h_t = f_t h_{t-1} + i_t` with the sequence split over the `context`
mesh axis (context parallelism, issue 27 item 2).

Each of the `c` context shards holds a contiguous chunk of time, `[batch, seq / c, dim]`. Under
`jax.shard_map`:

1. Local pass: each shard runs the scan `fn` (any registered `scan_type`, Pallas kernels
   included: they take an initial state) from `e_k` (the caller's `h0` on shard 0, zero on the
   others), giving its final state `s_k`, and its chunk's decay product `P_k = prod_t f_t`. A
   document reset (`f = 0`) inside the chunk makes `P_k = 0`: nothing before it carries on.
2. Combine: shard k's incoming state is `h_in_k = e_k + sum_{j<k} (prod_{j<m<k} P_m) s_j`, a
   scan of the affine maps `h -> P_j h + s_j` over the context axis. The pairs move as
   `combine="ppermute"`: a chain of `c - 1` collective-permutes of `s`-sized `[batch, dim]`
   states (shard j sends `P_j h_in_j + s_j` to j+1, right after it became exact), or
   `combine="all_gather"`: one all-gather of the `[c, batch, dim]` pairs, each shard
   finishing the small scan itself. Measured in the compiled HLO (fwd + bwd, sequential scan,
   f64 `[2, 64, 8]`, context 8; the probe of tests/test_context_scan.py): the chain is 7
   forward and 7 backward (its transpose: the reverse chain) permutes of one `[2, 8]` state,
   2048 bytes of collective results per device in all; the all-gather is two gathers of
   `[8, 2, 8]` forward and two reduce-scatters of them backward, 2560 bytes, and it sends
   `2 (c - 1) b d` elements per direction where the chain sends `(c - 1) b d`. Both include the
   256 bytes that place `h0` and return the last shard's state. The default is `ppermute`
   (fewer bytes, neighbour-to-neighbour hops on a ring); its cost is `c - 1` dependent steps
   instead of one, and at `b d` of a few KiB per layer both are latency-bound.
3. Second pass: each shard reruns `fn` with `h0 = h_in_k`. The alternative, adding
   `(cumulative prod f) * h_in` to the local pass, is not used: it stores that `[batch, seq/c,
   dim]` product for the backward pass (as much activation memory as h itself, the very thing
   context parallelism saves), and it adds two separately rounded terms, the zero-start state
   and the decayed incoming one, which cancel when the true state is small, losing digits the
   sequential scan keeps. The second pass does exactly the one-device per-step arithmetic from
   an exact-up-to-rounding `h_in`. (An underflowing `P` is harmless either way: the state it
   would carry is below the dtype's resolution.) The cost is a second scan of the chunk.

Backward: everything above is differentiable JAX (the scans' own VJPs, `ppermute`/
`all_gather`), so autodiff gives the reverse-time adjoint, which crosses the shards the other
way (right to left) through the transposed collectives. Only `[batch, dim]` states cross the
context axis, never a `[seq, ...]` array.

The shard_map runs with `check_vma=False`, which the Pallas kernels need (as in
`parallel.kernel_sharding`); tests/test_context_scan.py checks the gradients that setting could
get wrong (an `h0` and a batch the data axis does not divide, both replicated operands).

Placement: the scan comes in as `fn(f, i, initial_state) -> (h, final_state)`, so this module
imports only `parallel.kernel_sharding` (whose wrappers it turns off inside its own shard_map);
`ops.recurrence` calls it when the active `kernel_sharding` splits the sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mmfree_jax.parallel import kernel_sharding

Axes = str | tuple[str, ...] | None
COMBINES = ("ppermute", "all_gather")


def fit_axes(mesh: Mesh, axes: Axes, size: int) -> Axes:
  """`axes` when they are on the mesh and their product divides `size`, else None."""
  if axes is None:
    return None
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  if not all(a in mesh.shape for a in names):
    return None
  return axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None


def _incoming_ppermute(p, s, axis: str, c: int):
  """Exclusive scan of `h -> p h + s` over the context axis by a chain of neighbour sends.

  After step t, shards 0..t+1 hold their exact incoming state; shard 0 receives zeros."""
  h = jnp.zeros_like(s)
  right = [(j, j + 1) for j in range(c - 1)]
  for _ in range(c - 1):
    h = jax.lax.ppermute(p * h + s, axis, right)
  return h


def _incoming_all_gather(p, s, axis: str, c: int):
  """Exclusive scan of `h -> p h + s` over the context axis from all-gathered pairs."""
  ps = jax.lax.all_gather(p, axis)  # [c, batch, dim]
  ss = jax.lax.all_gather(s, axis)
  k = jax.lax.axis_index(axis)
  h = jnp.zeros_like(s)
  for j in range(c - 1):
    h = jnp.where(j < k, ps[j] * h + ss[j], h)
  return h


def context_recurrence(
  fn: Callable,
  f: jax.Array,
  i: jax.Array,
  initial_state: jax.Array | None = None,
  *,
  mesh: Mesh,
  context_axis: str | tuple[str, ...] = "context",
  batch_axes: Axes = ("data", "fsdp"),
  feature_axes: Axes = "tensor",
  combine: str = "ppermute",
):
  """`h_t = f_t h_{t-1} + i_t` with time split over `context_axis` (module docstring).

  Args:
    fn: the per-shard scan, `fn(f, i, initial_state) -> (h, final_state)`.
    f: `[batch, seq, dim]` forget gates; `seq` a multiple of the context size.
    i: `[batch, seq, dim]` inputs.
    initial_state: `[batch, dim]` or None (zeros): the state before position 0.
    mesh: the device mesh; time goes on `context_axis` (one mesh axis or several, in order),
      batch on `batch_axes` and dim on `feature_axes` where they divide.
    combine: how the shards' carries meet, one of `COMBINES`.
  Returns:
    h `[batch, seq, dim]` in i's dtype and the final state `[batch, dim]` in `fn`'s state dtype
    (fp32; f64 for f64 inputs), as `fn` over the whole sequence on one device.
  """
  if combine not in COMBINES:
    raise ValueError(f"combine must be one of {COMBINES}; got {combine!r}")
  names = (context_axis,) if isinstance(context_axis, str) else tuple(context_axis)
  if not names or not all(a in mesh.shape for a in names):
    raise ValueError(
      f"mesh axes {mesh.axis_names} have no {context_axis!r} axis; build the "
      "mesh with parallel.mesh.make_mesh"
    )
  c = math.prod(mesh.shape[a] for a in names)
  if c == 1:
    return fn(f, i, initial_state)
  batch, seq, dim = f.shape
  if seq % c:
    raise ValueError(
      f"sequence length {seq} is not a multiple of the {c} context shards "
      f"({context_axis!r}); make data.seq_len a multiple of mesh.shape.context"
    )
  acc = jax.eval_shape(fn, f[:, :1], i[:, :1], None)[1].dtype
  h0 = jnp.zeros((batch, dim), acc) if initial_state is None else initial_state.astype(acc)
  # h0 enters on shard 0 only, as an input sharded like the carries (no replicated operand).
  starts = jnp.zeros((c, batch, dim), acc).at[0].set(h0)
  b = fit_axes(mesh, batch_axes, batch)
  d = fit_axes(mesh, feature_axes, dim)
  seq_spec, carry_spec = P(b, context_axis, d), P(context_axis, b, d)
  incoming = _incoming_ppermute if combine == "ppermute" else _incoming_all_gather

  def shard(f, i, start):
    start = start[0]
    _, s = fn(f, i, start)
    p = jnp.prod(f.astype(acc), axis=1)
    h, last = fn(f, i, start + incoming(p, s, context_axis, c))
    return h, last[None]

  with kernel_sharding.suspended():  # fn runs per shard already: no nested shard_map
    h, last = jax.shard_map(
      shard,
      mesh=mesh,
      in_specs=(seq_spec, seq_spec, carry_spec),
      out_specs=(seq_spec, carry_spec),
      check_vma=False,
    )(f, i, starts)
  return h, last[-1]
