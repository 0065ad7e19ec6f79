"""Decoding with the carried state reproduces the full-sequence forward.

MatMul-free (every scan_type): the state is the recurrent `h` per layer; Transformer++: the KV
cache. Everything runs in float64, where the step-by-step and parallel paths compute the same
numbers up to ~1e-15 (different summation orders only), so the tolerance is 1e-9 relative to
the logit scale; a wrong state (dropped, zeroed, off by one step) changes logits by O(1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax.ops.recurrence import SCAN_TYPES

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
  return dict(full=full, stepwise=stepwise, prefill=prefill, after_prefill=after_prefill,
              continued=continued, from_empty=from_empty), final_state


def _perturb_params(model, seed):
  """Adds N(0, 0.3) noise to every parameter (norm scales != 1, lower bounds != 0)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  state = jax.tree.map(  # in numpy: no eager jax ops (each would compile)
      lambda p: jnp.asarray(np.asarray(p) + rng.normal(0.0, 0.3, p.shape), p.dtype), state)
  nnx.update(model, state)


def _model(**overrides):
  cfg = ModelConfig.tiny(dtype="float64", param_dtype="float64", **overrides)
  model = mmfree_jax.build_model(cfg, 0)
  _perturb_params(model, seed=1)
  return model


def _close(got, expected):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=TOL,
                             atol=TOL * np.max(np.abs(expected)))


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


def test_transformer_kv_cache_decode_matches_full_forward():
  with jax.enable_x64(True):
    model = _model(kind="transformer")
    state = _check_decoding(model)
    assert isinstance(state, mmfree_jax.KVCache)
    assert int(state.index) == T


def test_decode_rejects_more_than_one_token():
  model = mmfree_jax.abstract_model(ModelConfig.tiny())  # the check needs no weights
  with pytest.raises(ValueError, match=r"decode takes tokens \[batch, 1\]"):
    mmfree_jax.decode(model, jnp.zeros((1, 2), jnp.int32), model.init_state(1))
