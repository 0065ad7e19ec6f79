"""Logical axis names → mesh axes (MaxText's idea, cut down to `data, fsdp, tensor`).

Parameters carry logical names (`nnx.Param(..., out_sharding=...)`); activations are
constrained with `constrain(x, ("batch", "seq", "embed"))`, which is a no-op unless a mesh
and rules are active (`with logical_sharding(mesh, rules): ...`). The rules live in the config.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfree_jax.kernels import sharding as kernel_sharding

LOGICAL_AXES = ("batch", "seq", "embed", "mlp", "inner", "heads", "vocab", "layers")

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mmfree_logical_sharding",
                                                         default=None)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def normalize_rules(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Turns config rules (lists from ml-collections) into the tuple form flax expects."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


@contextlib.contextmanager
def logical_sharding(mesh: Mesh, rules: Rules):
  """Activates activation-sharding constraints for code traced inside the block, and runs the
  Pallas kernels there per shard (`kernels.sharding`: batch on the 'batch' rule's axes,
  features on the 'inner' rule's)."""
  token = _ACTIVE.set((mesh, normalize_rules(rules)))
  try:
    batch_axes = logical_to_spec(("batch",), rules)[0]
    feature_axes = logical_to_spec(("inner",), rules)[0]
    with kernel_sharding.kernel_sharding(mesh, batch_axes, feature_axes):
      yield
  finally:
    _ACTIVE.reset(token)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  return nn.logical_to_mesh_axes(tuple(logical_axes), normalize_rules(rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names when a mesh is active, else identity."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))


def _mesh_axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  axes = axis if isinstance(axis, tuple) else (axis,)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


def fit_spec_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Replicates any dimension the mesh axes do not divide (e.g. a vocab of 50257 on 2 shards)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = [axis if dim % _mesh_axis_size(mesh, axis) == 0 else None
            for axis, dim in zip(entries, shape)]
  return PartitionSpec(*fitted)


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of arrays from a matching tree of logical PartitionSpecs."""
  rules = normalize_rules(rules)

  def one(leaf, logical):
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    return NamedSharding(mesh, fit_spec_to_shape(spec, leaf.shape, mesh))

  return jax.tree.map(one, abstract_tree, logical_specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, ...]` input: the 'batch' rule on dim 0, the rest replicated."""
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
