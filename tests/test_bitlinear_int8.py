"""The integer BitLinear (`model.bitlinear_impl=int8`) against the fake-quant forward and the
lean/autodiff STE gradients.

Forward: int8 activation codes x ternary weight codes with an int32 accumulator, scales after.
In float64 the fake-quant output times `sx * sw` rounds to exactly the integer accumulator
of an independent numpy int64 matmul of the codes, and so does the int8 path's output; the two
outputs agree to 1e-12 relative. Backward: the lean custom_vjp's (the STE in the compute
dtype), so its gradients are bit-identical to `lean` and equal `autodiff` to 1e-12 in f64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax.numerics import quant
from mmfree_jax.ops import bitlinear

EPS = 1e-6


def _inputs(seed, lead=(3, 7), d_in=48, d_out=40):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=lead + (d_in,)) * rng.uniform(0.1, 3.0, size=lead + (1,))
  w = rng.normal(size=(d_in, d_out)) * 0.1
  gamma = rng.uniform(0.5, 1.5, size=(d_in,)) * rng.choice([-1.0, 1.0], size=(d_in,))
  dout = rng.normal(size=lead + (d_out,))
  return x, w, gamma, dout


def _np_codes(x, w, gamma):
  """Independent numpy int8/ternary codes and scales (docs/architecture.md §1 formulas)."""
  r = 1.0 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
  xn = x * r * gamma
  sx = 127.0 / np.maximum(np.max(np.abs(xn), -1, keepdims=True), 1e-5)
  v = xn * sx
  t = np.trunc(v)
  cx = np.clip(np.where(np.abs(v - t) == 0.5, t + np.sign(v), np.round(v)), -128, 127)
  sw = 1.0 / max(np.mean(np.abs(w)), 1e-5)
  cw = np.clip(np.round(w * sw), -1, 1)
  return cx.astype(np.int64), sx, cw.astype(np.int64), sw


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_forward_equals_fake_quant_in_integers_f64(seed):
  x, w, gamma, _ = _inputs(seed)
  cx, sx, cw, sw = _np_codes(x, w, gamma)
  acc = cx @ cw  # exact int64 reference accumulator
  with jax.enable_x64(True):
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(gamma))
    y_int = np.asarray(bitlinear.get_bitlinear("int8")(*args, eps=EPS, dtype=jnp.float64))
    y_fake = np.asarray(quant.bitlinear(*args, eps=EPS, dtype=jnp.float64))
  assert y_int.dtype == np.float64
  for y in (y_fake, y_int):
    scaled = y * sx * sw
    np.testing.assert_array_equal(np.round(scaled).astype(np.int64), acc)
    assert np.max(np.abs(scaled - acc)) < 1e-8
  np.testing.assert_allclose(y_int, y_fake, rtol=1e-12, atol=1e-12 * np.max(np.abs(y_fake)))


def test_int8_forward_is_an_integer_matmul():
  x, w, gamma, _ = _inputs(0)
  fn = lambda x, w, g: bitlinear.get_bitlinear("int8")(x, w, g, dtype=jnp.bfloat16)
  jaxpr = jax.make_jaxpr(fn)(
    jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(gamma, jnp.float32)
  )
  dots = list(_dot_generals(jaxpr.jaxpr))  # the dot sits inside the custom_vjp call
  assert any(
    [str(v.aval.dtype) for v in e.invars] == ["int8", "int8"]
    and e.params["preferred_element_type"] == jnp.int32
    for e in dots
  ), dots


def _dot_generals(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _dot_generals(inner)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_int8_forward_close_to_fake_quant_low_precision(dtype, tol):
  x, w, gamma, _ = _inputs(2)
  args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(gamma, jnp.float32))
  y_int = bitlinear.get_bitlinear("int8")(*args, eps=EPS, dtype=dtype)
  y_fake = quant.bitlinear(*args, eps=EPS, dtype=dtype)
  assert y_int.dtype == dtype and y_int.shape == y_fake.shape
  err = np.max(np.abs(np.asarray(y_int, np.float64) - np.asarray(y_fake, np.float64)))
  assert err <= tol * np.max(np.abs(np.asarray(y_fake, np.float64)))


def _grads(impl, x, w, gamma, dout, dtype):
  fn = bitlinear.get_bitlinear(impl)
  loss = lambda x, w, g: jnp.sum(fn(x, w, g, eps=EPS, dtype=dtype).astype(dout.dtype) * dout)
  return jax.grad(loss, argnums=(0, 1, 2))(x, w, gamma)


def test_int8_gradients_equal_lean_and_autodiff():
  x, w, gamma, dout = _inputs(3)
  f32 = [jnp.asarray(a, jnp.float32) for a in (x, w, gamma, dout)]
  g_int = _grads("int8", *f32, jnp.float32)
  g_lean = _grads("lean", *f32, jnp.float32)
  for a, b in zip(g_int, g_lean):  # the same backward on the same residuals
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with jax.enable_x64(True):
    f64 = [jnp.asarray(a) for a in (x, w, gamma, dout)]
    g_int = _grads("int8", *f64, jnp.float64)
    g_auto = _grads("autodiff", *f64, jnp.float64)
    for a, b in zip(g_int, g_auto):
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.max(np.abs(b)))


@pytest.mark.slow
def test_int8_model_trains_like_lean():
  """A tiny MatMul-free LM: int8 loss and gradients equal the lean model's (fp32)."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)

  def loss_and_grads(impl):
    from flax import nnx

    model = mmfree_jax.build_model(ModelConfig.tiny(bitlinear_impl=impl), 0)
    graphdef, params = nnx.split(model)

    def loss(params):
      logits, _ = nnx.merge(graphdef, params)(tokens)
      return jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
      )

    return jax.value_and_grad(loss)(params)

  (l_int, g_int), (l_lean, g_lean) = loss_and_grads("int8"), loss_and_grads("lean")
  np.testing.assert_allclose(float(l_int), float(l_lean), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_int), jax.tree.leaves(g_lean)):
    np.testing.assert_allclose(
      np.asarray(a),
      np.asarray(b),
      rtol=2e-4,
      atol=2e-4 * float(np.max(np.abs(np.asarray(b)))) + 1e-12,
    )
