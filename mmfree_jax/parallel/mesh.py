"""Device mesh `('data', 'fsdp', 'tensor')` from the `mesh` config section."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape_cfg, num_devices: int) -> dict[str, int]:
  """Fills one `-1` axis with the remaining devices and checks the product.

  Args:
    shape_cfg: mapping with keys `data, fsdp, tensor`; at most one value may be -1.
    num_devices: devices available (all processes together).
  """
  shape = dict(shape_cfg)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
  shape = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in shape.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {fill}")
  if any(size == 0 or size < -1 for size in shape.values()):
    raise ValueError(f"mesh sizes must be positive or -1; got {shape}")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {shape} cannot fill {num_devices} devices: the fixed axes use {fixed}, which "
          f"does not divide {num_devices}; change --config.mesh.shape")
    shape[fill[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ValueError(
        f"mesh {shape} has {math.prod(shape.values())} devices but {num_devices} are "
        "available; make the product of --config.mesh.shape.{data,fsdp,tensor} equal the "
        "device count, or set one axis to -1")
  return shape


def make_mesh(shape_cfg, devices=None) -> Mesh:
  """A mesh with Auto axis types (so `with_sharding_constraint` applies) over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape_cfg, len(devices))
  sizes = tuple(shape[a] for a in MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh, batch_axes=("data", "fsdp")) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in batch_axes)
