"""The TPU splash attention path of the Transformer++ (`kernels.attention_tpu`,
`model.attention_impl=splash`, `auto` on TPU) against the naive softmax attention.

- Pallas interpret mode on CPU (the kernel's own Python body, its block mask and block
  skipping, its custom_vjp backward): forward within 2e-6 and gradients within 1e-5 of the
  naive reference, relative to the largest magnitude (fp32; the kernel's online softmax sums
  in another order). Cases: causal over two 128-blocks (one skipped, one diagonal); packed
  documents crossing a block edge with grouped-query K/V and a length padded 200 -> 256; the
  same sharded over 8 devices (batch x heads, K/V heads repeated for the tensor axis).
- Dispatch: `auto` per platform and input, explicit names off TPU, bad input.
- TPU AOT compile from this CPU host (libtpu, v5e:2x2): the Transformer++ train step with
  `attention_impl=auto` under a data x tensor mesh holds the splash Mosaic calls.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from mmfree_jax import ModelConfig
from mmfree_jax.config import describe_impls
from mmfree_jax.kernels import attention_tpu, common, dispatch
from mmfree_jax.ops import attention
from mmfree_jax.parallel import kernel_sharding
from tests.test_accel_compile import (  # noqa: F401
  MOSAIC_CALL,
  _tpu_mesh,
  _train_step,
  no_persistent_cache_writes,
  tpu_devices,
)

FWD_TOL, GRAD_TOL = 2e-6, 1e-5


def _inputs(seed, batch, seq, heads, kv_heads, head_dim=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, seq, heads, head_dim))
  k, v = (rng.normal(size=(batch, seq, kv_heads, head_dim)) for _ in range(2))
  cot = rng.normal(size=(batch, seq, heads, head_dim))  # the output's cotangent
  return [jnp.asarray(t, dtype) for t in (q, k, v, cot)]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(1e-30, np.max(np.abs(b)))


def _value_and_grads(fn, q, k, v, cot):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(cot)


def _check(fn, q, k, v, cot, segment_ids):
  naive = lambda q, k, v: attention.causal_attention(q, k, v, segment_ids, impl="naive")
  out, grads = jax.jit(lambda *a: _value_and_grads(fn, *a))(q, k, v, cot)
  ref, ref_grads = jax.jit(lambda *a: _value_and_grads(naive, *a))(q, k, v, cot)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert _rel(out, ref) < FWD_TOL, _rel(out, ref)
  for name, g, r in zip("qkv", grads, ref_grads):
    assert g.shape == r.shape and _rel(g, r) < GRAD_TOL, (name, _rel(g, r))


# Three documents in row 0 (the 2 -> 3 boundary inside the second 128-block), one document and
# padding (id 0) in row 1.
_PACKED = np.stack([np.repeat([1, 2, 3], [90, 70, 40]), np.repeat([5, 0], [170, 30])])


@pytest.mark.parametrize("case", ["causal_2_blocks", "packed_gqa_padded"])
def test_splash_interpret_equals_naive(case):
  if case == "causal_2_blocks":  # grid 2 x 2: block (0, 1) skipped, diagonals partial
    q, k, v, cot = _inputs(0, batch=1, seq=256, heads=2, kv_heads=2)
    segment_ids = None
  else:  # seq 200 padded to 256; 4 query heads on 2 K/V heads
    q, k, v, cot = _inputs(1, batch=2, seq=200, heads=4, kv_heads=2)
    segment_ids = jnp.asarray(_PACKED, jnp.int32)
  fn = lambda q, k, v: attention_tpu.splash_attention(
    q, k, v, segment_ids, interpret=True, block=128
  )
  _check(fn, q, k, v, cot, segment_ids)


def test_splash_sharded_through_causal_attention():
  """`attention_impl=splash` from the ops dispatcher on 8 CPU devices: the TPU kernel runs
  interpreted (with the dispatcher's warning) per shard, batch on data (2) and heads on tensor
  (4), the 2 K/V heads repeated to 4 for the tensor axis; equal to the unsharded naive path."""
  mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  q, k, v, cot = _inputs(2, batch=2, seq=200, heads=4, kv_heads=2)
  segment_ids = jnp.asarray(_PACKED, jnp.int32)

  def fn(q, k, v):
    with kernel_sharding.kernel_sharding(mesh):
      return attention.causal_attention(q, k, v, segment_ids, impl="splash")

  with pytest.warns(common.KernelFallbackWarning, match="attention_impl=splash.*interpret"):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    _check(fn, q, k, v, cot, segment_ids)


def test_auto_resolution_per_platform():
  resolve = attention.resolve_attention_impl
  f32, bf16, f16, f64 = jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64
  assert resolve("auto", bf16, 128, seq=2048, platform="tpu") == "splash"
  assert resolve("auto", f32, 64, seq=128, platform="tpu") == "splash"
  assert resolve("auto", bf16, 64, platform="tpu") == "splash"  # seq unknown: a window
  assert resolve("auto", bf16, 64, seq=64, platform="tpu") == "xla"  # under one block
  assert resolve("auto", f16, 64, seq=2048, platform="tpu") == "xla"  # no Mosaic fp16
  assert resolve("auto", f64, 64, seq=2048, platform="tpu") == "naive"
  assert resolve("auto", bf16, 64, seq=2048, platform="gpu") == "cudnn"
  assert resolve("auto", bf16, 64, seq=2048, platform="cpu") == "xla"
  assert resolve("splash", bf16, 64, seq=8, platform="cpu") == "splash"  # explicit
  # the platform defaults to the kernels' (an AOT target's mesh, a kernel_platform block)
  with dispatch.kernel_platform("tpu"):
    assert resolve("auto", bf16, 64, seq=256) == "splash"
  cfg = ModelConfig.tiny(kind="transformer", dtype="bfloat16")
  assert "attention_impl=auto -> splash" in describe_impls(cfg, "tpu")
  assert "attention_impl=auto -> cudnn" in describe_impls(cfg, "gpu")
  assert "attention_impl=auto -> xla" in describe_impls(cfg, "cpu")
  assert ModelConfig.tiny(kind="transformer", attention_impl="splash").attention_impl == "splash"


def test_splash_fallbacks_and_bad_input():
  q, k, v, _ = _inputs(3, batch=1, seq=128, heads=2, kv_heads=1, dtype=jnp.float16)
  xla = attention.causal_attention(q, k, v, impl="xla")
  # fp16: the kernel refuses it; the dispatcher runs XLA's with one line saying why
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = attention.causal_attention(q, k, v, impl="splash")
  messages = [str(w.message) for w in caught if w.category is common.KernelFallbackWarning]
  assert any("float16 is not supported" in m for m in messages), messages
  assert _rel(out, xla) == 0.0
  # a GPU has no splash kernel: XLA's, with a warning naming the alternatives
  q32, k32, v32 = (t.astype(jnp.float32) for t in (q, k, v))
  with (
    dispatch.kernel_platform("gpu"),
    pytest.warns(common.KernelFallbackWarning, match="TPU .*'auto' or 'cudnn'"),
  ):
    out = attention.causal_attention(q32, k32, v32, impl="splash")
  assert _rel(out, attention.causal_attention(q32, k32, v32, impl="xla")) == 0.0
  # called directly, without a fallback: a ValueError naming the problem, no Mosaic trace
  with pytest.raises(ValueError, match="float16 is not supported"):
    attention_tpu.splash_attention(q, k, v)
  with pytest.raises(ValueError, match="kv_heads dividing heads"):
    attention_tpu.splash_attention(q32, jnp.repeat(k32, 3, axis=2), jnp.repeat(v32, 3, axis=2))
  with pytest.raises(ValueError, match="segment_ids must be"):
    attention_tpu.splash_attention(q32, k32, v32, jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="multiple of 128"):
    attention_tpu.splash_attention(q32, k32, v32, block=64)
  assert [attention_tpu.block_size(n) for n in (100, 128, 384, 2048, 2000)] == [
    128,
    128,
    128,
    512,
    512,
  ]


@pytest.mark.tpu_compile
def test_tpu_compile_of_transformer_step_with_splash(tpu_devices):
  """`attention_impl=auto` resolves to splash from the mesh's TPU devices (the host is a CPU):
  the Transformer++ train step (packed windows: segment ids) compiles for v5e:2x2 with data=2
  x tensor=2 and holds the splash forward, dq and dkv Mosaic kernels."""
  step, args = _train_step("transformer", _tpu_mesh(tpu_devices), d_model=128, seq=128, batch=4)
  compiled = step.lower(*args).compile()
  text = compiled.as_text()
  assert MOSAIC_CALL in text
  for name in attention_tpu.KERNEL_NAMES:
    assert f"{name}_segmented" in text, name
  assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.tpu_compile
def test_tpu_compile_of_gqa_splash_under_shard_map(tpu_devices):
  """Grouped-query K/V on the tensor axis: 4 query heads on 1 K/V head, tensor=2 (K/V repeated
  to 2 heads, one per shard), bf16, forward and backward compiled for v5e:2x2."""
  mesh = _tpu_mesh(tpu_devices)
  spec = lambda shape, heads: jax.ShapeDtypeStruct(
    shape,
    jnp.bfloat16,
    sharding=jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, heads, None)),
  )
  ids = jax.ShapeDtypeStruct(
    (4, 256), jnp.int32, sharding=jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None))
  )

  def loss(q, k, v, segment_ids):
    with kernel_sharding.kernel_sharding(mesh):
      out = attention.causal_attention(q, k, v, segment_ids)  # auto: splash from the mesh
    return jnp.sum(out.astype(jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  kv = spec((4, 256, 1, 64), None)
  text = grads.lower(spec((4, 256, 4, 64), "tensor"), kv, kv, ids).compile().as_text()
  for name in attention_tpu.KERNEL_NAMES:
    assert f"{name}_segmented" in text, name
