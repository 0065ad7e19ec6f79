"""The memory-lean BitLinear (custom_vjp) against the autodiff one (quant.bitlinear).

Forward: the same expressions, so outputs are bit-identical (fp32 and bf16 compute).
Backward: equal in float64 to 1e-12 relative (both are the STE of docs/architecture.md §1; they
differ only in where an ulp of round-off lands), and to an independent numpy STE oracle. Memory: the
compiled backward keeps less (XLA's memory analysis, deterministic; no timings).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax.nn import layers
from mmfree_jax.numerics import quant
from mmfree_jax.ops import bitlinear as bitlinear_lean

EPS = 1e-6
F64_TOL = 1e-12


def _inputs(seed, lead=(6,), d_in=16, d_out=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=lead + (d_in,)) * rng.uniform(0.1, 3.0, size=lead + (1,))
  w = rng.normal(size=(d_in, d_out)) * 0.1
  gamma = rng.uniform(0.5, 1.5, size=(d_in,)) * rng.choice([-1.0, 1.0], size=(d_in,))
  dout = rng.normal(size=lead + (d_out,))
  return x, w, gamma, dout


def _np_ste_grads(x, w, gamma, dout):
  """numpy oracle: quantizers are the identity in backward, scales get no gradient."""
  x2, dout2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
  r = 1.0 / np.sqrt(np.mean(x2 * x2, -1, keepdims=True) + EPS)
  u = x2 * r
  xn = u * gamma
  sx = 127.0 / np.maximum(np.max(np.abs(xn), -1, keepdims=True), 1e-5)
  t = xn * sx
  xq = (
    np.clip(
      np.where(np.abs(t - np.trunc(t)) == 0.5, np.trunc(t) + np.sign(t), np.rint(t)), -128, 127
    )
    / sx
  )
  sw = 1.0 / max(np.mean(np.abs(w)), 1e-5)
  wq = np.clip(np.rint(w * sw), -1, 1) / sw
  dxn = dout2 @ wq.T
  du = dxn * gamma
  dx = r * du - x2 * r**3 * np.mean(du * x2, -1, keepdims=True)
  return dx.reshape(x.shape), xq.T @ dout2, np.sum(dxn * u, 0)


def _grads(fn, x, w, gamma, dout):
  loss = lambda x, w, g: jnp.sum(fn(x, w, g) * dout)
  return [np.asarray(a) for a in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, gamma)]


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_forward_bit_identical_fp32(lead):
  x, w, gamma, _ = _inputs(0, lead)
  args = [jnp.asarray(a, jnp.float32) for a in (x, w, gamma)]
  expected = np.asarray(jax.jit(quant.bitlinear)(*args))
  got = np.asarray(jax.jit(bitlinear_lean.bitlinear_lean)(*args))
  assert got.dtype == np.float32 and got.shape == lead + (8,)
  np.testing.assert_array_equal(got, expected)


def test_forward_bit_identical_bf16_compute():
  x, w, gamma, _ = _inputs(1)
  args = [jnp.asarray(a, jnp.float32) for a in (x, w, gamma)]
  f = lambda fn: jax.jit(lambda *a: fn(*a, dtype=jnp.bfloat16))(*args)
  expected, got = f(quant.bitlinear), f(bitlinear_lean.bitlinear_lean)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_gradients_equal_autodiff_and_numpy_f64(lead):
  x, w, gamma, dout = _inputs(2, lead)
  with jax.enable_x64(True):
    args = [jnp.asarray(a) for a in (x, w, gamma)]
    auto = _grads(quant.bitlinear, *args, dout)
    lean = _grads(bitlinear_lean.bitlinear_lean, *args, dout)
  oracle = _np_ste_grads(x, w, gamma, dout)
  for a, l, o in zip(auto, lean, oracle):
    assert l.dtype == np.float64 and l.shape == a.shape
    np.testing.assert_allclose(l, a, rtol=F64_TOL, atol=F64_TOL * np.max(np.abs(a)))
    np.testing.assert_allclose(l, o, rtol=1e-10, atol=1e-10 * np.max(np.abs(o)))
  assert np.max(np.abs(lean[2])) > 1e-3  # gamma gets a real gradient


def test_gradients_bf16_compute_close_to_autodiff():
  # bf16 matmuls: both sides round the same operands to bf16; the products differ only by
  # the order of fp32 accumulation and an ulp in the de-quantized activations (atol 2e-2 of
  # the gradient scale; a wrong formula is off by O(1)).
  x, w, gamma, dout = _inputs(3, (16,), d_in=32, d_out=16)
  args = [jnp.asarray(a, jnp.float32) for a in (x, w, gamma)]
  dout = jnp.asarray(dout, jnp.bfloat16)
  f = lambda fn: _grads(
    lambda *a: fn(*a, dtype=jnp.bfloat16).astype(jnp.float32), *args, dout.astype(jnp.float32)
  )
  for a, l in zip(f(quant.bitlinear), f(bitlinear_lean.bitlinear_lean)):
    np.testing.assert_allclose(l, a, atol=2e-2 * np.max(np.abs(a)))


def _stack_temp_bytes(impl, tokens=512, d=128, depth=4):
  fn = bitlinear_lean.get_bitlinear(impl)

  def loss(x, kernels, gammas):
    y, _ = jax.lax.scan(lambda x, kg: (fn(x, kg[0], kg[1]), None), x, (kernels, gammas))
    return jnp.sum(y * y)

  shapes = (
    jax.ShapeDtypeStruct((tokens, d), jnp.float32),
    jax.ShapeDtypeStruct((depth, d, d), jnp.float32),
    jax.ShapeDtypeStruct((depth, d), jnp.float32),
  )
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_lean_backward_keeps_less():
  # Autodiff keeps fp32 xq (+ norm intermediates) per layer; lean keeps int8 codes, the
  # input and [N, 1] scales: well under 3/4 of autodiff's temporaries here (measured ~0.5).
  auto, lean = _stack_temp_bytes("autodiff"), _stack_temp_bytes("lean")
  assert lean < 0.75 * auto, (lean, auto)


# ------------------------------------------------------------------------ config / module


def test_config_key_and_validation():
  assert ModelConfig.tiny().bitlinear_impl == "auto"  # fused on GPU/TPU, lean on CPU
  assert ModelConfig.tiny(bitlinear_impl="lean").bitlinear_impl == "lean"
  with pytest.raises(ValueError, match="bitlinear_impl.*autodiff.*lean.*fused"):
    ModelConfig.tiny(bitlinear_impl="fast")
  assert mmfree_jax.base_config().model.bitlinear_impl == "auto"
  with pytest.raises(ValueError, match="bitlinear_impl"):
    layers.BitLinear(
      4,
      4,
      axes=("embed", "mlp"),
      kernel_init=layers.normal_init(0.02),
      impl="nope",
      rngs=nnx.Rngs(0),
    )


def _model_grads(impl):
  cfg = ModelConfig.tiny(dtype="float64", param_dtype="float64", bitlinear_impl=impl)
  model = mmfree_jax.build_model(cfg, 0)
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 12)), jnp.int32)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  jaxpr = str(jax.make_jaxpr(loss)(params))
  return jax.jit(jax.grad(loss))(params), jaxpr


@pytest.mark.slow
def test_model_with_lean_bitlinear_same_gradients_f64():
  with jax.enable_x64(True):
    auto, auto_jaxpr = _model_grads("autodiff")
    lean, lean_jaxpr = _model_grads("lean")
  # the lean path is really taken (one custom_vjp per BitLinear call site), the plain is not
  assert "custom_vjp_call" in lean_jaxpr and "custom_vjp_call" not in auto_jaxpr
  flat_a, flat_l = jax.tree.leaves(auto), jax.tree.leaves(lean)
  assert len(flat_a) == len(flat_l) > 10
  for a, l in zip(flat_a, flat_l):
    a, l = np.asarray(a), np.asarray(l)
    np.testing.assert_allclose(l, a, rtol=1e-10, atol=1e-10 * max(np.max(np.abs(a)), 1e-30))
