"""BitLinear (quant.bitlinear, layers.BitLinear) against a numpy implementation of
docs/architecture.md §1.

The numpy side is written from the spec formulas (docs/architecture.md §1) only; it never calls
mmfree_jax. Semantics are compared in float64 (tolerance 1e-10: both sides are the same formula in
f64, so they differ by a few ulps); one float32 check has a looser, stated tolerance. Rounding modes
are tested on exact .5 inputs, which random f64 data never produces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax.nn import layers
from mmfree_jax.numerics import quant

F64_TOL = 1e-10
EPS = 1e-6  # the BitLinear RMSNorm epsilon of docs/architecture.md §1

# Jitted once per shape/dtype: eager op-by-op dispatch would compile every primitive.
bitlinear = jax.jit(quant.bitlinear, static_argnames=("eps", "dtype", "quantize"))


# ----------------------------------------------------------------------------- numpy oracle


def np_round_half_away(x):
  """Round to nearest, exact ties (frac == .5) away from zero."""
  trunc = np.trunc(x)
  tie = np.abs(x - trunc) == 0.5
  return np.where(tie, trunc + np.sign(x), np.rint(x))


def np_round_half_even(x):
  return np.rint(x)  # numpy's rint is IEEE round-half-to-even


def np_rmsnorm(x, gamma, eps=EPS):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gamma


def np_quant_act(xn):
  sx = 127.0 / np.maximum(np.max(np.abs(xn), axis=-1, keepdims=True), 1e-5)
  return np.clip(np_round_half_away(xn * sx), -128, 127) / sx, sx


def np_quant_weight(w):
  sw = 1.0 / max(np.mean(np.abs(w)), 1e-5)
  return np.clip(np_round_half_even(w * sw), -1, 1) / sw, sw


def np_bitlinear(x, w, gamma, eps=EPS):
  xn = np_rmsnorm(x, gamma, eps)
  xq, _ = np_quant_act(xn)
  wq, _ = np_quant_weight(w)
  return xq @ wq


def np_bitlinear_ste_grads(x, w, gamma, dout, eps=EPS):
  """Reverse mode of `sum(bitlinear(x, w, gamma) * dout)` with the quantizers (rounding,
  clipping and their scales) as the identity in backward. x: [N, d_in]; dout: [N, d_out]."""
  r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  u = x * r
  xn = u * gamma
  xq, _ = np_quant_act(xn)
  wq, _ = np_quant_weight(w)
  dw = xq.T @ dout  # dW = xq^T dout
  dxn = dout @ wq.T  # d(xn) = dout wq^T
  dgamma = np.sum(dxn * u, axis=0)
  du = dxn * gamma
  # u = x r(x), r = (mean(x^2) + eps)^-1/2, dr/dx_j = -r^3 x_j / d
  dx = r * du - x * r**3 * np.mean(du * x, axis=-1, keepdims=True)
  return dx, dw, dgamma


def _random_inputs(seed, n=6, d_in=16, d_out=8, w_scale=0.1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)) * rng.uniform(0.1, 3.0, size=(n, 1))
  w = rng.normal(size=(d_in, d_out)) * w_scale
  gamma = rng.uniform(0.5, 1.5, size=(d_in,)) * rng.choice([-1.0, 1.0], size=(d_in,))
  return x, w, gamma


# ------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", ["random", "tiny_weights_and_zero_row"])
def test_bitlinear_matches_numpy_f64(case):
  x, w, gamma = _random_inputs(0)
  if case == "tiny_weights_and_zero_row":
    # mean|W| = 5e-6 < 1e-5: the floor sw = 1e5 is active (codes still partly nonzero; a
    # scale of 1/mean|W| would make twice as many of them nonzero)
    w = w * (5e-6 / np.mean(np.abs(w)))
    x[2] = 0.0  # an all-zero token: the activation-scale floor, output exactly 0
  expected = np_bitlinear(x, w, gamma)
  with jax.enable_x64(True):
    got = bitlinear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gamma))
    assert got.dtype == jnp.float64
    got = np.asarray(got)
  assert np.all(np.isfinite(got))
  scale = np.max(np.abs(expected))
  assert scale > 0
  np.testing.assert_allclose(got, expected, rtol=F64_TOL, atol=F64_TOL * scale)
  if case == "tiny_weights_and_zero_row":
    assert np.all(got[2] == 0.0)


def test_bitlinear_matches_numpy_leading_batch_dims_f64():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 16))
  w = rng.normal(size=(16, 5)) * 0.05
  gamma = rng.uniform(0.5, 1.5, size=(16,))
  expected = np_bitlinear(x, w, gamma)
  with jax.enable_x64(True):
    got = np.asarray(bitlinear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gamma)))
  np.testing.assert_allclose(got, expected, rtol=F64_TOL, atol=F64_TOL)


def test_bitlinear_module_matches_numpy_f64():
  x, w, gamma = _random_inputs(2, d_in=16, d_out=8)
  expected = np_bitlinear(x, w, gamma)
  with jax.enable_x64(True):
    layer = layers.BitLinear(
      16,
      8,
      axes=("embed", "mlp"),
      kernel_init=layers.normal_init(0.02),
      dtype=jnp.float64,
      param_dtype=jnp.float64,
      rngs=nnx.Rngs(0),
    )
    assert layer.kernel[...].shape == (16, 8)
    np.testing.assert_array_equal(np.asarray(layer.norm_scale[...]), np.ones(16))  # init 1
    layer.kernel[...] = jnp.asarray(w)
    layer.norm_scale[...] = jnp.asarray(gamma)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, rtol=F64_TOL, atol=F64_TOL)


def test_bitlinear_float32_close_to_f64_reference():
  # float32 forward vs the f64 numpy oracle on the same (f32-representable) inputs. Tolerance
  # rtol/atol 2e-5 (relative to the output scale): fp32 round-off of the norm and matmul. For
  # this fixed seed no int8 rounding decision flips between f32 and f64 (a flip would move one
  # output by ~|wq|/sx, about 1e-2 relative, and fail loudly).
  x, w, gamma = _random_inputs(3)
  x, w, gamma = (a.astype(np.float32) for a in (x, w, gamma))
  expected = np_bitlinear(x.astype(np.float64), w.astype(np.float64), gamma.astype(np.float64))
  got = bitlinear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gamma))
  assert got.dtype == jnp.float32
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5 * scale)


# --------------------------------------------------------------------------- quantizers


def test_ternary_codes_and_fake_quantized_weights():
  _, w, _ = _random_inputs(4, d_in=32, d_out=24)
  sw_expected = 1.0 / np.mean(np.abs(w))
  codes_expected = np.clip(np_round_half_even(w * sw_expected), -1, 1)
  with jax.enable_x64(True):
    codes, sw = quant.quantize_weights_ternary(jnp.asarray(w))
    wq = np.asarray(quant.fake_quantize_weights(jnp.asarray(w)))
    codes, sw = np.asarray(codes), float(sw)
  assert codes.dtype == np.int8
  assert set(np.unique(codes).tolist()) == {-1, 0, 1}
  np.testing.assert_array_equal(codes, codes_expected)
  np.testing.assert_allclose(sw, sw_expected, rtol=1e-12)
  values = np.unique(wq)
  assert len(values) <= 3
  np.testing.assert_allclose(np.sort(values), np.array([-1.0, 0.0, 1.0]) / sw_expected, rtol=1e-12)
  np.testing.assert_allclose(wq, codes_expected / sw_expected, rtol=1e-12)


def test_activations_on_int8_grid():
  x, _, _ = _random_inputs(5, n=10, d_in=32)
  with jax.enable_x64(True):
    codes, sx = quant.quantize_activations_int8(jnp.asarray(x))
    xq = np.asarray(quant.fake_quantize_activations(jnp.asarray(x)))
    codes, sx = np.asarray(codes), np.asarray(sx)
  assert codes.dtype == np.int8 and sx.shape == (10, 1)
  np.testing.assert_allclose(sx, 127.0 / np.max(np.abs(x), axis=-1, keepdims=True), rtol=1e-12)
  grid = xq * sx
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-9)  # x*sx is an integer
  assert np.round(grid).min() >= -128 and np.round(grid).max() <= 127
  # absmax: the largest |x| of each token maps to exactly +-127
  np.testing.assert_allclose(np.max(np.abs(grid), axis=-1), 127.0, atol=1e-9)
  np.testing.assert_array_equal(codes, np.round(grid).astype(np.int8))
  np.testing.assert_allclose(xq, np_quant_act(x)[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- rounding modes


def test_round_half_away_from_zero_exact_ties():
  x = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -127.5, 0.49, -0.51, 3.0, 0.0], np.float32)
  expected = np.array([1, -1, 2, -2, 3, -3, 127, -128, 0, -1, 3, 0], np.float32)
  got = np.asarray(quant.round_half_away_from_zero(jnp.asarray(x)))
  np.testing.assert_array_equal(got, expected)
  # the largest floats below 0.5 and 1.5 are not ties: they round down / to nearest
  below_half = np.nextafter(np.float32(0.5), np.float32(0))
  near = np.array(
    [below_half, -below_half, np.nextafter(np.float32(1.5), np.float32(0))], np.float32
  )
  np.testing.assert_array_equal(
    np.asarray(quant.round_half_away_from_zero(jnp.asarray(near))), [0, 0, 1]
  )


# 16 entries, sum of squares 16384, so mean(x^2) = 1024 and with eps = 0 the RMSNorm factor is
# exactly 1/32; the absmax 127 gives sx = 32 exactly, so xn * sx == x: exact .5 ties reach the
# activation rounding inside bitlinear.
_TIE_X = np.array([127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -3.5, 14, 4, 1, 0, 0, 0, 0])
_TIE_CODES_AWAY = np.array([127, 1, -1, 2, -2, 3, -3, 4, -4, 14, 4, 1, 0, 0, 0, 0])


def test_activation_rounding_half_away_through_quantizer_and_bitlinear():
  assert np.sum(_TIE_X**2) == 16384
  x = jnp.asarray(_TIE_X, jnp.float32)
  codes, sx = quant.quantize_activations_int8(x * 2.0)  # absmax 254 -> sx = 0.5, exact ties
  assert float(sx[0]) == 0.5
  np.testing.assert_array_equal(np.asarray(codes), _TIE_CODES_AWAY)
  # Through bitlinear: W = I (16x16) -> sw = 16, wq = I/16; xq = codes/32; y = codes/512.
  y = bitlinear(x[None], jnp.eye(16, dtype=jnp.float32), jnp.ones(16, jnp.float32), eps=0.0)
  np.testing.assert_array_equal(np.asarray(y[0]) * 512.0, _TIE_CODES_AWAY)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_weight_rounding_half_even(scale):
  # mean|W| = scale, so sw = 1/scale exactly and W * sw hits exact .5 ties.
  w_units = np.array([[0.5, -0.5], [1.5, -1.5], [2.0, 1.0], [-0.5, 0.5]])  # mean |.| = 1
  assert np.mean(np.abs(w_units)) == 1.0
  # half-even: +-0.5 -> 0, +-1.5 -> +-2 -> clip +-1, 2 -> clip 1 (half-away would give +-1 for .5)
  expected_codes = np.array([[0, 0], [1, -1], [1, 1], [0, 0]])
  w = jnp.asarray(w_units * scale, jnp.float32)
  codes, sw = quant.quantize_weights_ternary(w)
  assert float(sw) == 1.0 / scale
  np.testing.assert_array_equal(np.asarray(codes), expected_codes)
  # Through bitlinear: one-hot rows x = e_k give xn = 2 e_k (eps 0, d=4), sx = 63.5,
  # xq = 2 e_k exactly, so y = 2 * wq.
  y = bitlinear(jnp.eye(4, dtype=jnp.float32), w, jnp.ones(4, jnp.float32), eps=0.0)
  np.testing.assert_array_equal(np.asarray(y), 2.0 * expected_codes * scale)


# ---------------------------------------------------------------------------------- STE


def test_ste_gradients_match_numpy_f64():
  x, w, gamma = _random_inputs(6)
  dout = np.random.default_rng(7).normal(size=(x.shape[0], w.shape[1]))
  dx_e, dw_e, dg_e = np_bitlinear_ste_grads(x, w, gamma, dout)

  with jax.enable_x64(True):

    def loss(x, w, g):
      return jnp.sum(bitlinear(x, w, g) * dout)

    dx, dw, dg = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
      jnp.asarray(x), jnp.asarray(w), jnp.asarray(gamma)
    )
    dx, dw, dg = np.asarray(dx), np.asarray(dw), np.asarray(dg)

  for got, exp in ((dx, dx_e), (dw, dw_e), (dg, dg_e)):
    np.testing.assert_allclose(got, exp, rtol=1e-10, atol=1e-10 * np.max(np.abs(exp)))
  assert np.max(np.abs(dg)) > 1e-3  # gamma gets a real gradient

  # The STE gradient is not the unquantized layer's gradient (dW uses xq, not xn), so the
  # comparison above discriminates.
  xn = np_rmsnorm(x, gamma)
  assert np.max(np.abs(dw_e - xn.T @ dout)) > 1e-4


def test_numpy_rmsnorm_backward_formula_by_finite_differences():
  # Validates the hand-written RMSNorm backward of the oracle itself (central differences in
  # f64, step 1e-6: truncation error ~1e-12, tolerance 1e-7).
  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 5))
  gamma = rng.uniform(0.5, 1.5, size=5)
  dxn = rng.normal(size=(3, 5))
  r = 1.0 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
  du = dxn * gamma
  dx = r * du - x * r**3 * np.mean(du * x, -1, keepdims=True)
  num = np.zeros_like(x)
  h = 1e-6
  for idx in np.ndindex(*x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    plus = np.sum(np_rmsnorm(x + e, gamma) * dxn)
    num[idx] = (plus - np.sum(np_rmsnorm(x - e, gamma) * dxn)) / (2 * h)
  np.testing.assert_allclose(dx, num, rtol=1e-7, atol=1e-7)


def test_no_gradient_through_scales():
  # Against a jax version where rounding/clipping are STE but the scales are differentiated
  # (the wrong estimator): the gradients must differ from it, and equal the version where
  # the scales are stop_gradient'ed.
  x, w, gamma = _random_inputs(9)
  dout = np.random.default_rng(10).normal(size=(x.shape[0], w.shape[1]))

  with jax.enable_x64(True):

    def manual(x, w, g, stop_scales):
      sg = jax.lax.stop_gradient
      xn = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + EPS) * g
      sx = 127.0 / jnp.maximum(jnp.max(jnp.abs(xn), -1, keepdims=True), 1e-5)
      sw = 1.0 / jnp.maximum(jnp.mean(jnp.abs(w)), 1e-5)
      if stop_scales:
        sx, sw = sg(sx), sg(sw)
      xs, ws = xn * sx, w * sw
      xr = xs + sg(jnp.clip(jnp.sign(xs) * jnp.floor(jnp.abs(xs) + 0.5), -128, 127) - xs)
      wr = ws + sg(jnp.clip(jnp.round(ws), -1, 1) - ws)
      return jnp.sum(((xr / sx) @ (wr / sw)) * dout)

    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(gamma))
    grad = lambda f: [np.asarray(a) for a in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)]
    got = grad(lambda x, w, g: jnp.sum(bitlinear(x, w, g) * dout))
    stopped = grad(lambda x, w, g: manual(x, w, g, True))
    through = grad(lambda x, w, g: manual(x, w, g, False))
  for a, b in zip(got, stopped):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.max(np.abs(b)))
  # gradients through the scales would differ (at least for W: d sw / dW != 0)
  assert max(np.max(np.abs(a - b)) for a, b in zip(got, through)) > 1e-6


def test_quantize_false_is_plain_rmsnorm_linear():
  x, w, gamma = _random_inputs(11)
  with jax.enable_x64(True):
    got = np.asarray(bitlinear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gamma), quantize=False))
  np.testing.assert_allclose(got, np_rmsnorm(x, gamma) @ w, rtol=1e-10, atol=1e-12)
