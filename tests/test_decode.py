"""Decoding with the carried state reproduces the full-sequence forward.

MatMul-free (every scan_type): the state is the recurrent `h` per layer; Transformer++: the KV
cache. Everything runs in float64, where the step-by-step and parallel paths compute the same
numbers up to ~1e-15 (different summation orders only), so the tolerance is 1e-9 relative to
the logit scale; a wrong state (dropped, zeroed, off by one step) changes logits by O(1).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmfree_jax
from mmfree_jax import ModelConfig, infer
from mmfree_jax.nn import layers
from mmfree_jax.numerics import attention
from mmfree_jax.registry import SCAN_TYPES
from tests.perturb import perturb_params

B, T, PREFIX = 2, 8, 4
TOL = 1e-9


@nnx.jit
def _decoding_paths(model, tokens):
  """All decoding paths of one model in one compiled program (one compile per model config).

  tokens: [B, T]. Returns a dict of logits, each to be compared with `full` [B, T, V].
  """

  def decode_steps(state, toks):  # lax.scan of `mmfree_jax.decode` over the time axis
    def step(state, tok_b):
      logits, state = mmfree_jax.decode(model, tok_b[:, None], state)
      return state, logits[:, 0]

    state, logits = jax.lax.scan(step, state, toks.T)
    return jnp.swapaxes(logits, 0, 1), state

  full, _ = model(tokens)
  empty = model.init_state(B, T)
  # 1. token by token from the empty state
  stepwise, final_state = decode_steps(empty, tokens)
  # 2. prefill a prefix with the parallel forward, then decode the rest token by token
  prefill, prefix_state = model(tokens[:, :PREFIX], state=empty)
  after_prefill, _ = decode_steps(prefix_state, tokens[:, PREFIX:])
  # 3. prefill, then the rest as one parallel chunk continuing from the prefix state
  continued, _ = model(tokens[:, PREFIX:], state=prefix_state)
  # (control) the rest from an empty state: must differ, or the checks above prove nothing
  from_empty, _ = model(tokens[:, PREFIX:], state=empty)
  return dict(
    full=full,
    stepwise=stepwise,
    prefill=prefill,
    after_prefill=after_prefill,
    continued=continued,
    from_empty=from_empty,
  ), final_state


def _model(**overrides):
  cfg = ModelConfig.tiny(dtype="float64", param_dtype="float64", **overrides)
  model = mmfree_jax.build_model(cfg, 0)
  perturb_params(model, seed=1)
  return model


def _close(got, expected):
  expected = np.asarray(expected)
  np.testing.assert_allclose(
    np.asarray(got), expected, rtol=TOL, atol=TOL * np.max(np.abs(expected))
  )


def _check_decoding(model):
  tokens = np.random.default_rng(2).integers(0, 256, (B, T)).astype(np.int32)
  out, final_state = _decoding_paths(model, tokens)
  out = {k: np.asarray(v) for k, v in out.items()}
  full = out["full"]
  assert full.dtype == np.float64 and full.shape == (B, T, model.cfg.vocab_size)
  _close(out["stepwise"], full)
  _close(out["prefill"], full[:, :PREFIX])
  _close(out["after_prefill"], full[:, PREFIX:])
  _close(out["continued"], full[:, PREFIX:])
  # the carried state matters: continuing from an empty state gives different logits
  assert np.max(np.abs(out["from_empty"] - full[:, PREFIX:])) > 1e-3 * np.max(np.abs(full))
  return final_state


@pytest.mark.slow
@pytest.mark.parametrize("scan_type", SCAN_TYPES)
def test_mmfree_decode_matches_full_forward(scan_type):
  with jax.enable_x64(True):
    # chunk_size 3 divides neither the prefix (4) nor the sequence (8): padded chunks with an
    # initial state are exercised.
    model = _model(scan_type=scan_type, chunk_size=3)
    state = _check_decoding(model)
    assert isinstance(state, mmfree_jax.RecurrentState)
    assert state.h.shape == (model.cfg.num_layers, B, model.cfg.d_model)
    assert state.h.dtype == jnp.float64


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # of 4 query heads: MHA, GQA, MQA
def test_transformer_kv_cache_decode_matches_full_forward(kv_heads):
  with jax.enable_x64(True):
    model = _model(kind="transformer", num_kv_heads=kv_heads)
    state = _check_decoding(model)
    assert isinstance(state, mmfree_jax.KVCache)
    assert int(state.index) == T
    layer = (B * kv_heads, model.cfg.head_dim, T)
    assert [a.shape for a in state.k + state.v] == [layer] * (2 * model.cfg.num_layers)
    if kv_heads == 2:  # per-layer weights sliced once (`generate` does this): same numbers
      _check_decoding(infer.prepare(model, infer.InferencePlan("frozen", "unrolled")))


@pytest.mark.parametrize("batch,kv_heads", [(2, 2), (1, 1)])  # GQA; MQA at batch 1
def test_kv_cache_attention_matches_naive_attention_on_the_documented_layout(batch, kv_heads):
  """The op against the naive softmax with Llama's repeat_kv, on caches laid out as
  `layers.kv_cache_shape` documents (row b * kv_heads + j, no row axis for a single row,
  positions minor), built in numpy: GQA grouping, causal mask from absolute positions and
  empty slots, two new queries."""
  q_len, heads, head_dim, max_len, filled = 2, 6, 8, 11, 7
  rng = np.random.default_rng(5)
  q = rng.normal(size=(batch, q_len, heads, head_dim))
  k, v = rng.normal(size=(2, batch, max_len, kv_heads, head_dim))
  shape = layers.kv_cache_shape(batch, max_len, kv_heads, head_dim)
  k_cache, v_cache = (t.transpose(0, 2, 3, 1).reshape(shape) for t in (k, v))
  positions = np.broadcast_to(filled - q_len + np.arange(q_len), (batch, q_len))
  run = lambda k_cache, v_cache: attention.kv_cache_attention(
    jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(positions), filled
  )
  with jax.enable_x64(True):
    got = run(k_cache, v_cache)
    key_pos = np.broadcast_to(np.arange(max_len), (batch, max_len))
    mask = attention.causal_mask(jnp.asarray(positions), jnp.asarray(key_pos), filled)
    want = attention.dot_product_attention(
      jnp.asarray(q),
      attention.repeat_kv(jnp.asarray(k), heads),
      attention.repeat_kv(jnp.asarray(v), heads),
      mask,
    )
    assert got.shape == (batch, q_len, heads, head_dim)
    _close(got, want)
    # the empty slots (filled..max_len) are masked: garbage there changes nothing
    k_cache[..., filled:], v_cache[..., filled:] = 1e3, 1e3
    _close(run(k_cache, v_cache), want)


@pytest.mark.parametrize("batch,kv_heads", [(2, 2), (1, 1)])
def test_transformer_decode_step_updates_the_cache_in_place(batch, kv_heads):
  """Compiled, not timed: a decode step on a donated cache, and a loop of steps carrying it,
  write the new position in place and read each layer's weights where they lie (frozen
  model, as `generate` runs it). The optimized HLO holds no copy or transpose of a
  cache-sized array, and XLA's memory analysis has the cache aliased from input to output
  with temporaries below half a layer's cache plus two fp32 [rows, group, max_len] score
  arrays (a copy of one layer's cache, or of one layer's weights, would need more). The
  donated step after a prefill gives the full forward's logits (fp32, 1e-5 of the scale)."""
  model = mmfree_jax.build_model(ModelConfig.tiny(kind="transformer", num_kv_heads=kv_heads), 0)
  model = infer.prepare(model, infer.InferencePlan("frozen", "unrolled"))
  graphdef, params = nnx.split(model)
  max_len = 1000
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 256, (batch, 6)), jnp.int32)
  full, state = nnx.jit(lambda m, t: (m(t)[0], m(t[:, :5], state=m.init_state(batch, max_len))[1]))(
    model, tokens
  )
  layer_bytes = state.k[0].nbytes
  cache_bytes = sum(a.nbytes for a in state.k + state.v)
  scores_bytes = 2 * batch * model.cfg.num_heads * max_len * 4  # two fp32 [rows, group, S]

  def step(params, tokens, state):
    return mmfree_jax.decode(nnx.merge(graphdef, params), tokens, state)

  def loop(params, tokens, state):
    def body(_, carry):
      tokens, state = carry
      logits, state = step(params, tokens, state)
      return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], state

    return jax.lax.fori_loop(0, 3, body, (tokens, state))

  for fn in (loop, step):
    compiled = jax.jit(fn, donate_argnums=2).lower(params, tokens[:, 5:], state).compile()
    hlo = compiled.as_text()
    moved = [
      line
      for line in hlo.splitlines()
      if re.search(r"(copy|transpose)\(", line) and str(max_len) in line.split("(")[0]
    ]
    assert not moved, moved[:3]
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes >= cache_bytes
    assert mem.temp_size_in_bytes < layer_bytes / 2 + scores_bytes
  logits, state = compiled(params, tokens[:, 5:], state)
  np.testing.assert_allclose(
    np.asarray(logits[:, 0]),
    np.asarray(full[:, 5]),
    rtol=0,
    atol=1e-5 * np.max(np.abs(np.asarray(full))),
  )
  assert int(state.index) == 6


def test_kv_cache_past_its_length_is_a_clear_error():
  """Writing past `max_len` would clamp the update offset and overwrite the last positions."""
  model = mmfree_jax.build_model(mmfree_jax.ModelConfig.tiny(kind="transformer"), 0)
  tokens = jnp.zeros((1, 4), jnp.int32)
  state = model.init_state(1, 6)
  with pytest.raises(ValueError, match="cannot take 7 more"):
    model(jnp.zeros((1, 7), jnp.int32), state=state)  # static: checked under jit too
  _, state = model(tokens, state=state)
  _, state = model(tokens[:, :2], state=state)  # exactly full
  with pytest.raises(ValueError, match="6 positions has 6 filled"):
    model(tokens[:, :1], state=state)
