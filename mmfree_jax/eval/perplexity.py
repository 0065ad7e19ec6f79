"""Perplexity and bits per byte.

Documents follow lm-eval's `loglikelihood_rolling`: each document is predicted from a prefix
token (BOS, else EOS); the Transformer scores it in rolling windows of `max_len` tokens, the
MatMul-free LM in one pass with the state carried (full context).
Bits per byte = total NLL in bits / UTF-8 bytes of the scored text.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from mmfree_jax.data.tokenizer import prefix_token
from mmfree_jax.eval.scoring import Tokenizer, score_continuations, target_logprobs
from mmfree_jax.nn.model import check_token_ids
from mmfree_jax.numerics import loss as loss_lib
from mmfree_jax.parallel import sharding

log = logging.getLogger("mmfree_jax")


def rolling_requests(
  ids: Sequence[int], prefix_id: int, max_len: int | None
) -> list[tuple[list[int], list[int]]]:
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
    inputs = ids[end - max_len - 1 : end - 1]  # max_len tokens right before the last target
    out.append((inputs[: max_len - (n - 1)], ids[end - n : end]))  # drop the overlap
    predicted = end
  return out


def summarize_nll(nll_nats: float, tokens: int, num_bytes: int | None) -> dict:
  """`{nll_nats, tokens, bytes, loss, perplexity, bits_per_token, bits_per_byte}` (floats)."""
  loss = nll_nats / max(tokens, 1)
  out = {
    "nll_nats": nll_nats,
    "tokens": int(tokens),
    "loss": loss,
    "perplexity": loss_lib.perplexity(loss),
    "bits_per_token": loss / math.log(2),
  }
  if num_bytes is not None:
    out["bytes"] = int(num_bytes)
    out["bits_per_byte"] = nll_nats / math.log(2) / max(num_bytes, 1)
  return out


def perplexity_of_texts(
  model: nnx.Module,
  tokenizer: Tokenizer,
  texts: Iterable[str],
  *,
  max_len: int | None = None,
  batch_size: int = 8,
  chunk_len: int = 512,
) -> dict:
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
  scored = score_continuations(
    model, requests, batch_size=batch_size, max_len=max_len, chunk_len=chunk_len
  )
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


def perplexity_of_batches(
  model: nnx.Module, batches: Iterable[dict], tokenizer: Tokenizer | None = None
) -> dict:
  """Perplexity over packed windows, the training loss's definition (`steps.make_eval_step`).

  Args:
    batches: `{"tokens": int32 [B, seq+1], "segment_ids": int32 [B, seq+1]}` windows; inputs
      `tokens[:, :-1]`, targets `tokens[:, 1:]`, counted where `segment_ids[:, 1:] != 0`.
    tokenizer: to count bytes (bits per byte); None skips them.
  Returns:
    `summarize_nll` of all counted targets.
  """
  graphdef, params = nnx.split(model)
  params = sharding.place_params(params)
  nll, tokens, num_bytes = 0.0, 0, 0
  for batch in batches:
    tokens_np, segments_np = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    check_token_ids(tokens_np, model.cfg.vocab_size)
    inputs, input_segments, targets, mask = loss_lib.split_window(tokens_np, segments_np)
    segments = input_segments if model.cfg.reset_at_doc_start else None
    names = ("activation_batch", "activation_seq")
    inputs, targets = sharding.place(inputs, names), sharding.place(targets, names)
    segments = None if segments is None else sharding.place(segments, names)
    picked, _ = jax.device_get(
      target_logprobs(graphdef, params, inputs, targets, segments, layout=sharding.active())
    )
    nll -= float(np.sum(np.where(mask, picked, 0.0), dtype=np.float64))
    tokens += int(mask.sum())
    if tokenizer is not None:
      num_bytes += _target_bytes(tokenizer, targets, segments_np[:, 1:])
  if tokens == 0:
    raise ValueError("the validation batches hold no counted target token")
  return summarize_nll(nll, tokens, num_bytes if tokenizer is not None else None)
