"""Where packed documents start and each token's position inside its document, from the
segment ids `[batch, seq]` of a window, also with the sequence split over the `context` mesh
axis (issue 27 item 1: positions and segment ids are shard-aware).

One device: a document starts where the id changes (`reset_mask`), and a token's position is
its index minus the index of its document's start (a running max of the starts,
`positions_in_document`). The MLGRU restarts its state at the resets; the Transformer++ rotates
q and k by the positions (RoPE).

With the sequence split over `c` context shards (the active `parallel.kernel_sharding` splits
it, as in the trainer's `logical_sharding`), each shard computes both from its own chunk under
`jax.shard_map` plus two `[batch]`-sized exchanges: the previous shard's last id (one
collective-permute: is my first token a reset?) and the latest document start before the
chunk (an all-gather of each shard's `[batch]` latest start, maxed over the earlier shards).
Left to the partitioner, the shift and the running max over a split axis gather the whole
`[batch, seq]` ids instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmfree_jax.parallel import kernel_sharding
from mmfree_jax.parallel.context_scan import fit_axes


def _local_reset(segment_ids, previous_last=None):
  """Reset mask of a chunk; `previous_last` `[batch]`: the id before it (None: none, t=0)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  first = jnp.zeros_like(change[:, :1])
  if previous_last is not None:
    first = (previous_last != segment_ids[:, 0])[:, None]
  return jnp.concatenate([first, change], axis=1)


def _local_positions(reset, first_step, start_before=None):
  """Positions in document of a chunk whose first token is global step `first_step`;
  `start_before` `[batch]`: the latest document start before the chunk (None: 0)."""
  steps = first_step + jnp.broadcast_to(jnp.arange(reset.shape[1], dtype=jnp.int32), reset.shape)
  starts = jax.lax.cummax(jnp.where(reset, steps, 0), axis=1)
  if start_before is not None:
    starts = jnp.maximum(starts, start_before[:, None])
  return steps - starts


def _split(segment_ids, body):
  """`body(segment_ids_chunk, axis, c)` per context shard, or None without a context split."""
  split = kernel_sharding.seq_split(segment_ids.shape[1])
  if split is None:
    return None
  active, c = split
  spec = P(fit_axes(active.mesh, active.batch_axes, segment_ids.shape[0]), active.seq_axes)
  with kernel_sharding.suspended():
    return jax.shard_map(
      lambda s: body(s, active.seq_axes, c),
      mesh=active.mesh,
      in_specs=spec,
      out_specs=spec,
      check_vma=False,
    )(segment_ids)


def take_chunks(window: jax.Array, start: int, length: int) -> jax.Array:
  """`window[:, start:start + length]`; under a context split of `length`, each shard's chunk
  cut on its own device from the `[batch, width]` window it holds whole (the trainer's batch
  arrives split over the batch axes only: a `seq + 1` window does not split evenly, and its
  int32 ids are a few bytes per token beside a layer's activations). Left to the partitioner,
  the shifted slice of a window it split over context is a halo exchange between shards."""
  split = kernel_sharding.seq_split(length)
  if split is None:
    return window[:, start : start + length]
  active, c = split
  b = fit_axes(active.mesh, active.batch_axes, window.shape[0])
  local = length // c

  def cut(w):
    first = start + jax.lax.axis_index(active.seq_axes) * local
    return jax.lax.dynamic_slice_in_dim(w, first, local, axis=1)

  with kernel_sharding.suspended():
    return jax.shard_map(
      cut,
      mesh=active.mesh,
      in_specs=P(b, None),
      out_specs=P(b, active.seq_axes),
      check_vma=False,
    )(window)


def _previous_last(s, axis, c):
  """The id before this chunk: the previous shard's last (shard 0's own first: no reset)."""
  last = jax.lax.ppermute(s[:, -1], axis, [(j, j + 1) for j in range(c - 1)])
  return jnp.where(jax.lax.axis_index(axis) == 0, s[:, 0], last)


def reset_mask(segment_ids: jax.Array) -> jax.Array:
  """`[batch, seq]` bool: True where a new document starts inside the window (not at t=0)."""
  out = _split(segment_ids, lambda s, axis, c: _local_reset(s, _previous_last(s, axis, c)))
  return _local_reset(segment_ids) if out is None else out


def positions_in_document(segment_ids: jax.Array) -> jax.Array:
  """`[batch, seq]` int32 position of each token inside its document (restarts at resets)."""

  def shard(s, axis, c):
    k = jax.lax.axis_index(axis)
    first = (k * s.shape[1]).astype(jnp.int32)
    reset = _local_reset(s, _previous_last(s, axis, c))
    local_start = jnp.max(jnp.where(reset, first + jnp.arange(s.shape[1], dtype=jnp.int32), 0), 1)
    starts = jax.lax.all_gather(local_start, axis)  # [c, batch]
    before = jnp.max(jnp.where((jnp.arange(c) < k)[:, None], starts, 0), axis=0)
    return _local_positions(reset, first, before)

  out = _split(segment_ids, shard)
  return _local_positions(_local_reset(segment_ids), 0) if out is None else out
