"""Multi-slice TPU meshes, compiled from this CPU for two `v5e:2x2` slices (libtpu AOT), and
the gradient accumulation per data shard that keeps the cross-slice reduction once per step
(its numerics on 8 fake CPU devices).

The cross-slice collectives are read from the compiled HLO text by `parallel.dcn`.
"""

import importlib.util
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies

from mmfree_jax import config as config_lib
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.parallel import dcn, sharding
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.train import optim, steps
from mmfree_jax.train import state as state_lib
from tests.cpu_pipeline import DEFAULT_CPU_PIPELINE

TOPOLOGY = "v5e:2x2"  # 4 chips per slice: the meshes
STEP_TOPOLOGY = "v5e:2x4"  # 8 chips per slice: the compiled steps, on the 370M's v5e-8 mesh


@pytest.fixture(autouse=True, scope="module")
def no_persistent_cache_writes():
  """Executables compiled for a topology cannot be read back from the persistent cache."""
  key = "jax_persistent_cache_min_compile_time_secs"
  saved = getattr(jax.config, key)
  jax.config.update(key, 1e9)
  yield
  jax.config.update(key, saved)


# ---- accumulation per data shard, numerics (8 fake CPU devices) ----

RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)


def test_rules_without_a_mesh_axis():
  rules = sharding.without_mesh_axis(
    (("activation_batch", ("data", "fsdp")), ("embed", "data"), ("mlp", "tensor"), ("x", None)),
    "data",
  )
  assert rules == (("activation_batch", ("fsdp",)), ("embed", None), ("mlp", "tensor"), ("x", None))


def _accumulated(dtype, mesh_shape, microbatches):
  """`accumulate_gradients` of the LM loss on a tiny MatMul-free LM in `dtype`, jitted under
  `mesh_shape`'s logical sharding (None: one device, no mesh: the plain scan over the whole
  batch, as before the per-shard accumulation)."""
  cfg = config_lib.base_config()
  cfg.model.update(
    vocab_size=256, d_model=64, num_layers=2, num_heads=4, dtype=dtype, param_dtype=dtype
  )
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  params = jax.jit(
    lambda: state_lib.init_train_state(model_cfg, optim.make_optimizer(cfg.optim, 1000), 0).params
  )()
  rng = np.random.default_rng(11)
  tokens = rng.integers(0, 256, (16, 17), dtype=np.int32)
  cut = rng.integers(2, 16, (16, 1))
  batch = {"tokens": tokens, "segment_ids": np.where(np.arange(17) < cut, 1, 2).astype(np.int32)}
  objective = steps.lm_objective(model_cfg, state_lib.model_graphdef(model_cfg), z_loss=1e-4)

  def run(params, batch):
    ctx = steps.StepContext(steps.target_count(batch, acc_dtype(model_cfg.compute_dtype)), 0)
    return steps.accumulate_gradients(objective.loss, params, batch, ctx, microbatches)

  if mesh_shape is None:
    return jax.device_get(jax.jit(run, compiler_options=DEFAULT_CPU_PIPELINE)(params, batch))
  mesh = mesh_lib.make_mesh(mesh_shape)
  params = jax.device_put(params, state_lib.param_shardings(model_cfg, mesh, RULES))
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, RULES))

  def sharded(params, batch):
    with sharding.logical_sharding(mesh, RULES):
      return run(params, batch)

  return jax.device_get(jax.jit(sharded, compiler_options=DEFAULT_CPU_PIPELINE)(params, batch))


MESH_D2F2T2 = {"data": 2, "fsdp": 2, "tensor": 2}


def _assert_close(actual, expected, rtol, atol):
  """Every leaf within `rtol` of the expected value or `atol` times that array's largest
  entry (entries that are sums of cancelling terms are small next to the array)."""
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * np.max(np.abs(b))),
    actual,
    expected,
  )


@pytest.mark.slow
def test_per_shard_accumulation_equals_one_batch_f64():
  """With data=2 (x fsdp 2 x tensor 2) the scan of 2 microbatches runs per data shard and the
  shards' sums are added after it: loss, metric sums and gradients equal one value_and_grad
  over the batch on one device, and the plain 2-microbatch scan over the whole batch on one
  device (the accumulation before the per-shard one). f64: only the summation order differs,
  so 1e-12 relative (1e-14 of the array's largest entry)."""
  with jax.enable_x64(True):
    per_shard = _accumulated("float64", MESH_D2F2T2, 2)
    one = _accumulated("float64", None, 1)
    plain = _accumulated("float64", None, 2)
  _assert_close(per_shard, one, 1e-12, 1e-14)
  _assert_close(per_shard, plain, 1e-12, 1e-14)
  # the gradients are not trivially equal: a missing data shard would halve them
  assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(one[2])) > 1e-3


@pytest.mark.slow
def test_per_shard_accumulation_equals_one_batch_f32():
  """The same in f32 against one value_and_grad on the same mesh (on one device the sharded
  forward's own matmul order moves the f32 gradients by up to ~5e-4 of an array's largest
  entry, with or without accumulation): the accumulation's order changes the last bits of
  sums of ~10^3 terms, so 1e-5 relative or 1e-5 of the array's largest entry."""
  per_shard = _accumulated("float32", MESH_D2F2T2, 2)
  one = _accumulated("float32", MESH_D2F2T2, 1)
  _assert_close(per_shard, one, 1e-5, 1e-5)


def _topology(num_slices, topology=TOPOLOGY):
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail('libtpu is not installed: pip install "jax[tpu]==0.10.2" (requirements-accel.txt)')
  return topologies.get_topology_desc(topology, "tpu", num_slices=num_slices).devices


@pytest.fixture(scope="module")
def one_slice():
  return _topology(1)


@pytest.fixture(scope="module")
def two_slices():
  return _topology(2)


# ---- the mesh ----


@pytest.mark.tpu_compile
def test_hybrid_mesh_puts_data_across_slices(two_slices):
  """Default `mesh.dcn`: data spans the slices, fsdp and tensor stay inside one."""
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}, two_slices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}


@pytest.mark.tpu_compile
def test_hybrid_mesh_dcn_on_another_axis(two_slices):
  mesh = mesh_lib.make_mesh(
    {"data": 1, "fsdp": -1, "tensor": 2}, two_slices, dcn_cfg={"data": 1, "fsdp": 2, "tensor": 1}
  )
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
  # fsdp index j lies in slice j // 2: the slices are the outer factor of the axis
  slices = [{d.slice_index for d in mesh.devices[0, j].flat} for j in range(4)]
  assert slices == [{0}, {0}, {1}, {1}]


@pytest.mark.tpu_compile
@pytest.mark.parametrize(
  "shape, dcn, match",
  [
    ({"data": -1, "fsdp": 1, "tensor": 1}, {"data": 4}, "mesh.dcn"),
    ({"data": 1, "fsdp": -1, "tensor": 1}, {"data": 2}, "mesh.shape.data=1 cannot span 2"),
  ],
)
def test_bad_dcn_is_refused(two_slices, shape, dcn, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.make_mesh(shape, two_slices, dcn_cfg=dcn)


@pytest.mark.tpu_compile
def test_dcn_needs_slices(one_slice):
  with pytest.raises(ValueError, match="1 slice"):
    mesh_lib.make_mesh({"data": -1}, one_slice, dcn_cfg={"data": 2})
  assert mesh_lib.num_slices(one_slice) == 1
  mesh = mesh_lib.make_mesh({"data": -1}, one_slice, dcn_cfg={"data": -1})  # the default fits
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "context": 1, "tensor": 1}


# ---- the compiled train step ----


def _compile_step(mesh, batch, microbatches):
  """The trainer's step (shardings, donation) for a 2-layer MatMul-free LM on `mesh`."""
  cfg = config_lib.base_config()
  cfg.model.update(
    vocab_size=256, d_model=256, num_layers=2, num_heads=4, dtype="bfloat16", remat="dots_no_batch"
  )
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  tx = optim.make_optimizer(cfg.optim, 100)
  state_shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
    steps.make_train_step(
      model_cfg,
      state_lib.model_graphdef(model_cfg),
      tx,
      optim.learning_rate_schedule(cfg.optim, 100),
      microbatches=microbatches,
      mesh=mesh,
      rules=rules,
    ),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  window = jax.ShapeDtypeStruct((batch, 65), jnp.int32, sharding=batch_sharding)
  abstract = state_lib.abstract_train_state(model_cfg, tx, state_shardings)
  compiled = step.lower(abstract, {"tokens": window, "segment_ids": window}).compile()
  per_chip_grads = sum(
    math.prod(p.sharding.shard_shape(p.shape)) for p in jax.tree.leaves(abstract.params)
  )
  return compiled, per_chip_grads


@pytest.fixture(scope="module")
def compiled_steps():
  """The same per-chip work on one v5e-8 slice (batch 16) and on two (batch 32, data across),
  2 microbatches, on the 370M's v5e-8 mesh (fsdp 4 x tensor 2): fsdp 4 is what made XLA
  reshard the MLGRU lower bounds per layer with partners in the other slice."""
  shape = {"data": -1, "fsdp": 4, "tensor": 2}
  one, grads_one = _compile_step(mesh_lib.make_mesh(shape, _topology(1, STEP_TOPOLOGY)), 16, 2)
  two, grads_two = _compile_step(mesh_lib.make_mesh(shape, _topology(2, STEP_TOPOLOGY)), 32, 2)
  assert grads_one == grads_two
  return one, two, grads_two


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_only_the_gradient_reduction_crosses_slices_once_per_step(compiled_steps):
  """With 2 microbatches (accumulated per data shard, `sharding.sum_over_shards`) nothing
  crosses the slices inside the microbatch or the layer scan: the one cross-slice traffic is
  the all-reduce of the accumulated gradients after them."""
  _, two, per_chip_grads = compiled_steps
  text = two.as_text()
  assert re.search(r"num_partitions=8\b", text)  # one slice's program; the rest is DCN
  transfers = dcn.dcn_transfers(text)
  assert transfers and {t.kind for t in transfers} == {"ALL_REDUCE"}, transfers
  assert text.count(" while(") >= 2, "the microbatch and layer scans are while loops"
  assert [t for t in transfers if t.in_loop] == []  # not per microbatch, not per layer
  sent = sum(t.elements for t in transfers)
  # every gradient element crosses once; beyond that only the loss/token/finite scalars,
  # each padded to one 128-lane row
  assert per_chip_grads <= sent <= per_chip_grads + 128 * 16, (sent, per_chip_grads)


@pytest.mark.tpu_compile
def test_per_chip_memory_matches_one_slice(compiled_steps):
  """Params and optimizer state per chip are the one-slice figure; temporaries are at most
  the one-slice figure plus the DCN all-reduce's send and receive buffers (two fp32 copies of
  the chip's gradients). They may be lower: the per-data-shard accumulation is another
  program than one slice's plain scan, and XLA schedules it differently."""
  one, two, per_chip_grads = compiled_steps
  m1, m2 = one.memory_analysis(), two.memory_analysis()
  assert m2.argument_size_in_bytes == m1.argument_size_in_bytes
  assert m2.output_size_in_bytes == m1.output_size_in_bytes
  assert m2.temp_size_in_bytes <= m1.temp_size_in_bytes + 2 * 4 * per_chip_grads, (
    m1.temp_size_in_bytes,
    m2.temp_size_in_bytes,
  )


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_fsdp_across_slices_is_seen_crossing(two_slices):
  """The control: with fsdp spanning the slices, the per-layer parameter all-gathers cross
  the DCN inside the layer scan, and the checks above see it."""
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 2}, two_slices, dcn_cfg={"fsdp": 2})
  compiled, _ = _compile_step(mesh, 8, 1)
  transfers = dcn.dcn_transfers(compiled.as_text())
  assert "ALL_GATHER" in {t.kind for t in transfers}
  assert [t for t in transfers if t.in_loop]


@pytest.mark.tpu_compile
def test_aot_multislice_report_verdicts():
  """benchmarks.aot_multislice's RESULTS.md rows: a reduction inside a loop or a per-chip
  peak above the one-slice figure is a 'no'."""
  from benchmarks import aot_multislice

  def row(slices, peak, in_loop):
    return {
      "kind": "mmfree",
      "slice": "v5e-8",
      "num_slices": slices,
      "mesh": {"data": slices, "fsdp": 4, "tensor": 2},
      "microbatches": 32,
      "remat": "none",
      "global_batch": 256 * slices,
      "compile_s": 1.0,
      "memory": {"argument_bytes": 1, "temp_bytes": 1, "peak_bytes": peak},
      "dcn": {
        "transfers": 3 * (slices - 1),
        "kinds": ["ALL_REDUCE"] * (slices > 1),
        "elements_per_chip": 2**20,
        "in_loop": in_loop,
      },
    }

  good = {"rows": [row(1, 10, 0), row(2, 10, 0)]}
  bad = {"rows": [row(1, 10, 0), row(2, 11, 3)]}
  assert [r[-1] for r in aot_multislice.targets(good, {})] == ["**yes**", "**yes**"]
  assert [r[-1] for r in aot_multislice.targets(bad, {})] == ["no", "no"]
  assert "| mmfree 370m | 2 x v5e-8 | 2/4/2 |" in aot_multislice.markdown(good, {})
