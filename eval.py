"""Evaluate a trained (or imported) model: perplexity, bits per byte, multiple choice, samples.

  python eval.py --workdir=/tmp/tiny --ppl_split=val
  python eval.py --workdir=/tmp/tiny --ppl_file=notes.txt --ppl_file=docs.jsonl --text_field=text
  python eval.py --workdir=/tmp/tiny --mc_file=mmfree_jax/eval/samples/sample_mc.jsonl
  python eval.py --workdir=/tmp/tiny --prompt="In the beginning" --temperature=0.8 --top_k=40
  python eval.py --workdir=/tmp/tiny --step=400 --lm_eval_tasks=lambada_openai   # needs lm-eval
  python eval.py --packed=/tmp/tiny_2bit --prompt="In the beginning"   # python -m mmfree_jax.export

Uses the latest checkpoint (or --step) with the workdir's config.json, or with --config (same
architecture; e.g. another data split: --config=configs/tiny.py --config.data.seq_len=512).
Prints a table, then writes WORKDIR/eval/step_<N>.json (or --output_dir; updated by later runs
of that step; a failed write is a warning after the results). Generated text is streamed as it
is produced. A float64 workdir runs with x64 enabled.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mmfree_jax import cli_logging, paths, registry

if __name__ == "__main__":  # an unknown --config.x key: one line, not ml_collections' ~70
  from mmfree_jax.config import check_override_keys  # pylint: disable=g-import-not-at-top

  try:
    check_override_keys(sys.argv[1:])
  except ValueError as e:
    print(f"eval.py: error: {e}", file=sys.stderr)
    sys.exit(2)

config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "base.py"),
  "Optional config overriding the workdir's config.json (same model architecture). Without "
  "it, --config.a.b=v overrides apply to the workdir's config. --config.mesh.shape.context=N "
  "(and the other mesh.shape axes) runs on that device mesh: long documents, contexts and "
  "prompts split over N devices, the params split as in training.",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Training or import workdir (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string(
  "packed",
  None,
  "A packed directory (python -m mmfree_jax.export) to "
  "evaluate instead of --workdir; results go to DIR/eval.",
)
flags.DEFINE_enum(
  "packed_method",
  registry.DEFAULT_MATVEC_METHOD,
  registry.MATVEC_METHODS,
  "With --packed: the ternary product. popcount (fastest on CPU) holds the codes "
  "as bit planes, 2 bits/weight; lut keeps base-3 files at 1.6 bits in memory.",
)
flags.DEFINE_enum("ppl_split", "", ["", "val"], "Perplexity of the validation split.")
flags.DEFINE_multi_string(
  "ppl_file",
  [],
  "Perplexity of a text file (one document per "
  "paragraph) or .jsonl file (one per line); repeatable.",
)
flags.DEFINE_string("text_field", "text", "The .jsonl field holding the text.")
flags.DEFINE_integer("val_batches", 8, "Validation batches for --ppl_split=val.")
flags.DEFINE_multi_string(
  "mc_file",
  [],
  "Multiple-choice JSONL ({context, choices, label} per line); repeatable or comma-separated.",
)
flags.DEFINE_integer("mc_limit", 0, "At most this many items per --mc_file (0 = all).")
flags.DEFINE_multi_string("prompt", [], "Text to continue; repeatable.")
flags.DEFINE_integer("max_new_tokens", 64, "Generation length (stops earlier at EOS).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 16, "Rows per forward when scoring.")
flags.DEFINE_integer("chunk_len", 512, "MatMul-free: tokens per forward chunk (state carried).")
flags.DEFINE_list(
  "lm_eval_tasks",
  [],
  "lm-eval-harness tasks to run through the adapter (needs `pip install lm-eval`).",
)
flags.DEFINE_string("lm_eval_include_path", None, "Folder of extra lm-eval task YAMLs.")
flags.DEFINE_integer("lm_eval_limit", None, "lm-eval: at most this many documents per task.")
flags.DEFINE_string("output_dir", None, "Where step_<N>.json goes (default WORKDIR/eval).")
flags.DEFINE_string(
  "tokenizer",
  None,
  "Tokenizer spec overriding the workdir's data.tokenizer "
  "(byte | bpe:<n> | hf:<tokenizer.json> | spm:<model> | spm:mistral), e.g. "
  "for an HF import that had no tokenizer file.",
)
flags.DEFINE_string(
  "mc_delimiter",
  " ",
  "Put between a multiple-choice context and each "
  "choice (lm-eval's target_delimiter, default one space); --mc_delimiter= "
  "for choices that start with their own space.",
)
flags.DEFINE_bool("stream", True, "Print generated text as it is produced.")
flags.mark_flags_as_mutual_exclusive(["workdir", "packed"], required=True)


def _split(values):
  return [v for value in values for v in value.split(",") if v]


def _options():
  from mmfree_jax.eval import EvalOptions  # import after flags: jax sees XLA_FLAGS
  from mmfree_jax.generate import SamplingConfig

  f = flags.FLAGS
  return EvalOptions(
    ppl_split=f.ppl_split,
    ppl_files=_split(f.ppl_file),
    text_field=f.text_field,
    val_batches=f.val_batches,
    mc_files=_split(f.mc_file),
    mc_limit=f.mc_limit,
    mc_delimiter=f.mc_delimiter,
    stream_to=sys.stdout if f.stream else None,
    prompts=list(f.prompt),
    seed=f.seed,
    batch_size=f.batch_size,
    chunk_len=f.chunk_len,
    sampling=SamplingConfig(
      max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p
    ),
  )


def _run_lm_eval() -> str:
  """Runs --lm_eval_tasks through the adapter; returns the JSON path."""
  from mmfree_jax.eval import lm_eval_adapter

  f = flags.FLAGS
  out = lm_eval_adapter.evaluate_tasks(
    f.workdir or f.packed,
    f.lm_eval_tasks,
    step=f.step,
    config=_given_config(),
    batch_size=f.batch_size,
    limit=f.lm_eval_limit,
    include_path=f.lm_eval_include_path,
    packed=f.packed is not None,
    packed_method=f.packed_method,
  )
  print(json.dumps(out["lm_eval"], indent=2, default=str))
  return _write(out)


def _output_dir() -> str:
  f = flags.FLAGS
  return f.output_dir or paths.join(f.workdir or f.packed, "eval")


def _write(results: dict) -> str | None:
  """Writes the results file; a failure (read-only workdir, full disk) is a warning, since the
  results are already on screen."""
  from mmfree_jax import eval as evaluation  # pylint: disable=g-import-not-at-top

  try:
    return evaluation.write_results(results, _output_dir())
  except OSError as e:
    print(
      f"eval.py: warning: could not write the results to {_output_dir()} ({e}); they are "
      "printed above. Pass --output_dir=<a writable folder> to keep them",
      file=sys.stderr,
    )
    return None


def _given_config():
  """--config when given (the default file only parses overrides), else None."""
  return flags.FLAGS.config if flags.FLAGS["config"].present else None


def _overrides() -> dict:
  """The `--config.a.b=v` overrides, `{"a.b": v}`."""
  return dict(flags.FLAGS["config"].override_values)


def _mesh_requested() -> bool:
  return any(key.startswith("mesh.") for key in _overrides())


def _config():
  """The config to evaluate with: --config or the workdir's (with the --config.* overrides),
  with --tokenizer applied; enables x64 when its dtypes are float64 (else JAX would silently
  compute in float32)."""
  import jax  # pylint: disable=g-import-not-at-top

  from mmfree_jax.checkpoint import loading  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  cfg = _given_config()
  if (
    cfg is None
    and f.workdir is not None
    and (f.tokenizer or paths.exists(paths.join(f.workdir, "config.json")))
  ):
    cfg = loading.load_workdir_config(f.workdir)
    if _overrides():
      with cfg.unlocked():
        cfg.update_from_flattened_dict(_overrides())
  if cfg is None:
    return None
  if f.tokenizer:
    with cfg.unlocked():
      cfg.data.tokenizer = f.tokenizer
  if "float64" in (cfg.model.param_dtype, cfg.model.dtype) and not jax.config.jax_enable_x64:
    jax.config.update("jax_enable_x64", True)
    print("note: float64 model: x64 enabled")
  return cfg


def _missing_local_input() -> str | None:
  """The first --ppl_file / --mc_file / --lm_eval_include_path on this disk that is not there,
  as eval.runner and eval.multiple_choice would say it after loading the model."""
  f = flags.FLAGS
  for what, values in (("perplexity", f.ppl_file), ("multiple-choice", f.mc_file)):
    for path in _split(values):
      if not paths.is_remote(path) and not paths.isfile(path):
        return f"{what} file {path!r} not found"
  folder = f.lm_eval_include_path
  if folder and not paths.is_remote(folder) and not paths.isdir(folder):
    return f"--lm_eval_include_path={folder} is not a folder; pass the folder of your task YAMLs"
  return None


def _unreachable(e: OSError) -> str:
  """An OSError other than a missing file (a bucket's refusal, no network) as one line."""
  f = flags.FLAGS
  reason = " ".join(str(e).split()) or type(e).__name__
  return (
    f"reading {f.workdir or f.packed} failed: {reason}; check the path and, for a bucket, "
    "that it exists and your credentials may use it"
  )


def _mesh(cfg):
  """The device mesh of `cfg.mesh` when --config.mesh.* is given, else None (one device)."""
  if not _mesh_requested():
    return None
  from mmfree_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  mesh = mesh_lib.make_mesh(cfg.mesh.shape, dcn_cfg=cfg.mesh.dcn)
  print(f"mesh: {dict(mesh.shape)}")
  return mesh


def _check_before_jax() -> None:
  """Errors the flags alone show, before jax imports (10-50 s on a loaded machine)."""
  try:
    error = _flags_error()
  except FileNotFoundError as e:
    error = str(e)
  except OSError as e:
    error = _unreachable(e)
  if error:
    print(f"eval.py: error: {error}", file=sys.stderr)
    sys.exit(1)


def _flags_error() -> str | None:
  f = flags.FLAGS
  error = None
  if not (f.ppl_split or _split(f.ppl_file) or _split(f.mc_file) or f.prompt or f.lm_eval_tasks):
    error = "nothing to evaluate: pass --ppl_split=val, --ppl_file, --mc_file or --prompt"
  elif not paths.is_remote(f.workdir or f.packed) and not paths.isdir(f.workdir or f.packed):
    name = "workdir" if f.workdir else "packed"
    error = (
      f"--{name}={f.workdir or f.packed} does not exist; pass the folder of a training run, "
      "an HF import (python -m mmfree_jax.hf import) or an export (python -m mmfree_jax.export)"
    )
  elif (
    f.workdir and _given_config() is None and not paths.exists(paths.join(f.workdir, "config.json"))
  ):
    error = (  # as checkpoint.loading.load_workdir_config says it
      f"{paths.join(f.workdir, 'config.json')} not found: {f.workdir!r} is not a training or "
      "import workdir (train.py and `python -m mmfree_jax.hf import` write it)"
    )
  elif _mesh_requested() and (f.packed or f.lm_eval_tasks):
    error = (
      "--config.mesh.shape runs a --workdir checkpoint on a device mesh; --packed and "
      "--lm_eval_tasks run on one device: drop the mesh overrides for them"
    )
  else:
    error = _missing_local_input()
  return error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  cli_logging.setup(cli_logging.absl_verbosity())
  f = flags.FLAGS
  if f.packed is not None and f.step is not None:
    print(
      "eval.py: error: --step picks a checkpoint of --workdir; a --packed directory holds "
      "the one step it was exported from",
      file=sys.stderr,
    )
    sys.exit(1)
  if f.packed is None and f["packed_method"].present:
    print(
      "eval.py: error: --packed_method applies to a --packed directory; a --workdir "
      "checkpoint runs its latent weights",
      file=sys.stderr,
    )
    sys.exit(1)
  _check_before_jax()
  from mmfree_jax import eval as evaluation
  from mmfree_jax.checkpoint.manager import CheckpointError

  try:
    options = _options()
    if not f.lm_eval_tasks or evaluation.has_work(options):
      config = _config()
      results = evaluation.evaluate_workdir(
        f.workdir or f.packed,
        options,
        step=f.step,
        config=config,
        packed=f.packed is not None,
        packed_method=f.packed_method,
        write=False,
        mesh=_mesh(config),
      )
      table = evaluation.format_table(results, generation=not f.stream)  # streamed: printed
      if table:
        print(table, flush=True)
      for note in results["notes"]:
        print("note:", note)
      path = _write(results)
      if path:
        print(f"results: {path}")
    if f.lm_eval_tasks:
      path = _run_lm_eval()
      if path:
        print(f"results: {path}")
  except (FileNotFoundError, ValueError, CheckpointError, ImportError) as e:
    print(f"eval.py: error: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    print(f"eval.py: error: {_unreachable(e)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  try:
    app.run(main)
  except SystemExit as exit_:  # absl exits 1 after printing --help: asking for help succeeded
    if exit_.code == 1 and any(
      a in ("--help", "-h", "--helpfull", "--helpshort") for a in sys.argv[1:]
    ):
      sys.exit(0)
    raise
