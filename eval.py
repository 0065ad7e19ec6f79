"""Evaluate a trained (or imported) model: perplexity, bits per byte, multiple choice, samples.

  python eval.py --workdir=/tmp/tiny --ppl_split=val
  python eval.py --workdir=/tmp/tiny --ppl_file=notes.txt --ppl_file=docs.jsonl --text_field=text
  python eval.py --workdir=/tmp/tiny --mc_file=mmfree_jax/eval/samples/sample_mc.jsonl
  python eval.py --workdir=/tmp/tiny --prompt="In the beginning" --temperature=0.8 --top_k=40
  python eval.py --workdir=/tmp/tiny --step=400 --lm_eval_tasks=lambada_openai   # needs lm-eval
  python eval.py --packed=/tmp/tiny_2bit --prompt="In the beginning"   # python -m mmfree_jax.export

Uses the latest checkpoint (or --step) with the workdir's config.json, or with --config (same
architecture; e.g. another data split: --config=configs/tiny.py --config.data.seq_len=512).
Prints a table and writes WORKDIR/eval/step_<N>.json (updated by later runs of that step).
"""

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Optional config overriding the workdir's "
                                "config.json (same model architecture).", lock_config=True)
flags.DEFINE_string("workdir", None, "Training or import workdir (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("packed", None, "A packed directory (python -m mmfree_jax.export) to "
                    "evaluate instead of --workdir; results go to DIR/eval.")
flags.DEFINE_enum("ppl_split", "", ["", "val"], "Perplexity of the validation split.")
flags.DEFINE_multi_string("ppl_file", [], "Perplexity of a text file (one document per "
                          "paragraph) or .jsonl file (one per line); repeatable.")
flags.DEFINE_string("text_field", "text", "The .jsonl field holding the text.")
flags.DEFINE_integer("val_batches", 8, "Validation batches for --ppl_split=val.")
flags.DEFINE_multi_string("mc_file", [], "Multiple-choice JSONL ({context, choices, label} "
                          "per line); repeatable or comma-separated.")
flags.DEFINE_integer("mc_limit", 0, "At most this many items per --mc_file (0 = all).")
flags.DEFINE_multi_string("prompt", [], "Text to continue; repeatable.")
flags.DEFINE_integer("max_new_tokens", 64, "Generation length (stops earlier at EOS).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 16, "Rows per forward when scoring.")
flags.DEFINE_integer("chunk_len", 512, "MatMul-free: tokens per forward chunk (state carried).")
flags.DEFINE_list("lm_eval_tasks", [], "lm-eval-harness tasks to run through the adapter "
                  "(needs `pip install lm-eval`).")
flags.DEFINE_string("lm_eval_include_path", None, "Folder of extra lm-eval task YAMLs.")
flags.DEFINE_integer("lm_eval_limit", None, "lm-eval: at most this many documents per task.")
flags.mark_flags_as_mutual_exclusive(["workdir", "packed"], required=True)


def _split(values):
  return [v for value in values for v in value.split(",") if v]


def _options():
  from mmfree_jax.eval import EvalOptions  # import after flags: jax sees XLA_FLAGS
  from mmfree_jax.generate import SamplingConfig
  f = flags.FLAGS
  return EvalOptions(
      ppl_split=f.ppl_split, ppl_files=_split(f.ppl_file), text_field=f.text_field,
      val_batches=f.val_batches, mc_files=_split(f.mc_file), mc_limit=f.mc_limit,
      prompts=list(f.prompt), seed=f.seed, batch_size=f.batch_size, chunk_len=f.chunk_len,
      sampling=SamplingConfig(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                              top_k=f.top_k, top_p=f.top_p))


def _run_lm_eval() -> str:
  """Runs --lm_eval_tasks through the adapter; returns the JSON path."""
  from mmfree_jax import eval as evaluation
  from mmfree_jax.eval import lm_eval_adapter
  f = flags.FLAGS
  out = lm_eval_adapter.evaluate_tasks(
      f.workdir or f.packed, f.lm_eval_tasks, step=f.step, config=f.config,
      batch_size=f.batch_size, limit=f.lm_eval_limit, include_path=f.lm_eval_include_path,
      packed=f.packed is not None)
  print(json.dumps(out["lm_eval"], indent=2, default=str))
  return evaluation.write_results(out, os.path.join(f.workdir or f.packed, "eval"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr)
  for noisy in ("jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
  from mmfree_jax import eval as evaluation
  from mmfree_jax.checkpoint.manager import CheckpointError
  f = flags.FLAGS
  if f.packed is not None and f.step is not None:
    print("eval.py: error: --step picks a checkpoint of --workdir; a --packed directory holds "
          "the one step it was exported from", file=sys.stderr)
    sys.exit(1)
  try:
    options = _options()
    if not f.lm_eval_tasks or evaluation.has_work(options):
      results = evaluation.evaluate_workdir(f.workdir or f.packed, options, step=f.step,
                                            config=f.config, packed=f.packed is not None)
      print(evaluation.format_table(results))
      for note in results["notes"]:
        print("note:", note)
      print(f"results: {results['output']}")
    if f.lm_eval_tasks:
      print(f"results: {_run_lm_eval()}")
  except (FileNotFoundError, ValueError, CheckpointError, ImportError) as e:
    print(f"eval.py: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
