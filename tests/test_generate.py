"""Generation: the jitted prefill + decode loop against repeated full forwards, EOS, sampling.

Models are tiny, random (perturbed params) and float64, so greedy argmaxes are never near-ties
between two correct computations: the token ids must be identical (exact comparison).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax.config import ModelConfig
from mmfree_jax.generate import (
  SamplingConfig,
  context_notes,
  generate,
  generate_text,
  sample_from_logits,
)
from mmfree_jax.infer.memory import generation_memory_bytes
from mmfree_jax.nn.model import build_model
from tests.perturb import perturb_params

VOCAB, LEN = 260, 32  # reference forwards run on [batch, LEN] right-padded rows (one compile)
PROMPT, NEW, SEQ_LEN = 12, 6, 8  # the prompt is longer than the "trained" seq_len


@functools.lru_cache(maxsize=None)
def _model(kind):
  cfg = ModelConfig.tiny(kind=kind, vocab_size=VOCAB, dtype="float64", param_dtype="float64")
  return perturb_params(build_model(cfg, 0))


_full_logits = nnx.jit(lambda m, t: m(t)[0])


def _next_logits(model, rows):
  """Logits after the last token of each (equal-length) row, from one full forward."""
  padded = np.zeros((len(rows), LEN), np.int32)
  padded[:, : len(rows[0])] = rows
  return np.asarray(_full_logits(model, jnp.asarray(padded)))[:, len(rows[0]) - 1]


def _prompt():
  return np.random.default_rng(0).integers(0, VOCAB, (2, PROMPT)).astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_greedy_equals_argmax_of_repeated_full_forwards(kind):
  with jax.enable_x64(True):
    model = _model(kind)
    prompt = _prompt()
    got = generate(model, prompt, SamplingConfig(max_new_tokens=NEW))
    rows = prompt
    for _ in range(NEW):
      rows = np.concatenate([rows, np.argmax(_next_logits(model, rows), -1)[:, None]], 1)
    want = rows[:, PROMPT:]
    np.testing.assert_array_equal(got, want)

    # EOS: row 0 stops at its third greedy token; a finished row repeats EOS.
    eos = int(want[0, 2])
    got = generate(model, prompt, SamplingConfig(max_new_tokens=NEW, eos_id=eos))
  expected = want.copy()
  for row in expected:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0] :] = eos
  stops = [np.flatnonzero(r == eos)[0] + 1 if (r == eos).any() else NEW for r in want]
  np.testing.assert_array_equal(got, expected[:, : max(stops)])


def test_sampled_tokens_come_from_the_top_k_of_the_full_forward():
  with jax.enable_x64(True):
    model = _model("mmfree")
    prompt = _prompt()
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=1.5, top_k=3)
    got = generate(model, prompt, cfg, seed=3)
    np.testing.assert_array_equal(got, generate(model, prompt, cfg, seed=3))  # same seed
    assert not np.array_equal(got, generate(model, prompt, cfg, seed=4))  # other seed
    rows = prompt
    for t in range(NEW):
      top3 = np.argsort(_next_logits(model, rows), -1)[:, -3:]
      assert all(got[b, t] in top3[b] for b in range(2)), (t, got[:, t], top3)
      rows = np.concatenate([rows, got[:, t : t + 1]], 1)


def _draws(logits, cfg, n=4000):
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.jit(jax.vmap(lambda k: sample_from_logits(logits[None], k, cfg)[0]))
  return np.bincount(np.asarray(draw(keys)), minlength=logits.shape[-1]) / n


def test_sampling_filters_and_temperature():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  n = 4000
  sigma = lambda p: np.sqrt(p * (1 - p) / n)  # binomial std of a frequency
  # greedy ignores the key
  assert _draws(logits, SamplingConfig(temperature=0.0), 16).tolist() == [1, 0, 0, 0]
  # top-k 2: renormalised over the two most likely
  freq = _draws(logits, SamplingConfig(temperature=1.0, top_k=2), n)
  assert freq[2] == freq[3] == 0
  assert abs(freq[0] - 0.625) < 5 * sigma(0.625)
  # top-p 0.7: tokens 0 (mass before 0) and 1 (mass before 0.5) kept, 2 (0.8) dropped
  freq = _draws(logits, SamplingConfig(temperature=1.0, top_p=0.7), n)
  assert freq[2] == freq[3] == 0
  assert abs(freq[0] - 0.625) < 5 * sigma(0.625)
  # temperature 2: softmax(log p / 2)
  expected = np.sqrt(probs) / np.sqrt(probs).sum()
  freq = _draws(logits, SamplingConfig(temperature=2.0), n)
  assert np.all(np.abs(freq - expected) < 5 * sigma(expected)), (freq, expected)


def test_context_notes_for_long_prompts():
  mmfree = ModelConfig.tiny()
  (note,) = context_notes(mmfree, PROMPT, NEW, SEQ_LEN)
  assert "no context limit" in note and "no KV cache" in note and "exceed" in note
  (note,) = context_notes(mmfree, 2, 3, SEQ_LEN)
  assert "exceed" not in note
  sized, warning = context_notes(ModelConfig.tiny(kind="transformer"), PROMPT, NEW, SEQ_LEN)
  assert f"= {PROMPT + NEW} positions" in sized and "exceed the trained data.seq_len=8" in warning


class _Tok:
  vocab_size, eos_id, bos_id = 258, 256, None

  def encode(self, text):
    return list(text.encode())


def test_bad_generation_inputs():
  model = types.SimpleNamespace(cfg=ModelConfig.tiny())  # never run: the checks come first
  with pytest.raises(ValueError, match="empty prompt"):
    generate_text(model, _Tok(), "")
  with pytest.raises(ValueError, match="empty prompt"):
    generate(model, np.zeros((1, 0), np.int32))
  with pytest.raises(ValueError, match="token ids must be in"):
    generate(model, [[1, 999]])
  for bad, message in [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
  ]:
    with pytest.raises(ValueError, match=message):
      generate(model, [[1, 2]], SamplingConfig(**bad))


def test_memory_estimate_counts_the_cache_and_weights_the_model_has_under_gqa():
  """Generation's memory estimate under grouped K/V heads (2 or 1 of 4 query heads): the KV
  cache part is the bytes of the cache `init_state` makes, and the per-layer weight copy the
  bytes of the blocks' kernels and the head (k/v projections `[d, kv_heads * head_dim]`, not
  `[d, d]`)."""
  for kv_heads in (4, 2, 1):
    cfg = ModelConfig.tiny(
      kind="transformer", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=kv_heads
    )
    model = build_model(cfg, 0)
    parts = generation_memory_bytes(cfg, 3, 10, 6, frozen_copy=True)
    state = model.init_state(3, 10 + 6)
    assert parts["kv_cache"] == sum(a.nbytes for a in state.k + state.v), kv_heads
    assert parts["kv_cache"] == 2 * cfg.num_layers * 3 * 16 * kv_heads * cfg.head_dim * 4
    kernels = [a for a in jax.tree.leaves(nnx.state(model.blocks, nnx.Param)) if a.ndim == 3]
    want = sum(a.nbytes for a in kernels) + model.lm_head.kernel[...].nbytes
    assert parts["decode_weights"] == want, kv_heads
    d, width = cfg.d_model, kv_heads * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * width + 3 * d * cfg.intermediate_size
    assert want == 4 * (cfg.num_layers * per_layer + d * cfg.vocab_size)
