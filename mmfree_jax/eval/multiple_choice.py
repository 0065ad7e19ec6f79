"""Zero-shot multiple choice (acc, acc_norm) on `{"context", "choices", "label"}` JSONL items;
each context is scored once per choice through `scoring.score_continuations`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Sequence

import numpy as np
from flax import nnx

from mmfree_jax import paths
from mmfree_jax.data.tokenizer import document_start, prefix_token
from mmfree_jax.eval.scoring import Tokenizer, score_continuations

log = logging.getLogger("mmfree_jax")


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
    raise ValueError(
      f"{where}: {msg}. Expected one JSON object per line: "
      '{"context": str, "choices": [str, ...], "label": int}'
    )

  try:
    item = json.loads(line)
  except json.JSONDecodeError as e:
    fail(f"invalid JSON ({e.msg} at column {e.colno})")
  except RecursionError:
    fail("invalid JSON (nested too deeply to parse)")
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
  """Reads a multiple-choice JSONL file, local or in a bucket (blank lines skipped)."""
  if not paths.isfile(path):
    raise FileNotFoundError(f"multiple-choice file {path!r} not found")
  with paths.open_file(path) as f:
    examples = [parse_mc_line(line, f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
  if not examples:
    raise ValueError(f"{path}: no examples (the file is empty)")
  return examples


def encode_pair(
  tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
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
  return document_start(tokenizer) + context_ids, whole[len(context_ids) :]


def _stderr(values: np.ndarray) -> float:
  """Standard error of the mean (lm-eval's `mean_stderr`: sample std / sqrt(n))."""
  n = len(values)
  return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def evaluate_multiple_choice(
  model: nnx.Module,
  tokenizer: Tokenizer,
  examples: Sequence[MCExample],
  *,
  batch_size: int = 16,
  max_len: int | None = None,
  delimiter: str = " ",
  chunk_len: int = 512,
) -> dict:
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
        raise ValueError(
          f"{ex.where}: choice {choice!r} (or its context) tokenizes to no "
          "tokens; give each choice some text"
        )
      requests.append((context_ids, choice_ids))
  scored = score_continuations(
    model, requests, batch_size=batch_size, max_len=max_len, chunk_len=chunk_len
  )
  correct, correct_norm, preds, preds_norm, k = [], [], [], [], 0
  for ex in examples:
    lls = np.array([s.logprob for s in scored[k : k + len(ex.choices)]])
    k += len(ex.choices)
    lengths = np.array([len(c.encode("utf-8")) for c in ex.choices], np.float64)
    preds.append(int(np.argmax(lls)))
    preds_norm.append(int(np.argmax(lls / lengths)))
    correct.append(preds[-1] == ex.label)
    correct_norm.append(preds_norm[-1] == ex.label)
  correct, correct_norm = np.array(correct, float), np.array(correct_norm, float)
  return {
    "n": len(examples),
    "acc": float(correct.mean()),
    "acc_stderr": _stderr(correct),
    "acc_norm": float(correct_norm.mean()),
    "acc_norm_stderr": _stderr(correct_norm),
    "predictions": preds,
    "predictions_norm": preds_norm,
  }
