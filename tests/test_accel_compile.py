"""Accelerator programs built on the CPU host, no accelerator needed.

- CUDA: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` with jax-cuda12-plugin and
  jax-cuda12-pjrt installed: the Pallas kernels lower to Triton custom calls.
- TPU: libtpu (from `jax[tpu]`) compiles for the devices of a `v5e:2x2` topology description;
  the Mosaic kernels compile on one device and, through `shard_map`, on the topology's mesh.

JAX itself still runs on CPU (tests/conftest.py sets JAX_PLATFORMS=cpu).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from mmfree_jax.kernels import bitlinear_quant, dispatch
from mmfree_jax.kernels import common as kernel_common
from mmfree_jax.ops import bitlinear as bitlinear_ops
from mmfree_jax.parallel import kernel_sharding

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
TPU_TOPOLOGY = "v5e:2x2"


def _require(module: str, install: str):
  if importlib.util.find_spec(module) is None:
    pytest.fail(
      f"{module} is not installed: {install} (requirements.txt / "
      "requirements-nodeps.txt install it in CI)"
    )


@pytest.fixture(autouse=True, scope="module")
def no_persistent_cache_writes():
  """Executables compiled for a topology without a client cannot be read back from the
  persistent compilation cache (a warning on every later run): do not write them."""
  key = "jax_persistent_cache_min_compile_time_secs"
  saved = getattr(jax.config, key)
  jax.config.update(key, 1e9)
  yield
  jax.config.update(key, saved)


@pytest.fixture(scope="module")
def tpu_devices():
  _require("libtpu", 'pip install "jax[tpu]==0.10.2"')
  return topologies.get_topology_desc(platform="tpu", topology_name=TPU_TOPOLOGY).devices


@pytest.fixture(scope="module")
def cuda_plugin():
  _require(
    "jax_cuda12_plugin", "pip install --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2"
  )


def _kernels_loss(platform):
  """Recurrence and fused BitLinear in one differentiated program."""

  def loss(f, i, h0, x, w, g):
    h, h_last = dispatch.recurrence(f, i, h0, platform=platform)
    y = bitlinear_ops.bitlinear_fused(x, w, g, dtype=jnp.bfloat16, platform=platform)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(h_last) + jnp.sum(y.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def _kernel_args(dtype, sharding=None, batch=2, seq=64, dim=256):
  s = lambda shape, dt=jnp.float32, sh=sharding: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  return (
    s((batch, seq, dim), dtype),
    s((batch, seq, dim), dtype),
    s((batch, dim)),
    s((batch, seq, dim), dtype),
    s((dim, 384)),
    s((dim,)),
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cuda_lowering_of_gpu_kernels(cuda_plugin, dtype):
  lowered = (
    jax.jit(_kernels_loss("gpu")).trace(*_kernel_args(dtype)).lower(lowering_platforms=("cuda",))
  )
  text = lowered.as_text()
  # recurrence forward + backward, quantizer forward (its backward is XLA)
  assert text.count(TRITON_CALL) == 3, text.count(TRITON_CALL)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tpu_compile_of_tpu_kernels_single_device(tpu_devices, dtype):
  sharding = SingleDeviceSharding(tpu_devices[0])
  compiled = jax.jit(_kernels_loss("tpu")).lower(*_kernel_args(dtype, sharding)).compile()
  assert compiled.as_text().count(MOSAIC_CALL) == 3
  assert compiled.memory_analysis() is not None


@pytest.mark.tpu_compile
def test_tpu_compile_of_tpu_kernels_under_shard_map(tpu_devices):
  mesh = Mesh(
    np.asarray(tpu_devices).reshape(2, 1, 2),
    ("data", "fsdp", "tensor"),
    axis_types=(AxisType.Auto,) * 3,
  )
  seq = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
  state = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  rep = NamedSharding(mesh, P())
  f, i, h0, x, w, g = _kernel_args(jnp.bfloat16, batch=4)
  with_sharding = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
  args = (
    with_sharding(f, seq),
    with_sharding(i, seq),
    with_sharding(h0, state),
    with_sharding(x, rows),
    with_sharding(w, rep),
    with_sharding(g, rep),
  )

  def sharded(*args):
    with kernel_sharding.kernel_sharding(mesh):
      return _kernels_loss("tpu")(*args)

  compiled = jax.jit(sharded).lower(*args).compile()
  assert compiled.as_text().count(MOSAIC_CALL) == 3


@pytest.mark.tpu_compile
def test_tpu_kernels_need_shard_map_on_a_mesh(tpu_devices):
  """Without `kernel_sharding` a Mosaic call on a mesh sharding fails (why the wrapper exists)."""
  mesh = Mesh(np.asarray(tpu_devices).reshape(4), ("data",))
  rows = NamedSharding(mesh, P("data"))
  x = jax.ShapeDtypeStruct((4, 8, 128), jnp.float32, sharding=rows)
  gamma = jax.ShapeDtypeStruct((128,), jnp.float32, sharding=NamedSharding(mesh, P()))
  quantize = lambda x, g: bitlinear_quant.rmsnorm_quantize(x, g, platform="tpu")[0]
  with pytest.raises(NotImplementedError, match="shard_map"):
    jax.jit(quantize).lower(x, gamma).compile()

  def sharded(x, g):  # the context is read when tracing: enter it inside the jitted function
    with kernel_sharding.kernel_sharding(mesh, batch_axes="data", feature_axes=None):
      return quantize(x, g)

  assert MOSAIC_CALL in jax.jit(sharded).lower(x, gamma).compile().as_text()


# ---- the full sharded train step ----


def _train_step(
  kind, mesh, *, d_model=256, num_layers=1, vocab=256, seq=64, batch=8, overrides=None
):
  """The trainer's jitted step (same shardings, donation) for abstract inputs on `mesh`."""
  from mmfree_jax import config as config_lib
  from mmfree_jax.parallel import sharding
  from mmfree_jax.train import optim, steps
  from mmfree_jax.train import state as state_lib

  cfg = config_lib.base_config()
  cfg.model.update(
    kind=kind,
    vocab_size=vocab,
    d_model=d_model,
    num_layers=num_layers,
    num_heads=max(1, d_model // 64),
    dtype="bfloat16",
    remat="dots_no_batch",
  )
  cfg.model.update(overrides or {})
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  if not overrides:
    assert (model_cfg.scan_type, model_cfg.bitlinear_impl) == ("auto", "auto")  # the defaults
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  tx = optim.make_optimizer(cfg.optim, 100)
  schedule = optim.learning_rate_schedule(cfg.optim, 100)
  state_shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
    steps.make_train_step(
      model_cfg, state_lib.model_graphdef(model_cfg), tx, schedule, mesh=mesh, rules=rules
    ),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  window = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=batch_sharding)
  args = (
    state_lib.abstract_train_state(model_cfg, tx, state_shardings),
    {"tokens": window, "segment_ids": window},
  )
  return step, args


def _tpu_mesh(devices, data=2, fsdp=1, tensor=2):
  return jax.make_mesh(
    (data, fsdp, tensor),
    ("data", "fsdp", "tensor"),
    axis_types=(AxisType.Auto,) * 3,
    devices=devices,
  )


@pytest.mark.slow
@pytest.mark.tpu_compile
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_tpu_compile_of_sharded_train_step(tpu_devices, kind):
  """scan_type/bitlinear_impl 'auto' resolve to the Mosaic kernels from the mesh's TPU devices
  (the host is a CPU), and the step compiles for v5e:2x2 with data=2 x tensor=2."""
  step, args = _train_step(kind, _tpu_mesh(tpu_devices))
  compiled = step.lower(*args).compile()
  text = compiled.as_text()
  if kind == "mmfree":
    # per layer scan body: recurrence fwd + bwd, and the quantizer of each BitLinear input
    assert text.count(MOSAIC_CALL) >= 3
    assert "mmfree_recurrence_bwd" in text and "mmfree_rmsnorm_quantize" in text
  else:
    assert MOSAIC_CALL not in text
  assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_tpu_compile_of_int8_bitlinear_train_step(tpu_devices):
  """aot_tpu's int8 column compiles the chosen point again with `bitlinear_impl=int8`: that
  program (int8 codes in the forward matmuls) compiles for TPU, here at a small shape."""
  step, args = _train_step("mmfree", _tpu_mesh(tpu_devices), overrides={"bitlinear_impl": "int8"})
  compiled = step.lower(*args).compile()
  assert "s8[" in compiled.as_text() and compiled.memory_analysis().temp_size_in_bytes > 0


# Lowest XLA effort: the program and its kernels are the same, the compile takes ~40% less
# time (the memory numbers of the TPU table come from benchmarks/aot_tpu.py at full effort).
FAST_COMPILE = {"exec_time_optimization_effort": -1.0, "memory_fitting_effort": -1.0}
V5E_HBM_BYTES = 16 * 2**30


@pytest.mark.slow
@pytest.mark.tpu_compile
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_tpu_compile_of_sharded_train_step_370m(tpu_devices, kind):
  """The paper's 370M shape (d=1024, 24 layers, vocab 32000, T=2048, bf16, remat
  dots_no_batch), 2 sequences per data shard, compiles for v5e:2x2 (data=2 x tensor=2) with
  the Mosaic kernels `auto` picks on TPU (the recurrence and quantizer; splash attention for
  Transformer++) and fits a v5e chip's HBM."""
  step, args = _train_step(
    kind, _tpu_mesh(tpu_devices), d_model=1024, num_layers=24, vocab=32000, seq=2048, batch=4
  )
  compiled = step.lower(*args).compile(compiler_options=FAST_COMPILE)
  text = compiled.as_text()
  if kind == "mmfree":
    assert "mmfree_recurrence_bwd" in text and "mmfree_rmsnorm_quantize" in text
  else:
    assert "splash_mha" in text
  memory = compiled.memory_analysis()
  assert 0 < memory.argument_size_in_bytes + memory.temp_size_in_bytes < V5E_HBM_BYTES


def test_cuda_lowering_of_sharded_train_step(cuda_plugin):
  """The MatMul-free step on 8 (CPU) devices lowered for CUDA with the GPU kernels (chosen by
  `kernel_platform`, since these mesh devices are CPUs): Triton calls inside."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  step, args = _train_step("mmfree", mesh)
  with dispatch.kernel_platform("gpu"):
    lowered = step.trace(*args).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count(TRITON_CALL) >= 3 and "mmfree_recurrence_bwd" in text


@pytest.mark.parametrize("scan_type", ["pallas"])
def test_cuda_lowering_refuses_the_interpreted_tpu_kernel(cuda_plugin, scan_type):
  """Without `kernel_platform("gpu")` a CPU host resolves the Pallas recurrence to the TPU
  kernel, interpreted; lowering that for CUDA is an error naming the fix, not a warning."""
  from mmfree_jax.ops import recurrence

  f = jax.ShapeDtypeStruct((1, 16, 128), jnp.float32)
  h0 = jax.ShapeDtypeStruct((1, 128), jnp.float32)
  step = lambda: jax.jit(lambda f, i, h0: recurrence.get_recurrence(scan_type)(f, i, h0))
  with (
    pytest.warns(kernel_common.KernelFallbackWarning),
    pytest.raises(ValueError, match=r"lowered for cuda.*kernel_platform\('gpu'\)"),
  ):
    step().trace(f, f, h0).lower(lowering_platforms=("cuda",))
  with dispatch.kernel_platform("gpu"):  # the fix the message names (traced anew under it)
    text = step().trace(f, f, h0).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count(TRITON_CALL) == 1
