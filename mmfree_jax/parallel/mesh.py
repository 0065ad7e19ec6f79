"""Device mesh `('data', 'fsdp', 'context', 'tensor')` from the `mesh` config section.

`context` splits the sequence (context parallelism, `parallel.context_scan`); it sits after
`data`/`fsdp` so that a mesh with `context=1` keeps the device order it had without the axis.

Devices of several TPU slices (multi-slice, `device.slice_index`) get a hybrid mesh: the
`mesh.dcn` factor of each axis spans slices (the data-center network), the rest stays inside
a slice (ICI).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "context", "tensor")


def resolve_mesh_shape(shape_cfg, num_devices: int) -> dict[str, int]:
  """Fills one `-1` axis with the remaining devices and checks the product.

  Args:
    shape_cfg: mapping with keys of `MESH_AXES` (a missing one is 1); at most one may be -1.
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
        f"does not divide {num_devices}; change --config.mesh.shape"
      )
    shape[fill[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ValueError(
      f"mesh {shape} has {math.prod(shape.values())} devices but {num_devices} are "
      "available; make the product of --config.mesh.shape.{data,fsdp,context,tensor} equal the "
      "device count, or set one axis to -1"
    )
  return shape


def num_slices(devices) -> int:
  """How many TPU slices `devices` span (1 for devices without `slice_index`: CPU, GPU)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def split_over_slices(shape: dict[str, int], dcn_cfg, slices: int):
  """Splits a resolved mesh shape into per-slice (ICI) and across-slice (DCN) factors.

  Args:
    shape: the resolved mesh, `{axis: size}` over `MESH_AXES`, all devices together.
    dcn_cfg: mapping axis -> slices it spans; at most one -1 (= the remaining slices).
    slices: the number of slices the devices form.
  Returns:
    `(ici, dcn)`: tuples of sizes in `MESH_AXES` order, `ici[i] * dcn[i] == shape[axis]`.
  """
  try:
    dcn_shape = resolve_mesh_shape(dcn_cfg, slices)
  except ValueError:
    raise ValueError(
      f"mesh.dcn={dict(dcn_cfg)} does not fit the {slices} slice(s) the devices form: make "
      "the product of --config.mesh.dcn.{data,fsdp,context,tensor} equal the number of "
      "slices, or set one axis to -1"
    ) from None
  for axis in MESH_AXES:
    if shape[axis] % dcn_shape[axis]:
      raise ValueError(
        f"mesh.shape.{axis}={shape[axis]} cannot span {dcn_shape[axis]} slices "
        f"(mesh.dcn.{axis}); make mesh.shape.{axis} a multiple of mesh.dcn.{axis}"
      )
  ici = tuple(shape[a] // dcn_shape[a] for a in MESH_AXES)
  return ici, tuple(dcn_shape[a] for a in MESH_AXES)


def make_mesh(shape_cfg, devices=None, dcn_cfg=None) -> Mesh:
  """A mesh with Auto axis types (so `with_sharding_constraint` applies) over `devices`.

  Args:
    shape_cfg: `mesh.shape`, sizes of the whole mesh per axis (one may be -1).
    devices: the devices (default: all of them); an AOT topology's devices work too.
    dcn_cfg: `mesh.dcn`, slices spanned per axis (default `{"data": -1}`: the batch is what
      crosses slices, so a step's only DCN traffic is the gradient reduction). Used only when
      the devices span more than one slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape_cfg, len(devices))
  sizes = tuple(shape[a] for a in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = num_slices(devices)
  if slices > 1:
    ici, dcn = split_over_slices(shape, {"data": -1} if dcn_cfg is None else dcn_cfg, slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  if dcn_cfg is not None:
    split_over_slices(shape, dcn_cfg, 1)  # a mesh.dcn asking for slices that are not there
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh, batch_axes=("data", "fsdp")) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in batch_axes)
