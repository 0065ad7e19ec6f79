"""Batched generation: prompts of different lengths in one decode loop give, row by row, the
greedy continuation of repeated full forwards (identical ids, float64 tiny random models), stop
at their own EOS, and sample from the filtered distribution. Latent MatMul-free, Transformer++
and the packed model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax.config import ModelConfig
from mmfree_jax.generate import SamplingConfig, generate_batch
from mmfree_jax.nn.model import build_model
from mmfree_jax.nn.packed import PackedLM
from tests.perturb import perturb_params

VOCAB = 260
LENGTHS = (3, 9, 5, 1)


@functools.lru_cache(maxsize=None)
def _model(kind):
  cfg = ModelConfig.tiny(kind=kind, vocab_size=VOCAB, dtype="float64", param_dtype="float64")
  return perturb_params(build_model(cfg, 0))


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, n).tolist() for n in LENGTHS]


_full_logits = nnx.jit(lambda m, t: m(t)[0])
PAD = 24  # reference forwards run on [rows, PAD] right-padded sequences (one compile)


def _greedy_reference(model, prompts, new):
  """Independent: greedy continuation by repeated full causal forwards (no state, no cache)."""
  seqs = [list(p) for p in prompts]
  for _ in range(new):
    rows = np.zeros((len(seqs), PAD), np.int32)
    for r, seq in enumerate(seqs):
      rows[r, : len(seq)] = seq
    logits = np.asarray(_full_logits(model, jnp.asarray(rows)))
    for r, seq in enumerate(seqs):
      seq.append(int(np.argmax(logits[r, len(seq) - 1])))
  return [seq[len(p) :] for seq, p in zip(seqs, prompts)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmfree", "transformer", "packed"])
def test_batch_rows_equal_greedy_full_forwards(kind):
  with jax.enable_x64(True):
    model = _model("mmfree" if kind == "packed" else kind)
    if kind == "packed":
      model = PackedLM.from_model(model, "2bit")
    prompts = _prompts()
    cfg = SamplingConfig(max_new_tokens=6)
    batched = generate_batch(model, prompts, cfg)
    assert batched == _greedy_reference(model, prompts, 6)
    # per-row EOS (a traced value: same program): row 1 stops at its 3rd token, kept as its
    # last; rows without that token run on
    eos = batched[1][2]
    stopped = generate_batch(model, prompts, cfg._replace(eos_id=eos))
    for row, full in zip(stopped, batched):
      cut = full.index(eos) + 1 if eos in full else len(full)
      assert row == full[:cut]


def test_batched_sampling_stays_in_the_top_k():
  with jax.enable_x64(True):
    model = _model("mmfree")
    prompts = _prompts(1)
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, top_k=3)
    rows = generate_batch(model, prompts, cfg, seed=5)
    assert rows == generate_batch(model, prompts, cfg, seed=5)  # seeded
    # each token among the 3 best after its prefix: one causal forward over right-padded rows
    seqs = [prompt + row for prompt, row in zip(prompts, rows)]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for r, seq in enumerate(seqs):
      padded[r, : len(seq)] = seq
    logits = np.asarray(_full_logits(model, jnp.asarray(padded)))
    for r, (prompt, row) in enumerate(zip(prompts, rows)):
      assert len(row) == 4
      for k, token in enumerate(row):
        assert token in np.argsort(logits[r, len(prompt) + k - 1])[-3:]


def test_batch_input_errors():
  model = _model("mmfree")
  with pytest.raises(ValueError, match="at least one token"):
    generate_batch(model, [[1, 2], []], SamplingConfig(max_new_tokens=2))
  with pytest.raises(ValueError, match="token ids must be in"):
    generate_batch(model, [[1, 2], [VOCAB]], SamplingConfig(max_new_tokens=2))


def test_freed_heap_is_returned_once_per_compiled_program(monkeypatch):
  """generate_batch trims glibc's heap after a call that compiled (the compiler's freed
  memory would otherwise stay resident), not after calls that reuse a program."""
  from mmfree_jax import generate as gen

  calls = []
  monkeypatch.setattr(gen, "_return_freed_heap", lambda: calls.append(1))
  model = build_model(ModelConfig.tiny(vocab_size=61, d_model=24, num_layers=1), 0)
  cfg = SamplingConfig(max_new_tokens=3)
  generate_batch(model, [[1, 2, 3]], cfg)
  generate_batch(model, [[4, 5, 6]], cfg)  # same shapes: the compiled program is reused
  assert len(calls) == 1
  generate_batch(model, [[1, 2, 3, 4, 5]], cfg)  # a new prompt length compiles again
  assert len(calls) == 2


@pytest.mark.subprocess
def test_packed_inference_imports_no_checkpoint_or_data_stack():
  """Loading a packed directory and generating from it import neither orbax/tensorstore nor
  grain/array_record (~55 MB of resident memory in a serving process)."""
  import os
  import subprocess
  import sys

  code = (
    "import sys, mmfree_jax.generate; from mmfree_jax.export import load_packed; "
    "print(sorted(m for m in ('orbax', 'tensorstore', 'grain', 'array_record') "
    "if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
