"""Causal self-attention with the sequence split over the `context` mesh axis (context
parallelism for the Transformer++, issue 27 item 3; MaxText's all-gather approach).

Each of the `c` context shards holds a contiguous chunk of the window, q `[batch, seq / c,
heads, head_dim]` and k, v `[batch, seq / c, kv_heads, head_dim]`. Under `jax.shard_map`:

1. K/V all-gather: every shard gathers the whole window's keys and values over the context axis
   (`all_gather(tiled)`, `[batch, seq, kv_heads, head_dim]`: the K/V heads only, so a grouped-
   query model moves `kv_heads / heads` of what repeated heads would), and the keys' segment
   ids (int32 `[batch, seq]`, `1 / (2 kv_heads head_dim)` of the K/V elements).
2. Each shard attends its own queries against the gathered keys, causal by global position:
   query row r of shard k sits at `k * seq / c + r` (`q_offset`), key column j at j. With
   segment ids a pair also needs one document.
3. Backward: autodiff of the all-gather is a reduce-scatter of dK/dV over the context axis
   (each shard's queries contribute to every earlier shard's keys).

RoPE needs no communication here: q and k arrive rotated by their global (in-document)
positions, which the model computes shard-aware (`parallel.context_positions`).

Why all-gather and not ring attention: a ring overlaps the K/V sends with compute but needs
`c - 1` dependent steps and an online-softmax merge per step; the gather is one collective whose
bytes are the same (`(c - 1) / c` of the window's K/V per shard), its memory the whole window's
K/V per shard (`2 seq kv_heads head_dim` elements per layer, small beside the activations of a
long window when kv_heads is small). This is what MaxText runs for context parallelism.

Placement: the per-shard attention comes in as a function `fn(q, k, v, q_segments, k_segments,
q_offset) -> out` (XLA's, the naive reference, or the splash kernel with an offset causal mask;
`ops.attention` picks), so this module imports nothing above `parallel/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mmfree_jax.parallel import kernel_sharding
from mmfree_jax.parallel.context_scan import Axes, fit_axes


def context_attention(
  fn: Callable,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  mesh: Mesh,
  context_axis: str | tuple[str, ...] = "context",
  batch_axes: Axes = ("data", "fsdp"),
  feature_axes: Axes = "tensor",
) -> jax.Array:
  """Causal attention with the window split over `context_axis` (module docstring).

  Args:
    fn: the per-shard attention, `fn(q, k, v, q_segments, k_segments, q_offset) -> out` with q
      `[b, seq / c, heads, hd]`, k, v `[b, seq, kv_heads, hd]` (the whole window), segments
      `[b, seq / c]` / `[b, seq]` int or None, and `q_offset` the int32 global position of q's
      first row; query row r attends key j when `j <= q_offset + r` (and the segments agree).
    q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]`, kv_heads
      dividing heads; seq a multiple of the context size.
    segment_ids: `[batch, seq]` document ids of a packed window, or None.
    mesh: the device mesh; the sequence goes on `context_axis`, batch on `batch_axes` and the
      heads on `feature_axes` where they divide.
  Returns:
    `[batch, seq, heads, head_dim]` in q's dtype, as `fn` over the whole window on one device.
  """
  names = (context_axis,) if isinstance(context_axis, str) else tuple(context_axis)
  if not names or not all(a in mesh.shape for a in names):
    raise ValueError(
      f"mesh axes {mesh.axis_names} have no {context_axis!r} axis; build the "
      "mesh with parallel.mesh.make_mesh"
    )
  c = math.prod(mesh.shape[a] for a in names)
  batch, seq, heads, _ = q.shape
  if seq % c:
    raise ValueError(
      f"sequence length {seq} is not a multiple of the {c} context shards "
      f"({context_axis!r}); make data.seq_len a multiple of mesh.shape.context"
    )
  b = fit_axes(mesh, batch_axes, batch)
  h = fit_axes(mesh, feature_axes, heads)
  kv_heads = k.shape[2]
  if h is not None:
    shards = math.prod(mesh.shape[a] for a in ((h,) if isinstance(h, str) else h))
    if kv_heads % shards:  # as kernel_sharding.attention: repeat K/V heads until they divide
      repeat = math.lcm(kv_heads, shards) // kv_heads
      k, v = (jnp.repeat(t, repeat, axis=2) for t in (k, v))
  spec, seg_spec = P(b, context_axis, h, None), P(b, context_axis)
  local = seq // c

  def shard(q, k, v, *segments):
    gather = lambda t: jax.lax.all_gather(t, context_axis, axis=1, tiled=True)
    q_offset = (jax.lax.axis_index(context_axis) * local).astype(jnp.int32)
    q_seg, k_seg = (segments[0], gather(segments[0])) if segments else (None, None)
    return fn(q, gather(k), gather(v), q_seg, k_seg, q_offset)

  args, in_specs = (q, k, v), (spec,) * 3
  if segment_ids is not None:
    args, in_specs = args + (segment_ids,), in_specs + (seg_spec,)
  with kernel_sharding.suspended():  # fn runs per shard already: no nested shard_map
    return jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(
      *args
    )
