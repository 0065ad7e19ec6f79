"""Continuation scoring: the one primitive every evaluation reduces to.

`score_continuations(model, [(context_ids, continuation_ids), ...])` gives the summed
log-probability (nats) of each continuation given its context, and whether greedy decoding would
have produced it (lm-eval-harness's `(logprob, is_greedy)`).

- MatMul-free LM: each distinct context is prefilled ONCE (left-padded rows; the padding is cut
  off by a document reset at the first real token, which restarts the recurrence exactly as
  from a zero state), and its constant-size state `h [layers, batch, d]` is gathered onto every
  continuation of that context. Contexts and continuations of any length are processed in
  chunks of `chunk_len` tokens carrying the state, so memory is bounded and there is no
  context limit (nothing is truncated).
- Transformer++: context + continuation are RECOMPUTED in one right-padded causal forward per
  request (no KV-cache sharing across choices); sequences longer than `max_len + 1` tokens lose
  their oldest context tokens, as lm-eval-harness does.

Jitted functions take the graphdef static and the params as a pytree; shapes are bucketed to
bound recompiles. Inside `parallel.sharding.logical_sharding(mesh, rules)` everything runs on
that mesh: params placed by their logical names, token rows split over the batch axes and the
sequence over the context axis (a chunk the context size divides runs the split recurrence
or attention), the block passed to each jitted function as its static `layout`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfree_jax.infer.runner import prepare_for_scoring
from mmfree_jax.nn.model import RecurrentState, check_token_ids
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.parallel import sharding

log = logging.getLogger("mmfree_jax")
_TOKENS = ("activation_batch", "activation_seq")  # a `[batch, seq]` token array's names


class Tokenizer(Protocol):
  """What evaluation needs from a tokenizer (`mmfree_jax.data` provides one)."""

  vocab_size: int
  eos_id: int | None
  bos_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class Scored(NamedTuple):
  """Score of one continuation: summed log-prob (nats), all tokens greedy?, token count."""

  logprob: float
  is_greedy: bool
  num_tokens: int


# --------------------------------------------------------------------------------------------
# Jitted kernels (graphdef static, params a pytree; shapes bucketed to bound recompiles).
# --------------------------------------------------------------------------------------------


def _log_softmax(logits: jax.Array) -> jax.Array:
  # fp32 (f64 under x64) before the normalisation: bf16 logits lose ~3 digits in logsumexp.
  return jax.nn.log_softmax(logits.astype(acc_dtype(logits.dtype)), -1)


def _gather(logprobs: jax.Array, tokens: jax.Array):
  """`logprobs [B, T, V]`, `tokens [B, T]` → (log p(tokens) `[B, T]`, tokens == argmax)."""
  picked = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logprobs, axis=-1) == tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"))
def target_logprobs(graphdef, params, inputs, targets, segment_ids, layout=None):
  """One full forward. `inputs, targets [B, T]` int32, `segment_ids [B, T]` or None.

  Returns log p(target) `[B, T]` fp32 and `[B, T]` bool (target is the argmax). layout: the
  caller's `parallel.sharding.active()` (as every kernel here: the forward runs on its mesh,
  the sequence split over its context axis).
  """
  with sharding.within(layout):
    model = prepare_for_scoring(nnx.merge(graphdef, params))
    logits, _ = model(inputs, segment_ids=segment_ids)
    return _gather(_log_softmax(logits), targets)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"))
def _prefill_chunk(graphdef, params, tokens, segment_ids, state, layout=None):
  """MatMul-free prefill of one chunk of left-padded contexts.

  Args:
    tokens, segment_ids: `[C, T]` int32; segment 0 = padding, 1 = context.
    state: `RecurrentState` `h [layers, C, d]` carried from the previous chunk.
  Returns:
    log-probs of the next token after the chunk `[C, V]` fp32, the new state, whose rows are
    zeroed where no context token has been seen yet (so a context starting exactly at a chunk
    boundary starts from the zero state; one starting inside a chunk is reset there).
  """
  with sharding.within(layout):
    model = prepare_for_scoring(nnx.merge(graphdef, params))
    logits, state = model(tokens, segment_ids=segment_ids, state=state)
  started = (segment_ids != 0).any(axis=1)
  h = jnp.where(started[None, :, None], state.h, jnp.zeros_like(state.h))
  return _log_softmax(logits[:, -1]), RecurrentState(h)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"))
def _continuation_chunk(graphdef, params, tokens, state, first_logprobs, layout=None):
  """MatMul-free scoring of one chunk of right-padded continuations from a carried state.

  Args:
    tokens: `[B, T]` int32 continuation tokens (padding after each row's end is ignored).
    state: `RecurrentState` `h [layers, B, d]` after everything before `tokens`.
    first_logprobs: `[B, V]` fp32 log-probs predicting `tokens[:, 0]`.
  Returns:
    log p(tokens) `[B, T]`, is-argmax `[B, T]`, the new state, `[B, V]` log-probs predicting
    the token after the chunk.
  """
  with sharding.within(layout):
    model = prepare_for_scoring(nnx.merge(graphdef, params))
    logits, state = model(tokens, state=state)
  logprobs = _log_softmax(logits)  # position t predicts token t + 1
  predicting = jnp.concatenate([first_logprobs[:, None], logprobs[:, :-1]], axis=1)
  picked, greedy = _gather(predicting, tokens)
  return picked, greedy, state, logprobs[:, -1]


# --------------------------------------------------------------------------------------------
# Host-side batching.
# --------------------------------------------------------------------------------------------


def _bucket(n: int, cap: int | None = None) -> int:
  """Smallest power of two >= max(n, 8) (bounded recompiles); above `cap`, a multiple of it."""
  size = max(8, 1 << max(n - 1, 0).bit_length())
  if cap is not None and size > cap:
    size = cap * math.ceil(n / cap)
  return size


def _batch_rows(n: int, batch_size: int) -> int:
  """Rows of a padded batch holding n requests (powers of two below batch_size)."""
  return batch_size if n >= batch_size else min(batch_size, _bucket(n))


def _check_requests(requests, vocab_size: int) -> list[tuple[list[int], list[int]]]:
  out = []
  for k, (context, continuation) in enumerate(requests):
    context, continuation = list(context), list(continuation)
    if not context:
      raise ValueError(f"request {k}: empty context; condition on a prefix token (BOS or EOS)")
    if not continuation:
      raise ValueError(f"request {k}: empty continuation: there is nothing to score")
    check_token_ids(context + continuation, vocab_size)
    out.append((context, continuation))
  return out


def score_continuations(
  model: nnx.Module,
  requests: Sequence[tuple[Sequence[int], Sequence[int]]],
  *,
  batch_size: int = 16,
  max_len: int | None = None,
  chunk_len: int = 512,
) -> list[Scored]:
  """Log-likelihood of each continuation given its context.

  Args:
    model: `MatMulFreeLM` or `TransformerLM`.
    requests: `(context_ids, continuation_ids)` pairs, both non-empty lists of int ids.
    batch_size: rows per forward.
    max_len: Transformer++ only: at most this many input tokens per forward (the oldest
      context tokens are dropped; a continuation longer than it is an error). The MatMul-free
      LM ignores it: it has no context limit.
    chunk_len: MatMul-free only: tokens per forward chunk (bounds the `[B, T, vocab]` logits).
  Returns:
    one `Scored` per request, in order.
  """
  requests = _check_requests(requests, model.cfg.vocab_size)
  if not requests:
    return []
  if model.cfg.kind == "mmfree":
    return _score_recurrent(model, requests, batch_size, chunk_len)
  return _score_full_forward(model, requests, batch_size, max_len)


def _score_full_forward(model, requests, batch_size, max_len) -> list[Scored]:
  """Transformer++ path: one causal forward over context + continuation per request."""
  graphdef, params = nnx.split(model)
  params = sharding.place_params(params)
  sequences = []
  for k, (context, continuation) in enumerate(requests):
    if max_len is not None and len(continuation) > max_len:
      raise ValueError(
        f"request {k}: continuation of {len(continuation)} tokens exceeds "
        f"max_len={max_len}; raise max_len or score it in rolling windows"
      )
    seq = context + continuation
    if max_len is not None:
      seq = seq[-(max_len + 1) :]  # drop the oldest context tokens, as lm-eval does
    sequences.append(seq)
  order = sorted(range(len(requests)), key=lambda k: -len(sequences[k]))
  results: list[Scored | None] = [None] * len(requests)
  for start in range(0, len(order), batch_size):
    ids = order[start : start + batch_size]
    length = _bucket(max(len(sequences[k]) for k in ids) - 1)
    inputs = np.zeros((_batch_rows(len(ids), batch_size), length), np.int32)
    targets = np.zeros_like(inputs)
    for row, k in enumerate(ids):
      seq = sequences[k]
      inputs[row, : len(seq) - 1] = seq[:-1]
      targets[row, : len(seq) - 1] = seq[1:]
    inputs, targets = (sharding.place(x, _TOKENS) for x in (inputs, targets))
    picked, greedy = jax.device_get(
      target_logprobs(graphdef, params, inputs, targets, None, layout=sharding.active())
    )
    for row, k in enumerate(ids):
      end = len(sequences[k]) - 1
      span = slice(end - len(requests[k][1]), end)
      results[k] = Scored(
        float(np.sum(picked[row, span], dtype=np.float64)),
        bool(np.all(greedy[row, span])),
        len(requests[k][1]),
      )
  return results


def recurrent_scoring_model(model: nnx.Module) -> nnx.Module:
  """The MatMul-free model with document resets on (shares the params).

  Left-padded prefill relies on the reset at the first real token. A model trained with
  `reset_at_doc_start=False` computes the same function for one document per row: the flag
  only matters where a row holds several documents, which scoring never does.
  """
  if model.cfg.reset_at_doc_start:
    return model
  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, state)
  new_cfg = dataclasses.replace(model.cfg, reset_at_doc_start=True)
  for _, module in nnx.iter_modules(clone):  # every module holding the config (same graphdef
    if getattr(module, "cfg", None) == model.cfg:  # as a model built with resets on)
      module.cfg = new_cfg
  return clone


def _prefill(graphdef, params, contexts, rows, chunk_len):
  """Left-pads `contexts` into `[rows, P]`, runs the chunked prefill.

  Returns `(state h [layers, rows, d], next-token log-probs [rows, V])` on device.
  """
  model = nnx.merge(graphdef, params)
  length = _bucket(max(map(len, contexts)), chunk_len)
  tokens = np.zeros((rows, length), np.int32)
  segments = np.zeros_like(tokens)
  for row, context in enumerate(contexts):
    tokens[row, length - len(context) :] = context
    segments[row, length - len(context) :] = 1
  tokens, segments = (sharding.place(x, _TOKENS) for x in (tokens, segments))
  state = model.init_state(rows)
  step = min(length, chunk_len)
  for start in range(0, length, step):
    chunk = slice(start, start + step)
    last, state = _prefill_chunk(
      graphdef, params, tokens[:, chunk], segments[:, chunk], state, layout=sharding.active()
    )
  return state, last


def _continue(graphdef, params, state, first, continuations, rows, chunk_len):
  """Scores right-padded `continuations` from `state` `[layers, rows, d]` and `first [rows, V]`."""
  length = _bucket(max(map(len, continuations)), chunk_len)
  tokens = np.zeros((rows, length), np.int32)
  for row, continuation in enumerate(continuations):
    tokens[row, : len(continuation)] = continuation
  tokens = sharding.place(tokens, _TOKENS)
  step = min(length, chunk_len)
  picked, greedy = [], []
  for start in range(0, length, step):
    p, g, state, first = _continuation_chunk(
      graphdef, params, tokens[:, start : start + step], state, first, layout=sharding.active()
    )
    picked.append(p)
    greedy.append(g)
  return [np.concatenate(x, axis=1) for x in jax.device_get((picked, greedy))]


def _score_recurrent(model, requests, batch_size, chunk_len) -> list[Scored]:
  """MatMul-free path: prefill each distinct context once, broadcast its state to its
  continuations (a gather over the batch axis), score the continuations from it."""
  graphdef, params = nnx.split(recurrent_scoring_model(model))
  params = sharding.place_params(params)
  context_index: dict[tuple[int, ...], int] = {}
  for context, _ in requests:
    context_index.setdefault(tuple(context), len(context_index))
  contexts = list(context_index)
  by_context: list[list[int]] = [[] for _ in contexts]
  for k, (context, _) in enumerate(requests):
    by_context[context_index[tuple(context)]].append(k)
  order = sorted(range(len(contexts)), key=lambda c: -len(contexts[c]))
  results: list[Scored | None] = [None] * len(requests)
  for start in range(0, len(order), batch_size):
    group = order[start : start + batch_size]
    rows = _batch_rows(len(group), batch_size)
    state, last = _prefill(graphdef, params, [contexts[c] for c in group], rows, chunk_len)
    pairs = [(row, k) for row, c in enumerate(group) for k in by_context[c]]
    pairs.sort(key=lambda p: -len(requests[p[1]][1]))
    for p0 in range(0, len(pairs), batch_size):
      batch = pairs[p0 : p0 + batch_size]
      n_rows = _batch_rows(len(batch), batch_size)
      source = np.zeros((n_rows,), np.int32)  # padding rows reuse context row 0
      source[: len(batch)] = [row for row, _ in batch]
      # Broadcast: every continuation starts from its context's state and last log-probs.
      sub_state = RecurrentState(state.h[:, source])
      picked, greedy = _continue(
        graphdef,
        params,
        sub_state,
        last[source],
        [requests[k][1] for _, k in batch],
        n_rows,
        chunk_len,
      )
      for row, (_, k) in enumerate(batch):
        n = len(requests[k][1])
        results[k] = Scored(
          float(np.sum(picked[row, :n], dtype=np.float64)), bool(np.all(greedy[row, :n])), n
        )
  return results
