"""Every `registry.SCAN_TYPES` implementation against a plain numpy for-loop, forward and
backward, in float64 (tolerance 1e-12: all sides compute the same sums in f64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax import registry
from mmfree_jax.ops import recurrence

F64_TOL = 1e-12
B, D = 2, 3

# (scan_type, chunk_size, cases): cases are (seq, with_initial_state). chunk 4 does not divide
# 7 or 13 (and exceeds T=1); 16 > T; 1 is the degenerate chunk. The chunk_size of the other
# scan types is ignored.
FULL = tuple((t, h0) for t in (1, 7, 13) for h0 in (False, True))
IMPLS = [
  ("sequential", 4, FULL),
  ("associative", 4, FULL),
  ("chunked", 4, FULL),
  ("chunked", 16, ((13, True), (7, False))),
  ("chunked", 1, ((7, True),)),
  ("sequential_custom_vjp", 4, FULL),
  # on CPU: `auto` is sequential; `pallas` runs the TPU kernel interpreted, which falls
  # back to sequential here (D = 3 is no multiple of 128; f64). The kernels themselves
  # are tested in test_kernels.py.
  ("auto", 4, FULL),
  ("pallas", 4, ((7, True), (13, False))),
]
IDS = [f"{s}-c{c}" for s, c, _ in IMPLS]


def test_impls_cover_all_scan_types():
  assert {s for s, _, _ in IMPLS} == set(registry.SCAN_TYPES)


def np_forward(f, i, h0):
  """h_t = f_t h_{t-1} + i_t. f, i: [B, T, D]; h0: [B, D] -> (h [B, T, D], h_T [B, D])."""
  h = np.zeros_like(i)
  prev = h0
  for t in range(f.shape[1]):
    prev = f[:, t] * prev + i[:, t]
    h[:, t] = prev
  return h, prev


def np_backward(f, h, h0, dh_out, dh_last):
  """Hand-written reverse mode of np_forward for cotangents (dh_out, dh_last)."""
  df, di = np.zeros_like(f), np.zeros_like(f)
  g = dh_last.copy()
  for t in reversed(range(f.shape[1])):
    g = g + dh_out[:, t]
    h_prev = h[:, t - 1] if t > 0 else h0
    di[:, t] = g
    df[:, t] = g * h_prev
    g = g * f[:, t]
  return df, di, g  # g is now d h0


def _data(seq, seed):
  rng = np.random.default_rng(seed)
  f = rng.uniform(0.05, 0.99, size=(B, seq, D))
  i = rng.normal(size=(B, seq, D))
  h0 = rng.normal(size=(B, D))
  dh_out = rng.normal(size=(B, seq, D))  # coefficients of a random linear functional
  dh_last = rng.normal(size=(B, D))
  return f, i, h0, dh_out, dh_last


@pytest.mark.slow
@pytest.mark.parametrize("scan_type,chunk_size,cases", IMPLS, ids=IDS)
def test_matches_numpy_loop_forward_and_backward(scan_type, chunk_size, cases):
  data = [_data(seq, seed=seq + 100 * with_h0) for seq, with_h0 in cases]

  with jax.enable_x64(True):

    @jax.jit
    def run(data):
      # All cases in one program (one compile per implementation). For each case the linear
      # functional L = <dh_out, h> + <dh_last, h_T> gives forward values and gradients.
      out = []
      for (_, with_h0), (f, i, h0, dh_out, dh_last) in zip(cases, data):

        def functional(f, i, h0):
          h, last = recurrence.linear_recurrence(
            f, i, h0 if with_h0 else None, scan_type=scan_type, chunk_size=chunk_size
          )
          return jnp.sum(h * dh_out) + jnp.sum(last * dh_last), (h, last)

        grads, (h, last) = jax.grad(functional, argnums=(0, 1, 2), has_aux=True)(f, i, h0)
        out.append((h, last, grads))
      return out

    results = run([tuple(jnp.asarray(a) for a in d) for d in data])

  for (seq, with_h0), (f, i, h0, dh_out, dh_last), (h, last, (df, di, dh0)) in zip(
    cases, data, results
  ):
    case = f"{scan_type} chunk={chunk_size} T={seq} initial_state={with_h0}"
    assert h.dtype == jnp.float64 and last.dtype == jnp.float64, case
    assert h.shape == (B, seq, D) and last.shape == (B, D), case
    if not with_h0:
      h0 = np.zeros((B, D))
    h_exp, last_exp = np_forward(f, i, h0)
    df_exp, di_exp, dh0_exp = np_backward(f, h_exp, h0, dh_out, dh_last)
    for name, got, exp in (
      ("h", h, h_exp),
      ("final_state", last, last_exp),
      ("df", df, df_exp),
      ("di", di, di_exp),
    ):
      np.testing.assert_allclose(
        np.asarray(got), exp, rtol=F64_TOL, atol=F64_TOL, err_msg=f"{name}: {case}"
      )
    if with_h0:
      np.testing.assert_allclose(
        np.asarray(dh0), dh0_exp, rtol=F64_TOL, atol=F64_TOL, err_msg=f"d initial_state: {case}"
      )
    else:
      assert np.all(np.asarray(dh0) == 0), case  # h0 unused: zero state


def test_numpy_backward_by_finite_differences():
  # Checks the hand-written oracle itself (central differences, step 1e-6, f64 -> ~1e-9 error).
  f, i, h0, dh_out, dh_last = _data(5, seed=3)
  L = lambda f, i, h0: (lambda h, last: np.sum(h * dh_out) + np.sum(last * dh_last))(
    *np_forward(f, i, h0)
  )
  h, _ = np_forward(f, i, h0)
  analytic = np_backward(f, h, h0, dh_out, dh_last)
  step = 1e-6
  for k, arg in enumerate((f, i, h0)):
    num = np.zeros_like(arg)
    for idx in np.ndindex(*arg.shape):
      args_p = [a.copy() for a in (f, i, h0)]
      args_m = [a.copy() for a in (f, i, h0)]
      args_p[k][idx] += step
      args_m[k][idx] -= step
      num[idx] = (L(*args_p) - L(*args_m)) / (2 * step)
    np.testing.assert_allclose(analytic[k], num, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("scan_type,chunk_size", [(s, c) for s, c, _ in IMPLS], ids=IDS)
def test_bf16_inputs_accumulate_in_fp32(scan_type, chunk_size):
  # Forget gates near 1 over 64 steps: a bf16 carry would be off by ~1e-2 relative; the fp32
  # carry matches the f64 loop on the same (bf16-valued) inputs to 1e-5 relative.
  rng = np.random.default_rng(5)
  seq = 64
  f = jnp.asarray(rng.uniform(0.97, 0.999, size=(B, seq, D)), jnp.bfloat16)
  i = jnp.asarray(rng.normal(size=(B, seq, D)), jnp.bfloat16)
  h, last = jax.jit(
    lambda f, i: recurrence.linear_recurrence(f, i, scan_type=scan_type, chunk_size=chunk_size)
  )(f, i)
  assert h.dtype == jnp.bfloat16  # outputs in the inputs' dtype
  assert last.dtype == jnp.float32  # state in fp32
  _, last_exp = np_forward(np.asarray(f, np.float64), np.asarray(i, np.float64), np.zeros((B, D)))
  np.testing.assert_allclose(np.asarray(last), last_exp, rtol=1e-5, atol=1e-5)


def test_unknown_scan_type_names_the_choices():
  f = jnp.ones((1, 2, 3))
  with pytest.raises(ValueError, match="unknown scan_type 'parallel'") as e:
    recurrence.linear_recurrence(f, f, scan_type="parallel")
  for name in registry.SCAN_TYPES:
    assert name in str(e.value)
  assert "model.scan_type" in str(e.value)  # names where to fix it


def test_mismatched_shapes_raise():
  f = jnp.ones((2, 5, 3))
  with pytest.raises(ValueError, match=r"same shape \[batch, seq, dim\]"):
    recurrence.linear_recurrence(f, jnp.ones((2, 5, 4)))
  with pytest.raises(ValueError, match=r"same shape \[batch, seq, dim\]"):
    recurrence.linear_recurrence(jnp.ones((5, 3)), jnp.ones((5, 3)))  # no batch axis
  for scan_type in registry.SCAN_TYPES:
    with pytest.raises(ValueError, match=r"initial_state must be \[batch, dim\] = \(2, 3\)"):
      recurrence.linear_recurrence(f, f, jnp.zeros((3, 2)), scan_type=scan_type)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5])
def test_bad_chunk_size_raises(chunk_size):
  f = jnp.ones((1, 4, 2))
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    recurrence.linear_recurrence(f, f, scan_type="chunked", chunk_size=chunk_size)
