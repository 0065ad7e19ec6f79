"""Evaluation: continuation log-likelihoods, perplexity / bits-per-byte, zero-shot multiple choice.

Everything reduces to one primitive, `score_continuations(model, [(context_ids,
continuation_ids), ...])`: the summed log-probability (nats) of each continuation given its
context, and whether greedy decoding would have produced it (lm-eval-harness's
`(logprob, is_greedy)`).

- MatMul-free LM: each distinct context is prefilled ONCE (left-padded rows; the padding is cut
  off by a document reset at the first real token, which restarts the recurrence exactly as
  from a zero state), and its constant-size state `h [layers, batch, d]` is gathered onto every
  continuation of that context. Contexts and continuations of any length are processed in
  chunks of `chunk_len` tokens carrying the state, so memory is bounded and there is no
  context limit (nothing is truncated).
- Transformer++: context + continuation are RECOMPUTED in one right-padded causal forward per
  request (no KV-cache sharing across choices); sequences longer than `max_len + 1` tokens lose
  their oldest context tokens, as lm-eval-harness does.

Perplexity of documents follows lm-eval's `loglikelihood_rolling`: each document is predicted
from a prefix token (BOS, else EOS); the Transformer scores it in rolling windows of `max_len`
tokens, the MatMul-free LM in one pass with the state carried (full context).
Bits per byte = total NLL in bits / UTF-8 bytes of the scored text.

The last section (`evaluate_workdir`) is what `eval.py` runs: load a checkpoint, run the
requested evaluations, write `WORKDIR/eval/step_<N>.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Iterable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfree_jax import loss as loss_lib
from mmfree_jax.model import RecurrentState, check_token_ids

log = logging.getLogger("mmfree_jax")


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
  return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)


def _gather(logprobs: jax.Array, tokens: jax.Array):
  """`logprobs [B, T, V]`, `tokens [B, T]` → (log p(tokens) `[B, T]`, tokens == argmax)."""
  picked = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logprobs, axis=-1) == tokens


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _target_logprobs(graphdef, params, inputs, targets, segment_ids):
  """One full forward. `inputs, targets [B, T]` int32, `segment_ids [B, T]` or None.

  Returns log p(target) `[B, T]` fp32 and `[B, T]` bool (target is the argmax).
  """
  model = nnx.merge(graphdef, params)
  logits, _ = model(inputs, segment_ids=segment_ids)
  return _gather(_log_softmax(logits), targets)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill_chunk(graphdef, params, tokens, segment_ids, state):
  """MatMul-free prefill of one chunk of left-padded contexts.

  Args:
    tokens, segment_ids: `[C, T]` int32; segment 0 = padding, 1 = context.
    state: `RecurrentState` `h [layers, C, d]` carried from the previous chunk.
  Returns:
    log-probs of the next token after the chunk `[C, V]` fp32, the new state, whose rows are
    zeroed where no context token has been seen yet (so a context starting exactly at a chunk
    boundary starts from the zero state; one starting inside a chunk is reset there).
  """
  model = nnx.merge(graphdef, params)
  logits, state = model(tokens, segment_ids=segment_ids, state=state)
  started = (segment_ids != 0).any(axis=1)
  h = jnp.where(started[None, :, None], state.h, jnp.zeros_like(state.h))
  return _log_softmax(logits[:, -1]), RecurrentState(h)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _continuation_chunk(graphdef, params, tokens, state, first_logprobs):
  """MatMul-free scoring of one chunk of right-padded continuations from a carried state.

  Args:
    tokens: `[B, T]` int32 continuation tokens (padding after each row's end is ignored).
    state: `RecurrentState` `h [layers, B, d]` after everything before `tokens`.
    first_logprobs: `[B, V]` fp32 log-probs predicting `tokens[:, 0]`.
  Returns:
    log p(tokens) `[B, T]`, is-argmax `[B, T]`, the new state, `[B, V]` log-probs predicting
    the token after the chunk.
  """
  model = nnx.merge(graphdef, params)
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


def score_continuations(model: nnx.Module, requests: Sequence[tuple[Sequence[int],
                                                                    Sequence[int]]], *,
                        batch_size: int = 16, max_len: int | None = None,
                        chunk_len: int = 512) -> list[Scored]:
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
  sequences = []
  for k, (context, continuation) in enumerate(requests):
    if max_len is not None and len(continuation) > max_len:
      raise ValueError(f"request {k}: continuation of {len(continuation)} tokens exceeds "
                       f"max_len={max_len}; raise max_len or score it in rolling windows")
    seq = context + continuation
    if max_len is not None:
      seq = seq[-(max_len + 1):]  # drop the oldest context tokens, as lm-eval does
    sequences.append(seq)
  order = sorted(range(len(requests)), key=lambda k: -len(sequences[k]))
  results: list[Scored | None] = [None] * len(requests)
  for start in range(0, len(order), batch_size):
    ids = order[start:start + batch_size]
    length = _bucket(max(len(sequences[k]) for k in ids) - 1)
    inputs = np.zeros((_batch_rows(len(ids), batch_size), length), np.int32)
    targets = np.zeros_like(inputs)
    for row, k in enumerate(ids):
      seq = sequences[k]
      inputs[row, :len(seq) - 1] = seq[:-1]
      targets[row, :len(seq) - 1] = seq[1:]
    picked, greedy = jax.device_get(_target_logprobs(graphdef, params, inputs, targets, None))
    for row, k in enumerate(ids):
      end = len(sequences[k]) - 1
      span = slice(end - len(requests[k][1]), end)
      results[k] = Scored(float(np.sum(picked[row, span], dtype=np.float64)),
                          bool(np.all(greedy[row, span])), len(requests[k][1]))
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
    tokens[row, length - len(context):] = context
    segments[row, length - len(context):] = 1
  state = model.init_state(rows)
  step = min(length, chunk_len)
  for start in range(0, length, step):
    chunk = slice(start, start + step)
    last, state = _prefill_chunk(graphdef, params, tokens[:, chunk], segments[:, chunk], state)
  return state, last


def _continue(graphdef, params, state, first, continuations, rows, chunk_len):
  """Scores right-padded `continuations` from `state` `[layers, rows, d]` and `first [rows, V]`."""
  length = _bucket(max(map(len, continuations)), chunk_len)
  tokens = np.zeros((rows, length), np.int32)
  for row, continuation in enumerate(continuations):
    tokens[row, :len(continuation)] = continuation
  step = min(length, chunk_len)
  picked, greedy = [], []
  for start in range(0, length, step):
    p, g, state, first = _continuation_chunk(graphdef, params, tokens[:, start:start + step],
                                             state, first)
    picked.append(p)
    greedy.append(g)
  return [np.concatenate(x, axis=1) for x in jax.device_get((picked, greedy))]


def _score_recurrent(model, requests, batch_size, chunk_len) -> list[Scored]:
  """MatMul-free path: prefill each distinct context once, broadcast its state to its
  continuations (a gather over the batch axis), score the continuations from it."""
  graphdef, params = nnx.split(recurrent_scoring_model(model))
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
    group = order[start:start + batch_size]
    rows = _batch_rows(len(group), batch_size)
    state, last = _prefill(graphdef, params, [contexts[c] for c in group], rows, chunk_len)
    pairs = [(row, k) for row, c in enumerate(group) for k in by_context[c]]
    pairs.sort(key=lambda p: -len(requests[p[1]][1]))
    for p0 in range(0, len(pairs), batch_size):
      batch = pairs[p0:p0 + batch_size]
      n_rows = _batch_rows(len(batch), batch_size)
      source = np.zeros((n_rows,), np.int32)  # padding rows reuse context row 0
      source[:len(batch)] = [row for row, _ in batch]
      # Broadcast: every continuation starts from its context's state and last log-probs.
      sub_state = RecurrentState(state.h[:, source])
      picked, greedy = _continue(graphdef, params, sub_state, last[source],
                                 [requests[k][1] for _, k in batch], n_rows, chunk_len)
      for row, (_, k) in enumerate(batch):
        n = len(requests[k][1])
        results[k] = Scored(float(np.sum(picked[row, :n], dtype=np.float64)),
                            bool(np.all(greedy[row, :n])), n)
  return results


# --------------------------------------------------------------------------------------------
# Perplexity and bits per byte.
# --------------------------------------------------------------------------------------------

def prefix_token(tokenizer: Tokenizer) -> int:
  """The token a document is predicted from: BOS if the tokenizer has one, else EOS (which
  precedes every document of a packed training stream)."""
  token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
  if token is None:
    raise ValueError(f"tokenizer {tokenizer!r} has neither a BOS nor an EOS id; the first "
                     "token of a document needs one to be predicted from")
  return token


def rolling_requests(ids: Sequence[int], prefix_id: int,
                     max_len: int | None) -> list[tuple[list[int], list[int]]]:
  """lm-eval's rolling windows (context_len 1) as disjoint `(context, continuation)` pairs.

  Every token of `ids` is predicted exactly once; the first from `prefix_id`; each window has
  at most `max_len` input tokens and the last one gets a full-size context. `max_len=None`: one
  window (the whole document).
  """
  ids = list(ids)
  if not ids:
    return []
  if max_len is None or len(ids) <= max_len:
    return [([prefix_id], ids)]
  out = [([prefix_id], ids[:max_len])]
  predicted = max_len
  while predicted < len(ids):
    n = min(len(ids) - predicted, max_len)
    end = predicted + n
    inputs = ids[end - max_len - 1:end - 1]  # max_len tokens right before the last target
    out.append((inputs[:max_len - (n - 1)], ids[end - n:end]))  # drop the overlap
    predicted = end
  return out


def summarize_nll(nll_nats: float, tokens: int, num_bytes: int | None) -> dict:
  """`{nll_nats, tokens, bytes, loss, perplexity, bits_per_token, bits_per_byte}` (floats)."""
  loss = nll_nats / max(tokens, 1)
  out = {"nll_nats": nll_nats, "tokens": int(tokens), "loss": loss,
         "perplexity": float(math.exp(min(loss, 700.0))), "bits_per_token": loss / math.log(2)}
  if num_bytes is not None:
    out["bytes"] = int(num_bytes)
    out["bits_per_byte"] = nll_nats / math.log(2) / max(num_bytes, 1)
  return out


def perplexity_of_texts(model: nnx.Module, tokenizer: Tokenizer, texts: Iterable[str], *,
                        max_len: int | None = None, batch_size: int = 8,
                        chunk_len: int = 512) -> dict:
  """Perplexity and bits per byte of whole documents.

  Args:
    texts: documents; empty ones are skipped.
    max_len: Transformer++ window (the trained `data.seq_len`); ignored by the MatMul-free LM,
      which scores every document with its full context.
  Returns:
    `summarize_nll` of all documents (every token predicted once, the first from the prefix
    token; `bytes` = UTF-8 bytes of the documents), plus `documents`.
  """
  prefix = prefix_token(tokenizer)
  window = max_len if model.cfg.kind == "transformer" else None
  requests, num_bytes, documents = [], 0, 0
  for text in texts:
    ids = tokenizer.encode(text)
    if not ids:
      continue
    requests += rolling_requests(ids, prefix, window)
    num_bytes += len(text.encode("utf-8"))
    documents += 1
  if not requests:
    raise ValueError("no text to score: every document was empty")
  scored = score_continuations(model, requests, batch_size=batch_size, max_len=max_len,
                               chunk_len=chunk_len)
  nll = -sum(s.logprob for s in scored)
  out = summarize_nll(nll, sum(s.num_tokens for s in scored), num_bytes)
  out["documents"] = documents
  return out


def special_ids(tokenizer: Tokenizer) -> set[int]:
  """Ids that stand for no text (eos, bos, pad): they count as tokens but add no bytes."""
  ids = (getattr(tokenizer, name, None) for name in ("eos_id", "bos_id", "pad_id"))
  return {int(i) for i in ids if i is not None}


def _target_bytes(tokenizer: Tokenizer, targets: np.ndarray, segments: np.ndarray) -> int:
  """UTF-8 bytes of the counted targets of packed windows (`targets, segments [B, T]`;
  segment 0 = padding, not counted). Each run of one document in a row is decoded as a whole,
  without its special tokens."""
  specials = special_ids(tokenizer)
  total = 0
  for row_tokens, row_segments in zip(targets, segments):
    start = 0
    for t in range(1, len(row_segments) + 1):
      if t == len(row_segments) or row_segments[t] != row_segments[start]:
        if row_segments[start] != 0:
          ids = [int(i) for i in row_tokens[start:t] if int(i) not in specials]
          total += len(tokenizer.decode(ids).encode("utf-8"))
        start = t
  return total


def perplexity_of_batches(model: nnx.Module, batches: Iterable[dict],
                          tokenizer: Tokenizer | None = None) -> dict:
  """Perplexity over packed windows, the training loss's definition (`steps.make_eval_step`).

  Args:
    batches: `{"tokens": int32 [B, seq+1], "segment_ids": int32 [B, seq+1]}` windows; inputs
      `tokens[:, :-1]`, targets `tokens[:, 1:]`, counted where `segment_ids[:, 1:] != 0`.
    tokenizer: to count bytes (bits per byte); None skips them.
  Returns:
    `summarize_nll` of all counted targets.
  """
  graphdef, params = nnx.split(model)
  nll, tokens, num_bytes = 0.0, 0, 0
  for batch in batches:
    tokens_np, segments_np = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    check_token_ids(tokens_np, model.cfg.vocab_size)
    inputs, input_segments, targets, mask = loss_lib.split_window(tokens_np, segments_np)
    segments = input_segments if model.cfg.reset_at_doc_start else None
    picked, _ = jax.device_get(_target_logprobs(graphdef, params, inputs, targets, segments))
    nll -= float(np.sum(np.where(mask, picked, 0.0), dtype=np.float64))
    tokens += int(mask.sum())
    if tokenizer is not None:
      num_bytes += _target_bytes(tokenizer, targets, segments_np[:, 1:])
  if tokens == 0:
    raise ValueError("the validation batches hold no counted target token")
  return summarize_nll(nll, tokens, num_bytes if tokenizer is not None else None)


# --------------------------------------------------------------------------------------------
# Zero-shot multiple choice.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MCExample:
  """One item: `context`, candidate `choices`, index of the right one; `where` = file:line."""
  context: str
  choices: tuple[str, ...]
  label: int
  where: str = ""


def parse_mc_line(line: str, where: str) -> MCExample:
  """Parses `{"context": str, "choices": [str, ...], "label": int}`; errors name `where`."""
  def fail(msg):
    raise ValueError(f"{where}: {msg}. Expected one JSON object per line: "
                     '{"context": str, "choices": [str, ...], "label": int}')
  try:
    item = json.loads(line)
  except json.JSONDecodeError as e:
    fail(f"invalid JSON ({e.msg} at column {e.colno})")
  if not isinstance(item, dict):
    fail(f"expected a JSON object, got {type(item).__name__}")
  missing = [k for k in ("context", "choices", "label") if k not in item]
  if missing:
    fail(f"missing field(s) {missing}")
  context, choices, label = item["context"], item["choices"], item["label"]
  if not isinstance(context, str):
    fail(f"'context' must be a string, got {type(context).__name__}")
  if not isinstance(choices, list) or not choices:
    fail("'choices' must be a non-empty list of strings")
  if not all(isinstance(c, str) and c for c in choices):
    fail("every choice must be a non-empty string")
  if isinstance(label, bool) or not isinstance(label, int):
    fail(f"'label' must be an int, got {label!r}")
  if not 0 <= label < len(choices):
    fail(f"label {label} out of range for {len(choices)} choices")
  return MCExample(context, tuple(choices), label, where)


def load_mc_jsonl(path: str) -> list[MCExample]:
  """Reads a multiple-choice JSONL file (blank lines skipped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"multiple-choice file {path!r} not found")
  with open(path, encoding="utf-8") as f:
    examples = [parse_mc_line(line, f"{path}:{n}") for n, line in enumerate(f, 1)
                if line.strip()]
  if not examples:
    raise ValueError(f"{path}: no examples (the file is empty)")
  return examples


def document_start(tokenizer: Tokenizer) -> list[int]:
  """`[bos]` where the tokenizer has one, else `[]`: how training documents begin
  (`Tokenizer.encode_document` is `[bos] + encode(text) + [eos]`)."""
  return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def encode_pair(tokenizer: Tokenizer, context: str,
                continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of a `(context, continuation)` pair, split as lm-eval-harness does.

  Trailing context spaces move to the continuation; the continuation ids are
  `encode(context + continuation)` past `len(encode(context))`. The context starts as a
  training document does (`document_start`); an empty context becomes the prefix token
  (`prefix_token`: BOS, else EOS).
  """
  if not context:
    return [prefix_token(tokenizer)], tokenizer.encode(continuation)
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole = tokenizer.encode(context + continuation)
  context_ids = tokenizer.encode(context)
  return document_start(tokenizer) + context_ids, whole[len(context_ids):]


def _stderr(values: np.ndarray) -> float:
  """Standard error of the mean (lm-eval's `mean_stderr`: sample std / sqrt(n))."""
  n = len(values)
  return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def evaluate_multiple_choice(model: nnx.Module, tokenizer: Tokenizer,
                             examples: Sequence[MCExample], *, batch_size: int = 16,
                             max_len: int | None = None, delimiter: str = " ",
                             chunk_len: int = 512) -> dict:
  """Zero-shot accuracy: the choice with the highest log-likelihood wins.

  The scored continuation is `delimiter + choice` (lm-eval's `target_delimiter`). `acc` ranks
  by the summed log-likelihood, `acc_norm` by log-likelihood / UTF-8 byte length of the choice
  (lm-eval divides by characters: the same for ASCII).
  Returns:
    `{n, acc, acc_stderr, acc_norm, acc_norm_stderr, predictions, predictions_norm}`.
  """
  if not examples:
    raise ValueError("no multiple-choice examples to score")
  requests = []
  for ex in examples:
    for choice in ex.choices:
      context_ids, choice_ids = encode_pair(tokenizer, ex.context, delimiter + choice)
      if not context_ids or not choice_ids:
        raise ValueError(f"{ex.where}: choice {choice!r} (or its context) tokenizes to no "
                         "tokens; give each choice some text")
      requests.append((context_ids, choice_ids))
  scored = score_continuations(model, requests, batch_size=batch_size, max_len=max_len,
                               chunk_len=chunk_len)
  correct, correct_norm, preds, preds_norm, k = [], [], [], [], 0
  for ex in examples:
    lls = np.array([s.logprob for s in scored[k:k + len(ex.choices)]])
    k += len(ex.choices)
    lengths = np.array([len(c.encode("utf-8")) for c in ex.choices], np.float64)
    preds.append(int(np.argmax(lls)))
    preds_norm.append(int(np.argmax(lls / lengths)))
    correct.append(preds[-1] == ex.label)
    correct_norm.append(preds_norm[-1] == ex.label)
  correct, correct_norm = np.array(correct, float), np.array(correct_norm, float)
  return {"n": len(examples), "acc": float(correct.mean()), "acc_stderr": _stderr(correct),
          "acc_norm": float(correct_norm.mean()), "acc_norm_stderr": _stderr(correct_norm),
          "predictions": preds, "predictions_norm": preds_norm}


# --------------------------------------------------------------------------------------------
# A workdir's evaluation (what eval.py runs).
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalOptions:
  """What to evaluate. Empty fields are skipped.

  ppl_split: "val" scores `val_batches` validation batches of the workdir's data config.
  ppl_files: text files (one document per paragraph, as `data.source=text`) or `.jsonl`
    files (one document per line, field `text_field`).
  mc_files: multiple-choice JSONL files (`{"context", "choices", "label"}` per line).
  mc_limit: score at most this many items per file (0 = all).
  prompts: texts to continue with `sampling` (its eos_id defaults to the tokenizer's).
  """
  ppl_split: str = ""
  ppl_files: Sequence[str] = ()
  text_field: str = "text"
  val_batches: int = 8
  mc_files: Sequence[str] = ()
  mc_limit: int = 0
  prompts: Sequence[str] = ()
  sampling: Any = None  # generate.SamplingConfig
  seed: int = 0
  batch_size: int = 16
  chunk_len: int = 512


def read_documents(path: str, text_field: str = "text") -> list[str]:
  """Documents of a `.jsonl` file (field text_field) or a text file (paragraphs)."""
  from mmfree_jax.data import sources  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"perplexity file {path!r} not found")
  is_jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
  docs = (sources.jsonl_documents(path, text_field) if is_jsonl
          else sources.text_documents(path))
  docs = [d for d in docs if d]
  if not docs:
    raise ValueError(f"perplexity file {path!r} holds no text")
  return docs


def has_work(options: EvalOptions) -> bool:
  return bool(options.ppl_split or options.ppl_files or options.mc_files or options.prompts)


def _check_options(options: EvalOptions) -> dict[str, list[MCExample]]:
  """Fails on bad options or files before any model is loaded; returns the parsed MC files."""
  if options.ppl_split not in ("", "val"):
    raise ValueError(f"unknown ppl split {options.ppl_split!r}; use 'val' (or a file with "
                     "--ppl_file)")
  if options.batch_size < 1 or options.chunk_len < 1 or options.val_batches < 1:
    raise ValueError("batch_size, chunk_len and val_batches must be >= 1")
  for path in options.ppl_files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"perplexity file {path!r} not found")
  if any(not p for p in options.prompts):
    raise ValueError("empty prompt: generation needs some text to continue; pass --prompt "
                     "with at least one character")
  if options.prompts and options.sampling is not None:
    options.sampling.validate()
  mc = {}
  for path in options.mc_files:
    examples = load_mc_jsonl(path)
    mc[path] = examples[:options.mc_limit] if options.mc_limit > 0 else examples
  if not has_work(options):
    raise ValueError("nothing to evaluate: pass --ppl_split=val, --ppl_file, --mc_file or "
                     "--prompt")
  return mc


def load_for_eval(workdir: str, step: int | None = None, config=None):
  """`(model, config, step)`: the workdir's checkpoint with its own config, or with `config`
  (same architecture; other data/inference settings)."""
  from mmfree_jax import config as config_lib, loading  # pylint: disable=g-import-not-at-top
  from mmfree_jax.model import abstract_model  # pylint: disable=g-import-not-at-top
  if config is None:
    return loading.load_model(workdir, step)
  model_cfg = config_lib.ModelConfig.from_config(config.model)
  params, step = loading.load_params(workdir, model_cfg, step)
  graphdef, _ = nnx.split(abstract_model(model_cfg))
  return nnx.merge(graphdef, params), config, step


def load_tokenizer_for(cfg, model_cfg) -> Tokenizer:
  """The tokenizer of a config's `data` section, checked against the model's vocabulary."""
  from mmfree_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mmfree_jax.training import default_cache_dir  # pylint: disable=g-import-not-at-top
  tokenizer = data_lib.tokenizer_from_config(cfg.data, cache_dir=default_cache_dir())
  data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  return tokenizer


def _mc_name(path: str, taken: dict) -> str:
  name = os.path.splitext(os.path.basename(path))[0]
  return name if name not in taken else path


def scoring_note(model_cfg, seq_len: int) -> str:
  """How this model's documents and choices are scored (printed and saved with results)."""
  if model_cfg.kind == "mmfree":
    return ("MatMul-free LM: no context limit; documents and contexts are scored with their "
            "full context (recurrent state carried across chunks), each multiple-choice "
            "context is prefilled once and its state reused for every choice")
  return (f"Transformer++: at most data.seq_len={seq_len} input tokens per forward (rolling "
          "windows for documents, oldest context tokens dropped otherwise); multiple-choice "
          "context + choice recomputed for each choice (no KV-cache reuse)")


def _model_summary(model, seq_len: int, tokenizer) -> dict:
  from mmfree_jax.model import count_params  # pylint: disable=g-import-not-at-top
  cfg = model.cfg
  return {"kind": cfg.kind, "params": count_params(model), "d_model": cfg.d_model,
          "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "seq_len": seq_len,
          "tokenizer": getattr(tokenizer, "spec", type(tokenizer).__name__)}


def _validation_perplexity(model, cfg, tokenizer, options: EvalOptions) -> dict:
  from mmfree_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mmfree_jax.training import default_cache_dir  # pylint: disable=g-import-not-at-top
  batches = data_lib.validation_batches(cfg.data, tokenizer, batch_size=options.batch_size,
                                        num_batches=options.val_batches,
                                        cache_dir=default_cache_dir())
  return perplexity_of_batches(model, batches, tokenizer)


def _generation(model, tokenizer, prompt: str, options: EvalOptions, seq_len: int) -> dict:
  from mmfree_jax import generate as generate_lib  # pylint: disable=g-import-not-at-top
  sampling = options.sampling or generate_lib.SamplingConfig()
  if sampling.eos_id is None:
    sampling = sampling._replace(eos_id=tokenizer.eos_id)
  g = generate_lib.generate_text(model, tokenizer, prompt, sampling, seed=options.seed,
                                 context_limit=seq_len)
  return {"prompt": prompt, "text": g.text, "prompt_tokens": g.prompt_tokens,
          "new_tokens": len(g.new_tokens), "stopped_at_eos": g.stopped_at_eos,
          "notes": g.notes, "sampling": dict(sampling._asdict(), seed=options.seed)}


def evaluate_workdir(workdir: str, options: EvalOptions, *, step: int | None = None,
                     config=None, tokenizer: Tokenizer | None = None,
                     output_dir: str | None = None) -> dict:
  """Loads a checkpoint, runs `options`, writes and returns the results.

  Args:
    workdir: a training or import workdir (config.json + checkpoints/).
    step: checkpoint step (None = latest).
    config: a full config overriding the workdir's (architecture must match).
    tokenizer: None = `data.tokenizer_from_config(config.data)`.
    output_dir: where `step_<N>.json` goes (default `WORKDIR/eval`); an existing file of that
      step is updated (sections not run now are kept).
  Returns:
    `{"step", "workdir", "model", "perplexity": {name: ...}, "multiple_choice": {name: ...},
    "generation": [...], "notes": [...], "seconds", "output": path}`.
  """
  started = time.time()
  mc_examples = _check_options(options)  # bad options and files fail before loading
  model, cfg, step = load_for_eval(workdir, step, config)
  tokenizer = tokenizer or load_tokenizer_for(cfg, model.cfg)
  seq_len = int(cfg.data.seq_len)
  max_len = seq_len if model.cfg.kind == "transformer" else None
  common = dict(batch_size=options.batch_size, chunk_len=options.chunk_len)
  results: dict[str, Any] = {
      "step": step, "workdir": os.path.abspath(workdir),
      "model": _model_summary(model, seq_len, tokenizer), "perplexity": {},
      "multiple_choice": {}, "generation": [], "notes": [scoring_note(model.cfg, seq_len)]}
  if options.ppl_split == "val":
    results["perplexity"]["val"] = _validation_perplexity(model, cfg, tokenizer, options)
  for path in options.ppl_files:
    out = perplexity_of_texts(model, tokenizer, read_documents(path, options.text_field),
                              max_len=max_len, **common)
    results["perplexity"][path] = dict(out, file=os.path.abspath(path))
  for path, examples in mc_examples.items():
    out = evaluate_multiple_choice(model, tokenizer, examples, max_len=max_len, **common)
    results["multiple_choice"][_mc_name(path, results["multiple_choice"])] = dict(
        out, file=os.path.abspath(path))
  for prompt in options.prompts:
    results["generation"].append(_generation(model, tokenizer, prompt, options, seq_len))
  results["seconds"] = time.time() - started
  results["output"] = write_results(results, output_dir or os.path.join(workdir, "eval"))
  return results


def write_results(results: dict, output_dir: str) -> str:
  """Writes `output_dir/step_<N>.json`, updating the sections of an existing file."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, f"step_{results['step']}.json")
  merged = {}
  if os.path.exists(path):
    with open(path) as f:
      merged = json.load(f)
  for key, value in results.items():
    if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "model":
      merged[key] = {**merged[key], **value}
    elif key != "output":
      merged[key] = value
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def format_table(results: dict) -> str:
  """A plain-text table of the headline numbers of `evaluate_workdir`'s results."""
  rows = [("what", "metric", "value")]
  for name, r in results.get("perplexity", {}).items():
    rows.append((f"ppl {os.path.basename(name)}", "perplexity", f"{r['perplexity']:.4g}"))
    if "bits_per_byte" in r:
      rows.append(("", "bits/byte", f"{r['bits_per_byte']:.4f}"))
    rows.append(("", "tokens", str(r["tokens"])))
  for name, r in results.get("multiple_choice", {}).items():
    rows.append((f"mc {name} (n={r['n']})", "acc", f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"))
    rows.append(("", "acc_norm", f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  for g in results.get("generation", []):
    lines.append(f"\nprompt: {g['prompt']!r}\n→ {g['text']!r}"
                 + (" [eos]" if g["stopped_at_eos"] else ""))
  return "\n".join(lines)
