"""The `context` mesh axis and the `activation_seq -> context` rule (issue 27 item 1)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mmfree_jax import config as config_lib
from mmfree_jax.config import validation
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.parallel import sharding

RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)


def test_context_axis_defaults_to_one_and_keeps_the_device_order():
  cfg = config_lib.base_config()
  assert cfg.mesh.shape.context == 1 and cfg.mesh.dcn.context == 1
  mesh = mesh_lib.make_mesh(cfg.mesh.shape)
  assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}
  without = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"))
  assert list(mesh.devices.flat) == list(without.devices.flat)


def test_context_axis_from_the_config_override():
  cfg = config_lib.base_config()
  cfg.mesh.shape.context = 4  # what --config.mesh.shape.context=4 sets
  mesh = mesh_lib.make_mesh(cfg.mesh.shape)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
  with pytest.raises(ValueError, match="context"):
    mesh_lib.make_mesh({"data": 1, "context": 3})


def test_seq_goes_on_context():
  assert sharding.logical_to_spec(("activation_seq",), RULES) == P("context")
  mesh = mesh_lib.make_mesh({"data": 2, "context": 4})
  x = jax.device_put(
    np.zeros((2, 8, 3), np.float32), NamedSharding(mesh, P(("data", "fsdp"), None, None))
  )
  with sharding.logical_sharding(mesh, RULES):
    y = jax.jit(
      lambda x: sharding.constrain(x, ("activation_batch", "activation_seq", "activation_embed"))
    )(x)
    step = jax.jit(
      lambda x: sharding.constrain(
        x[:, :1], ("activation_batch", "activation_seq", "activation_embed")
      )
    )(x)
  assert y.sharding.shard_shape(y.shape) == (1, 2, 3)
  # A decode step's one position cannot split 4 ways: replicated, not an error.
  assert step.sharding.shard_shape(step.shape) == (1, 1, 3)


def test_a_mesh_without_the_context_axis_replicates_the_sequence():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  x = np.zeros((4, 8, 6), np.float32)
  with sharding.logical_sharding(mesh, RULES):
    y = jax.jit(
      lambda x: sharding.constrain(x, ("activation_batch", "activation_seq", "activation_inner"))
    )(x)
  assert y.sharding.shard_shape(y.shape) == (1, 8, 3)
  assert sharding.batch_sharding(mesh, RULES).spec == P(("data", "fsdp"), None)


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


class _Mesh:
  """A mesh's `devices` grid and axis names over fake devices of given process indices."""

  def __init__(self, processes, axis_names=("data", "fsdp", "context", "tensor")):
    self.devices = np.vectorize(_Device, otypes=[object])(np.asarray(processes))
    self.axis_names = axis_names
    self.shape = dict(zip(axis_names, self.devices.shape))


@pytest.mark.parametrize(
  "processes,want",
  [
    # data 2 x context 4, one host per data shard: block = process, as without context
    (np.repeat(np.arange(2), 4).reshape(2, 1, 4, 1), {0: (0, 2), 1: (1, 2)}),
    # context 8 across two hosts: both hold every batch row, both load the whole batch
    (np.repeat(np.arange(2), 4).reshape(1, 1, 8, 1), {0: (0, 1), 1: (0, 1)}),
    # data 2 x context 4, each host half of the context axis of both data shards
    (np.tile(np.repeat(np.arange(2), 2), 2).reshape(2, 1, 4, 1), {0: (0, 1), 1: (0, 1)}),
    # data 4 over four hosts listed in reverse: blocks follow the batch order
    (np.arange(4)[::-1].reshape(4, 1, 1, 1), {3: (0, 4), 2: (1, 4), 1: (2, 4), 0: (3, 4)}),
  ],
)
def test_process_batch_block(processes, want):
  """Which rows of the global batch each process loads (`data.pipeline.process_batch_block`):
  processes whose devices hold the same batch rows (a context axis across hosts) load the
  same block."""
  from mmfree_jax.data.pipeline import process_batch_block

  mesh = _Mesh(processes)
  got = {p: process_batch_block(mesh, ("data", "fsdp"), p) for p in want}
  assert got == want


def test_process_batch_block_refuses_overlapping_blocks():
  from mmfree_jax.data.pipeline import process_batch_block

  mesh = _Mesh(np.asarray([0, 0, 0, 1]).reshape(2, 1, 2, 1))  # host 1 holds half of row 1
  with pytest.raises(ValueError, match="keep context and tensor within one host"):
    process_batch_block(mesh, ("data", "fsdp"), 0)


def test_seq_len_the_context_does_not_divide_is_refused():
  cfg = config_lib.base_config()
  cfg.mesh.shape.context = 4
  cfg.data.seq_len = 30
  problems, _ = validation.config_errors(cfg)
  assert any("data.seq_len=30 is not a multiple of mesh.shape.context=4" in p for p in problems)
  cfg.data.seq_len = 32
  assert not any("seq_len" in p for p in validation.config_errors(cfg)[0])
