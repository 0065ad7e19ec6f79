"""Evaluation (imports models, data, checkpoints and the sampler; never `train/`).

  scoring.py          `score_continuations`: summed log-prob + greedy flag of continuations
  perplexity.py       perplexity / bits per byte of documents and validation batches
  multiple_choice.py  zero-shot multiple choice (acc, acc_norm)
  runner.py           what `eval.py` runs: options, workdir loading, result files, the table
  lm_eval_adapter.py  lm-eval-harness `LM` (optional dependency; import it explicitly)

The public names of the first four are re-exported here.
"""

from mmfree_jax.eval.multiple_choice import (
  MCExample,
  encode_pair,
  evaluate_multiple_choice,
  load_mc_jsonl,
  parse_mc_line,
)
from mmfree_jax.eval.perplexity import (
  perplexity_of_batches,
  perplexity_of_texts,
  rolling_requests,
  special_ids,
  summarize_nll,
)
from mmfree_jax.eval.runner import (
  EvalOptions,
  evaluate_workdir,
  format_table,
  has_work,
  load_for_eval,
  load_tokenizer_for,
  read_documents,
  scoring_note,
  write_results,
)
from mmfree_jax.eval.scoring import Scored, recurrent_scoring_model, score_continuations

__all__ = [
  "EvalOptions",
  "MCExample",
  "Scored",
  "encode_pair",
  "evaluate_multiple_choice",
  "evaluate_workdir",
  "format_table",
  "has_work",
  "load_for_eval",
  "load_mc_jsonl",
  "load_tokenizer_for",
  "parse_mc_line",
  "perplexity_of_batches",
  "perplexity_of_texts",
  "read_documents",
  "recurrent_scoring_model",
  "rolling_requests",
  "score_continuations",
  "scoring_note",
  "special_ids",
  "summarize_nll",
  "write_results",
]
