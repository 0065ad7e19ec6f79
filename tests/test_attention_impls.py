"""Transformer++ attention through `jax.nn.dot_product_attention` (`model.attention_impl`)
against the naive softmax attention kept as the numerics reference.

fp32 tolerances: 2e-6 relative for the attention op (the two differ in where the 1/sqrt(d)
scale is applied and in the masked-logit constant), 1e-5 for a whole model's logits.
Covered: causal windows with and without packed-document segment ids, the KV-cache decode
mask, the model's prefill + decode against its full forward, dispatch and bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax.numerics import attention as attention_ref
from mmfree_jax.ops import attention


def _qkv(seed, batch=2, seq=19, heads=3, head_dim=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), dtype) for _ in range(3)]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))


@pytest.mark.parametrize("packed", [False, True])
def test_causal_xla_equals_naive(packed):
  q, k, v = _qkv(0)
  seg = None
  if packed:  # three documents in row 0, one in row 1, padding (0) at the end of row 1
    seg = jnp.asarray([[1] * 5 + [2] * 9 + [3] * 5, [1] * 15 + [0] * 4], jnp.int32)
  out = attention.causal_attention(q, k, v, seg, impl="xla")
  ref = attention.causal_attention(q, k, v, seg, impl="naive")
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel(out, ref) < 2e-6
  # and the naive path is the positional mask the layer used before (positions restart at
  # each document): an independent numpy softmax per document
  qn, kn, vn = (np.asarray(t, np.float64) for t in (q, k, v))
  segn = np.ones((2, 19), int) if seg is None else np.asarray(seg)
  expect = np.zeros_like(qn)
  for b in range(2):
    for t in range(19):
      keys = [s for s in range(t + 1) if segn[b, s] == segn[b, t]]
      logits = np.einsum("hd,shd->hs", qn[b, t], kn[b, keys]) / np.sqrt(8)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      expect[b, t] = np.einsum("hs,shd->hd", p, vn[b, keys])
  assert _rel(out, expect) < 2e-6


def test_masked_decode_xla_equals_naive():
  q, _, _ = _qkv(1, seq=1)
  _, k, v = _qkv(2, seq=12)
  key_pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  query_pos = jnp.full((2, 1), 6)
  mask = attention_ref.causal_mask(query_pos, key_pos, 7)
  out = attention.masked_attention(q, k, v, mask, impl="xla")
  assert _rel(out, attention.masked_attention(q, k, v, mask, impl="naive")) < 2e-6
  # cudnn is not used for the cache path (it falls to XLA's even when asked)
  assert _rel(attention.masked_attention(q, k, v, mask, impl="cudnn"), out) == 0.0


def test_auto_dispatch_and_bad_input():
  assert attention.resolve_attention_impl("auto", jnp.float32, 64) == (
    "cudnn" if jax.default_backend() == "gpu" else "xla"
  )
  assert attention.resolve_attention_impl("auto", jnp.float64, 64) == "naive"
  assert attention.resolve_attention_impl("naive", jnp.bfloat16, 64) == "naive"
  with pytest.raises(ValueError, match="attention_impl"):
    attention.resolve_attention_impl("flash", jnp.float32, 64)
  with pytest.raises(ValueError, match="attention_impl"):
    ModelConfig.tiny(kind="transformer", attention_impl="flash")
  if jax.default_backend() == "cpu":  # asked for cuDNN where there is none: a clear error
    q, k, v = _qkv(3, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="attention_impl='cudnn'"):
      attention.causal_attention(q, k, v, impl="cudnn")


def _model(impl):
  return mmfree_jax.build_model(ModelConfig.tiny(kind="transformer", attention_impl=impl), 0)


@pytest.mark.slow
def test_model_logits_and_kv_decode_match_naive():
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, 256, (2, 12)), jnp.int32)
  seg = jnp.asarray([[1] * 7 + [2] * 5, [1] * 12], jnp.int32)
  fast, ref = _model("xla"), _model("naive")
  for segment_ids in (None, seg):
    a, _ = fast(tokens, segment_ids=segment_ids)
    b, _ = ref(tokens, segment_ids=segment_ids)
    assert _rel(a, b) < 1e-5
  # prefill 8 tokens into a cache of 16, then decode 4 one at a time: equals the full forward
  full, _ = fast(tokens)
  state = fast.init_state(2, 16)
  logits, state = fast(tokens[:, :8], state=state)
  steps = [logits]
  for t in range(8, 12):
    logits, state = mmfree_jax.decode(fast, tokens[:, t : t + 1], state)
    steps.append(logits)
  assert _rel(jnp.concatenate(steps, axis=1), full) < 1e-5
