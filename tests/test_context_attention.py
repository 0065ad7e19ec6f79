"""The Transformer++ with the sequence split over the context axis (`parallel.context_attention`,
`parallel.context_positions`; issue 27 item 3): attention outputs, logits and every gradient
equal one device in float64 (tolerance 1e-12 relative: the same f64 sums, only the softmax's
masked terms and the gradients' reduce-scatter grouped differently), with packed documents and
grouped-query K/V; the compiled HLO's context collectives are the K/V all-gather and, in the
backward, its reduce-scatter, plus `[batch]`-sized position exchanges: no other array with a
sequence dimension crosses the context axis."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax import config as config_lib
from mmfree_jax.kernels import attention_tpu, common
from mmfree_jax.nn import model as model_lib
from mmfree_jax.ops import attention
from mmfree_jax.parallel import context_attention, sharding
from mmfree_jax.parallel import mesh as mesh_lib
from tests.test_accel_compile import MOSAIC_CALL, _train_step, tpu_devices  # noqa: F401
from tests.test_model_reference import randomize_params

F64_TOL = 1e-12
MESHES = {"context8": {"data": 1, "context": 8}, "data2_context4": {"data": 2, "context": 4}}
RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)


def _segments(batch, seq, seed=0):
  """Packed documents: row 0 cut inside a shard and on a shard boundary (seq / 2), row 1 one
  document, further rows random cuts; then padding (id 0) at the end of the last row."""
  rng = np.random.default_rng(seed)
  out = np.ones((batch, seq), np.int32)
  out[0, seq // 3 :] = 2
  out[0, seq // 2 :] = 3
  for r in range(2, batch):
    out[r, rng.integers(1, seq) :] = 2
  out[-1, seq - 3 :] = 0
  return out


def _rel_err(got, want):
  got, want = np.asarray(got), np.asarray(want)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300)


@pytest.mark.parametrize("mesh_shape", sorted(MESHES) + ["context4_tensor2"])
@pytest.mark.parametrize("impl", ["naive", "xla"])
def test_attention_op_equals_one_device(mesh_shape, impl):
  """`ops.attention.causal_attention` under a context mesh: out and d/d(q, k, v), GQA. XLA's
  attention (`jax.nn`, whose softmax runs in fp32 even for f64 inputs) in float32, to 1e-5
  relative: fp32 sums in another order. On context 4 x tensor 2 the heads split over tensor
  and the one K/V head is repeated to two first (as `kernel_sharding.attention` does)."""
  dtype, tol = (jnp.float64, F64_TOL) if impl == "naive" else (jnp.float32, 1e-5)
  shapes = {**MESHES, "context4_tensor2": {"data": 1, "context": 4, "tensor": 2}}
  mesh = mesh_lib.make_mesh(shapes[mesh_shape])
  batch, seq, heads, hd = 2, 32, 4, 8
  kv_heads = 1 if mesh_shape == "context4_tensor2" else 2
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    q = jnp.asarray(rng.normal(size=(batch, seq, heads, hd)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, seq, kv_heads, hd)), dtype) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(batch, seq, heads, hd)))
    seg = jnp.asarray(_segments(batch, seq))

    def loss(q, k, v, split):
      if not split:
        out = attention.causal_attention(q, k, v, seg, impl=impl)
      else:
        with sharding.logical_sharding(mesh, RULES):
          out = attention.causal_attention(q, k, v, seg, impl=impl)
      return jnp.sum(jnp.sin(out) * w), out

    grad = lambda split: jax.jit(
      jax.grad(lambda *a: loss(*a, split), argnums=(0, 1, 2), has_aux=True)
    )
    lowered = jax.jit(lambda q, k, v: loss(q, k, v, True)[1]).lower(q, k, v).as_text()
    assert "all_gather" in lowered  # the context path ran
    want, got = grad(False)(q, k, v), grad(True)(q, k, v)
  for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _rel_err(g, w_) <= tol


def test_splash_per_context_shard():
  """`attention_impl=splash` on data 2 x context 4: the TPU kernel (interpreted) per shard with
  an offset causal mask (a `lax.switch` over the shard's position), GQA and packed documents,
  equal to the one-device naive attention in fp32 to tests/test_attention_tpu.py's tolerances
  (2e-6 forward, 1e-5 gradients, relative to the largest magnitude)."""
  mesh = mesh_lib.make_mesh(MESHES["data2_context4"])
  batch, seq, heads, kv_heads, hd = 2, 128, 4, 2, 16
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(batch, seq, heads, hd)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, seq, kv_heads, hd)), jnp.float32) for _ in "kv")
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  seg = jnp.asarray(_segments(batch, seq, seed=4))

  def value_and_grads(impl, split):
    def fn(q, k, v):
      if not split:
        return attention.causal_attention(q, k, v, seg, impl=impl)
      with sharding.logical_sharding(mesh, RULES):
        return attention.causal_attention(q, k, v, seg, impl=impl)

    def run(q, k, v):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(cot)

    return jax.jit(run)(q, k, v)

  with warnings.catch_warnings():
    warnings.simplefilter("error", common.KernelFallbackWarning)  # the kernel, not a fallback
    warnings.filterwarnings("ignore", "attention_impl=splash.*interpret")
    got = value_and_grads("splash", True)
  want = value_and_grads("naive", False)
  assert _rel_err(got[0], want[0]) <= 2e-6
  for g, w in zip(got[1], want[1]):
    assert _rel_err(g, w) <= 1e-5


def test_positions_and_resets_equal_one_device():
  """Shard-aware positions in document and reset mask (resets on shard boundaries, documents
  spanning several shards) equal the one-device formulas."""
  mesh = mesh_lib.make_mesh(MESHES["context8"])
  seg = jnp.asarray(_segments(4, 64, seed=3))
  want = (model_lib.positions_in_document(seg), model_lib.reset_mask(seg))

  def split(seg):
    with sharding.logical_sharding(mesh, RULES):
      return model_lib.positions_in_document(seg), model_lib.reset_mask(seg)

  got = jax.jit(split)(seg)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert int(np.max(want[0])) > 64 // 8  # a document spans shards


def _tiny_transformer():
  cfg = ModelConfig.tiny(
    kind="transformer",
    num_kv_heads=2,
    dtype="float64",
    param_dtype="float64",
    attention_impl="naive",
  )
  model = mmfree_jax.build_model(cfg, 0)
  randomize_params(model, seed=3)
  return cfg, model


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", sorted(MESHES))
def test_transformer_logits_and_gradients_equal_one_device(mesh_shape):
  """A tiny Transformer++ (float64, random parameters, GQA, packed documents): logits and
  every parameter gradient with the sequence on the context axis equal one device."""
  mesh = mesh_lib.make_mesh(MESHES[mesh_shape])
  rng = np.random.default_rng(5)
  batch, seq = 2, 32
  tokens = jnp.asarray(rng.integers(0, 256, (batch, seq)), jnp.int32)
  segments = jnp.asarray(_segments(batch, seq, seed=7))
  with jax.enable_x64(True):
    cfg, model = _tiny_transformer()
    graphdef, params = nnx.split(model)
    weights = jnp.asarray(rng.normal(size=(batch, seq, cfg.vocab_size)))

    def run(params, split):
      def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids=segments)
        return jnp.sum(jnp.tanh(logits) * weights), logits

      if not split:
        return jax.grad(loss, has_aux=True)(params)
      with sharding.logical_sharding(mesh, RULES):
        return jax.grad(loss, has_aux=True)(params)

    one = jax.jit(lambda p: run(p, False))(params)
    split = jax.jit(lambda p: run(p, True))
    assert "all_gather" in split.lower(params).as_text()  # the context attention ran
    got = split(params)
  assert len(jax.tree.leaves(got)) > 5
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(one)):
    assert _rel_err(g, w) <= F64_TOL


_COLLECTIVE = re.compile(
  r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|collective-permute"
  r"|all-to-all)(?:-start)?\("
)


def test_context_collectives_are_the_kv_all_gather():
  """The compiled fwd + bwd of the Transformer++ on context 8: every collective holding a
  sequence dimension is an all-gather of one layer's K or V (`[batch, seq, kv_heads,
  head_dim]`, float) or of the key segment ids (int32 `[batch, seq]`), or the backward's
  reduce-scatter of dK/dV; the position exchanges are `[batch]`-sized."""
  mesh = mesh_lib.make_mesh(MESHES["context8"])
  batch, seq, context = 2, 320, 8  # 320, 40: no parameter has these sizes
  with jax.enable_x64(True):
    cfg, model = _tiny_transformer()
    graphdef, params = nnx.split(model)

    def loss(params, tokens, segments):
      with sharding.logical_sharding(mesh, RULES):
        logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids=segments)
      return jnp.sum(logits[..., 0])

    spec = sharding.NamedSharding(mesh, sharding.PartitionSpec(("data", "fsdp"), "context"))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=spec)
    text = jax.jit(jax.grad(loss)).lower(params, tokens, tokens).compile().as_text()
  kv = [batch, seq, cfg.num_kv_heads, cfg.head_dim]
  found = []
  for match in _COLLECTIVE.finditer(text):
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1)):
      found.append((match.group(2), dtype, [int(n) for n in dims.split(",") if n]))
  seq_sized = [f for f in found if {seq, seq // context} & set(f[2])]
  local_kv = [batch, seq // context, cfg.num_kv_heads, cfg.head_dim]
  assert found.count(("all-gather", "f64", kv)) >= 2  # K and V (in the layer loop)
  assert ("all-gather", "s32", [batch, seq]) in seq_sized  # the keys' segment ids
  assert found.count(("reduce-scatter", "f64", local_kv)) >= 2  # dK, dV
  allowed = [("all-gather", "f64", kv), ("all-gather", "s32", [batch, seq])]
  allowed.append(("reduce-scatter", "f64", local_kv))
  assert [f for f in seq_sized if f not in allowed] == []
  # the positions: the previous shard's last id, each shard's latest document start
  assert ("collective-permute", "s32", [batch]) in found
  assert ("all-gather", "s32", [context, batch]) in found


def test_bad_input_is_refused_with_the_fix():
  mesh = mesh_lib.make_mesh(MESHES["context8"])
  q = jnp.ones((1, 12, 2, 4))
  fn = lambda *a: a[0]
  with pytest.raises(ValueError, match="not a multiple of the 8 context shards"):
    context_attention.context_attention(fn, q, q, q, mesh=mesh)
  with pytest.raises(ValueError, match="no 'context' axis"):
    context_attention.context_attention(fn, q, q, q, mesh=jax.make_mesh((8,), ("data",)))


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_tpu_compile_of_transformer_step_on_a_context_mesh(tpu_devices):  # noqa: F811
  """The Transformer++ train step (`attention_impl=auto`: splash from the mesh's TPU devices,
  packed windows) compiles for v5e:2x2 with context=4: the splash forward, dq and dkv kernels
  run per shard (one per shard position, offset causal masks) against the gathered K/V."""
  mesh = jax.make_mesh(
    (1, 1, 4, 1),
    ("data", "fsdp", "context", "tensor"),
    axis_types=(AxisType.Auto,) * 4,
    devices=tpu_devices,
  )
  step, args = _train_step("transformer", mesh, d_model=128, seq=512, batch=2)
  text = step.lower(*args).compile().as_text()
  assert MOSAIC_CALL in text and "all-gather" in text
  for name in attention_tpu.KERNEL_NAMES:
    assert f"{name}_segmented" in text, name
