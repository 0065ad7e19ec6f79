"""Logical axis names → mesh axes (MaxText's idea, cut down to `data, fsdp, context, tensor`).

Parameters carry logical names (`nnx.Param(..., out_sharding=...)`) from `PARAM_AXES`;
activations are constrained with names from `ACTIVATION_AXES`, e.g.
`constrain(x, ("activation_batch", "activation_seq", "activation_embed"))`, a no-op unless a
mesh and rules are active (`with logical_sharding(mesh, rules): ...`). The two sets are
separate (as MaxText's `activation_embed` vs `embed`), so a parameter's `embed` may go to `fsdp`
while the activations' batch takes `data x fsdp`, without a rule both use. The rules live in
the config (`mesh.axis_rules`); each name has one rule, and a spec whose names would use one
mesh axis twice is an error here instead of a conflict flax resolves silently.

A rule's mesh axis that the mesh lacks (e.g. `activation_seq -> context` on a mesh built without
the `context` axis) counts as size 1: that dimension is replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfree_jax.parallel import kernel_sharding
from mmfree_jax.parallel.axes import (  # noqa: F401  (re-exported: the rules live there)
  ACTIVATION_AXES,
  LOGICAL_AXES,
  PARAM_AXES,
  Rules,
  check_rules,
  normalize_rules,
)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mmfree_logical_sharding", default=None)


@contextlib.contextmanager
def logical_sharding(mesh: Mesh, rules: Rules):
  """Activates activation-sharding constraints for code traced inside the block, and runs the
  Pallas kernels there per shard (`parallel.kernel_sharding`: batch on the 'activation_batch'
  rule's axes, features on the 'activation_inner' rule's); a sequence split by the
  'activation_seq' rule runs the recurrence with `parallel.context_scan`."""
  token = _ACTIVE.set((mesh, normalize_rules(rules)))
  try:
    batch_axes = logical_to_spec(("activation_batch",), rules)[0]
    feature_axes = logical_to_spec(("activation_inner",), rules)[0]
    seq_axes = _present(mesh, logical_to_spec(("activation_seq",), rules)[0])
    with kernel_sharding.kernel_sharding(mesh, batch_axes, feature_axes, seq_axes):
      yield
  finally:
    _ACTIVE.reset(token)


Layout = tuple[Mesh, Rules]  # `(mesh, normalized rules)` of a `logical_sharding` block


def active() -> Layout | None:
  """The `(mesh, rules)` of the enclosing `logical_sharding` block, or None.

  A jitted function that runs the model under a mesh takes it as a static argument and enters
  `within(layout)` inside: the block is read while tracing, and jit caches traces by argument
  types only (a trace made on one device would be reused on the mesh, and back)."""
  return _ACTIVE.get()


@contextlib.contextmanager
def within(layout: Layout | None):
  """`logical_sharding(*layout)` for the block, or nothing when `layout` is None."""
  if layout is None:
    yield
    return
  with logical_sharding(*layout):
    yield


def place(x: jax.Array, logical_axes: Sequence[str | None]):
  """`x` on the active mesh split by its logical names, or `x` as is outside
  `logical_sharding`: e.g. a prompt `[batch, seq]` placed on `("activation_batch",
  "activation_seq")` reaches the devices already split over batch and context."""
  return place_tree(x, PartitionSpec(*logical_axes))


def place_tree(tree, logical_specs):
  """`tree`'s arrays on the active mesh, each split by the logical `PartitionSpec` of a matching
  tree (or one spec for a lone array), or `tree` as is outside `logical_sharding`."""
  layout = _ACTIVE.get()
  if layout is None:
    return tree
  return jax.device_put(tree, tree_shardings(tree, logical_specs, *layout))


def place_params(params):
  """A model's params (`nnx.split(model)[1]`) on the active mesh, split by the logical names
  they carry (as in training); unchanged outside `logical_sharding`."""
  if _ACTIVE.get() is None:
    return params
  return place_tree(params, nnx.get_partition_spec(params))


def without_mesh_axis(rules: Rules, axis: str) -> Rules:
  """`rules` with mesh axis `axis` dropped from every target (None when nothing is left): the
  rules for code that runs per shard of `axis` (`sum_over_shards`)."""
  out = []
  for name, target in normalize_rules(rules):
    kept = tuple(a for a in (target if isinstance(target, tuple) else (target,)) if a != axis)
    kept = tuple(a for a in kept if a is not None)
    out.append((name, None if not kept else kept if isinstance(target, tuple) else kept[0]))
  return tuple(out)


def sum_over_shards(fn, replicated, split, axis: str = "data"):
  """`fn(replicated, part)` for each shard's part of `split`, the outputs summed once, after.

  Args:
    fn: `(replicated, part) -> pytree of arrays`, traced once.
    replicated: a pytree every shard sees whole (e.g. params, which may be sharded over the
      other mesh axes).
    split: a pytree of `[rows, ...]` arrays; shard s of `axis` gets rows `s * rows / n ...`,
      its own (with the batch rule `(data, fsdp)` these are the rows it holds already).
  Returns:
    the sum over the shards of `fn`'s outputs (one all-reduce over `axis`, outside anything
    `fn` loops over). Outside a `logical_sharding` block, on a mesh whose `axis` has size 1,
    or for rows `axis` does not divide: `fn(replicated, split)`.

  `fn` runs under `jax.vmap` over the shards with `spmd_axis_name=axis` (each constraint in it
  gets `axis` on the vmapped dim) and under the rules without `axis`. Not a `shard_map` manual
  over `axis`: XLA's SPMD partitioner aborts on the embedding gather in such a partly manual
  region.
  """
  current = _ACTIVE.get()
  shards = 1 if current is None else current[0].shape.get(axis, 1)
  if shards == 1 or any(x.shape[0] % shards for x in jax.tree.leaves(split)):
    return fn(replicated, split)
  mesh, rules = current
  inner_rules = without_mesh_axis(rules, axis)

  def per_shard(replicated, part):
    with logical_sharding(mesh, inner_rules):
      return fn(replicated, part)

  def cut(x):
    x = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(axis)))

  parts = jax.tree.map(cut, split)
  out = jax.vmap(per_shard, in_axes=(None, 0), spmd_axis_name=axis)(replicated, parts)
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), out)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """The PartitionSpec of `logical_axes` under `rules` (None: a replicated dim).

  Raises ValueError for a name without a rule, or when two dims would take one mesh axis
  (flax's `logical_to_mesh_axes` would drop it from the later dim without a word)."""
  table = dict(reversed(normalize_rules(rules)))  # the first rule of a name wins
  spec, used = [], {}
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(
        f"logical axis {name!r} has no rule in mesh.axis_rules ({sorted(table)}); add one"
      )
    target = table[name]
    for axis in target if isinstance(target, tuple) else (target,):
      if axis is not None and axis in used:
        raise ValueError(
          f"logical axes {used[axis]!r} and {name!r} both map to mesh axis "
          f"{axis!r} in {tuple(logical_axes)}; change mesh.axis_rules so that "
          "each mesh axis appears once per array"
        )
      used[axis] = name
    spec.append(target)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names when a mesh is active, else identity."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = fit_spec_to_shape(logical_to_spec(logical_axes, rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _mesh_axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  axes = axis if isinstance(axis, tuple) else (axis,)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


def _present(mesh: Mesh, axis):
  """`axis` without the mesh axes `mesh` lacks (None when nothing is left)."""
  if axis is None:
    return None
  axes = tuple(a for a in (axis if isinstance(axis, tuple) else (axis,)) if a in mesh.shape)
  if not axes:
    return None
  return axes if isinstance(axis, tuple) else axes[0]


def fit_spec_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Replicates any dimension the mesh axes do not divide (e.g. a vocab of 50257 on 2 shards, a
  decode step's one position on the context axis); mesh axes the mesh lacks are dropped."""
  entries = [_present(mesh, axis) for axis in list(spec) + [None] * (len(shape) - len(spec))]
  fitted = [
    axis if dim % _mesh_axis_size(mesh, axis) == 0 else None for axis, dim in zip(entries, shape)
  ]
  return PartitionSpec(*fitted)


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of arrays from a matching tree of logical PartitionSpecs."""
  rules = normalize_rules(rules)

  def one(leaf, logical):
    spec = logical_to_spec(tuple(logical), rules)
    return NamedSharding(mesh, fit_spec_to_shape(spec, leaf.shape, mesh))

  return jax.tree.map(
    one, abstract_tree, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, ...]` input: the 'activation_batch' rule on dim 0, the rest
  replicated."""
  spec = logical_to_spec(("activation_batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, PartitionSpec(*(_present(mesh, a) for a in spec)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
