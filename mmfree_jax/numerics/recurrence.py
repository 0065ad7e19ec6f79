"""The gated linear recurrence `h_t = f_t * h_{t-1} + i_t` in pure JAX (docs/architecture.md §1):
the implementations of the `model.scan_type` registry (`ops.recurrence`) that need no kernel, and
the references the Pallas kernels (`kernels/`) are tested against.

Every function takes `f, i: [batch, seq, dim]` and an optional `initial_state: [batch, dim]`,
accumulates in fp32 (f64 when the inputs are f64), and returns `(h: [batch, seq, dim] in the
inputs' dtype, final_state: [batch, dim] fp32)`.

- `sequential`: `lax.scan` over time; the oracle and the decode step.
- `associative`: `lax.associative_scan` (log-depth parallel scan).
- `chunked`: a `lax.scan` over chunks of `chunk_size` steps, an associative scan inside each
  chunk, the state carried across chunks (activation memory bounded by the chunk).
- `sequential_custom_vjp`: `sequential` forward with the reverse-time recurrence as backward
  (`dh_t = do_t + f_{t+1} dh_{t+1}`, `di_t = dh_t`, `df_t = dh_t h_{t-1}`); saves only h.

Document resets (packed windows) are the caller's `f = 0` at each document start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.dtypes import acc_dtype


def _prepare(f, i, initial_state):
  if f.shape != i.shape or f.ndim != 3:
    raise ValueError(
      f"recurrence expects f and i of the same shape [batch, seq, dim]; got f{f.shape} "
      f"and i{i.shape}"
    )
  acc = acc_dtype(f.dtype)
  batch, _, dim = f.shape
  if initial_state is None:
    h0 = jnp.zeros((batch, dim), acc)
  else:
    if initial_state.shape != (batch, dim):
      raise ValueError(
        f"initial_state must be [batch, dim] = {(batch, dim)}; got {initial_state.shape}"
      )
    h0 = initial_state.astype(acc)
  return f.astype(acc), i.astype(acc), h0


def _scan_time(f, i, h0):
  """fp32 `lax.scan` over axis 1. f, i: [B, T, D]; h0: [B, D] → (h [B, T, D], h_T [B, D])."""

  def step(h, fi):
    f_t, i_t = fi
    h = f_t * h + i_t
    return h, h

  h_last, h_tbd = jax.lax.scan(step, h0, (jnp.swapaxes(f, 0, 1), jnp.swapaxes(i, 0, 1)))
  return jnp.swapaxes(h_tbd, 0, 1), h_last


def sequential(f, i, initial_state=None):
  """`lax.scan` over time. See the module docstring for shapes."""
  out_dtype = i.dtype
  f, i, h0 = _prepare(f, i, initial_state)
  h, h_last = _scan_time(f, i, h0)
  return h.astype(out_dtype), h_last


def _combine(a, b):
  """Composes two affine maps h ↦ f h + i, a applied first: (f_a f_b, f_b i_a + i_b)."""
  f_a, i_a = a
  f_b, i_b = b
  return f_a * f_b, f_b * i_a + i_b


def _associative_scan_time(f, i, h0):
  # Fold the initial state into the first input: h_0 = f_0 h_{-1} + i_0.
  i = i.at[:, 0].add(f[:, 0] * h0)
  _, h = jax.lax.associative_scan(_combine, (f, i), axis=1)
  return h, h[:, -1]


def associative(f, i, initial_state=None):
  """Parallel prefix scan over time. See the module docstring for shapes."""
  out_dtype = i.dtype
  f, i, h0 = _prepare(f, i, initial_state)
  h, h_last = _associative_scan_time(f, i, h0)
  return h.astype(out_dtype), h_last


def chunked(f, i, initial_state=None, *, chunk_size: int = 64):
  """Scan over chunks of `chunk_size` steps with an associative scan inside each chunk.

  A length that `chunk_size` does not divide is padded at the end with `f = 1, i = 0`, which
  leaves the state unchanged, so the result is exact for any length.
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  out_dtype = i.dtype
  f, i, h0 = _prepare(f, i, initial_state)
  batch, seq, dim = f.shape
  pad = (-seq) % chunk_size
  if pad:
    f = jnp.concatenate([f, jnp.ones((batch, pad, dim), f.dtype)], axis=1)
    i = jnp.concatenate([i, jnp.zeros((batch, pad, dim), i.dtype)], axis=1)
  n_chunks = (seq + pad) // chunk_size
  # [n_chunks, B, C, D]: the leading axis is scanned.
  to_chunks = lambda x: jnp.moveaxis(x.reshape(batch, n_chunks, chunk_size, dim), 1, 0)

  def chunk_step(h, fi):
    h_chunk, h_last = _associative_scan_time(fi[0], fi[1], h)
    return h_last, h_chunk

  h_last, h_chunks = jax.lax.scan(chunk_step, h0, (to_chunks(f), to_chunks(i)))
  h = jnp.moveaxis(h_chunks, 0, 1).reshape(batch, n_chunks * chunk_size, dim)[:, :seq]
  return h.astype(out_dtype), h_last


@jax.custom_vjp
def _recurrence_reverse_vjp(f, i, h0):
  return _scan_time(f, i, h0)


def _reverse_vjp_fwd(f, i, h0):
  h, h_last = _scan_time(f, i, h0)
  return (h, h_last), (f, h, h0)


def _reverse_vjp_bwd(residuals, cotangents):
  f, h, h0 = residuals
  dh_out, dh_last = cotangents
  # dh_t = do_t + f_{t+1} dh_{t+1}, run backwards in time; dh_last seeds the end.
  f_next = jnp.concatenate([f[:, 1:], jnp.zeros_like(f[:, :1])], axis=1)
  dh_out = dh_out.at[:, -1].add(dh_last)
  dh, _ = _scan_time(jnp.flip(f_next, 1), jnp.flip(dh_out, 1), jnp.zeros_like(h0))
  dh = jnp.flip(dh, 1)
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  df = dh * h_prev
  dh0 = dh[:, 0] * f[:, 0]
  return df, dh, dh0


_recurrence_reverse_vjp.defvjp(_reverse_vjp_fwd, _reverse_vjp_bwd)


def sequential_custom_vjp(f, i, initial_state=None):
  """`sequential` forward, reverse-time recurrence backward. Shapes as in the module docstring."""
  out_dtype = i.dtype
  f, i, h0 = _prepare(f, i, initial_state)
  h, h_last = _recurrence_reverse_vjp(f, i, h0)
  return h.astype(out_dtype), h_last
