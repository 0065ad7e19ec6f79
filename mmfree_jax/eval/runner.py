"""A workdir's evaluation, what `eval.py` runs: load a checkpoint, run the requested
perplexity / multiple-choice / generation jobs, write `WORKDIR/eval/step_<N>.json`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any, Sequence

from flax import nnx

from mmfree_jax import config as config_lib
from mmfree_jax import data as data_lib
from mmfree_jax import generate as generate_lib
from mmfree_jax import paths
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint.manager import check_compatible
from mmfree_jax.data import sources
from mmfree_jax.data.cache import default_cache_dir
from mmfree_jax.eval.multiple_choice import MCExample, evaluate_multiple_choice, load_mc_jsonl
from mmfree_jax.eval.perplexity import perplexity_of_batches, perplexity_of_texts
from mmfree_jax.eval.scoring import Tokenizer
from mmfree_jax.nn.model import abstract_model, count_params
from mmfree_jax.nn.packed import DEFAULT_METHOD
from mmfree_jax.parallel import sharding

log = logging.getLogger("mmfree_jax")


@dataclasses.dataclass
class EvalOptions:
  """What to evaluate. Empty fields are skipped.

  ppl_split: "val" scores `val_batches` validation batches of the workdir's data config
    (for `data.source=array_record`: the prepared folders' held-out shards).
  ppl_files: text files (one document per paragraph, as `data.source=text`) or `.jsonl`
    files (one document per line, field `text_field`).
  mc_files: multiple-choice JSONL files (`{"context", "choices", "label"}` per line).
  mc_limit: score at most this many items per file (0 = all).
  mc_delimiter: put between the context and each choice (lm-eval's `target_delimiter`,
    default " "); "" for choices that carry their own leading space.
  prompts: texts to continue with `sampling` (its eos_id defaults to the tokenizer's).
  stream_to: a text stream (e.g. sys.stdout) the generated text is written to as it is
    produced; None = no streaming.
  """

  ppl_split: str = ""
  ppl_files: Sequence[str] = ()
  text_field: str = "text"
  val_batches: int = 8
  mc_files: Sequence[str] = ()
  mc_limit: int = 0
  mc_delimiter: str = " "
  prompts: Sequence[str] = ()
  sampling: Any = None  # generate.SamplingConfig
  seed: int = 0
  batch_size: int = 16
  chunk_len: int = 512
  stream_to: Any = None


def read_documents(path: str, text_field: str = "text") -> list[str]:
  """Documents of a `.jsonl` file (field text_field) or a text file (paragraphs); local or in
  a bucket."""

  if not paths.isfile(path):
    raise FileNotFoundError(f"perplexity file {path!r} not found")
  is_jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
  docs = sources.jsonl_documents(path, text_field) if is_jsonl else sources.text_documents(path)
  docs = [d for d in docs if d]
  if not docs:
    raise ValueError(f"perplexity file {path!r} holds no text")
  return docs


def has_work(options: EvalOptions) -> bool:
  return bool(options.ppl_split or options.ppl_files or options.mc_files or options.prompts)


def _check_options(options: EvalOptions) -> dict[str, list[MCExample]]:
  """Fails on bad options or files before any model is loaded; returns the parsed MC files."""
  if options.ppl_split not in ("", "val"):
    raise ValueError(
      f"unknown ppl split {options.ppl_split!r}; use 'val' (or a file with --ppl_file)"
    )
  if options.batch_size < 1 or options.chunk_len < 1 or options.val_batches < 1:
    raise ValueError("batch_size, chunk_len and val_batches must be >= 1")
  if options.mc_limit < 0:
    raise ValueError(
      f"mc_limit={options.mc_limit} must be >= 0 (0 = every item); pass "
      "--mc_limit=0 or a positive count"
    )
  for path in options.ppl_files:
    if not paths.isfile(path):
      raise FileNotFoundError(f"perplexity file {path!r} not found")
  if any(not p for p in options.prompts):
    raise ValueError(
      "empty prompt: generation needs some text to continue; pass --prompt "
      "with at least one character"
    )
  if options.prompts and options.sampling is not None:
    options.sampling.validate()
  mc = {}
  for path in options.mc_files:
    examples = load_mc_jsonl(path)
    mc[path] = examples[: options.mc_limit] if options.mc_limit > 0 else examples
  if not has_work(options):
    raise ValueError("nothing to evaluate: pass --ppl_split=val, --ppl_file, --mc_file or --prompt")
  return mc


def load_for_eval(workdir: str, step: int | None = None, config=None):
  """`(model, config, step)`: the workdir's checkpoint with its own config, or with `config`
  (same architecture; other data/inference settings)."""
  if config is None:
    return loading.load_model(workdir, step)
  model_cfg = config_lib.ModelConfig.from_config(config.model)
  params, step = loading.load_params(workdir, model_cfg, step)
  graphdef, _ = nnx.split(abstract_model(model_cfg))
  return nnx.merge(graphdef, params), config, step


def load_packed_for_eval(directory: str, config=None, method: str = DEFAULT_METHOD):
  """`(PackedLM, config, step)` from a packed directory (`python -m mmfree_jax.export`); its
  stored config, or `config` for the data/inference settings (same architecture). `method`:
  the ternary product (`nn.packed`; 'lut' holds base-3 codes at 1.6 bits, slower)."""
  from mmfree_jax.export import reader  # pylint: disable=g-import-not-at-top

  model, stored, manifest = reader.load_packed(directory, method=method)
  if config is not None:
    check_compatible({"model": stored.model.to_dict()}, config.model.to_dict(), directory)
  return model, config or stored, manifest["step"]


def load_tokenizer_for(cfg, model_cfg) -> Tokenizer:
  """The tokenizer of a config's `data` section, checked against the model's vocabulary."""
  if not cfg.data.tokenizer:
    raise ValueError(
      "this workdir records no tokenizer (its HF import folder had none): pass "
      "--tokenizer=spm:<tokenizer.model>|hf:<tokenizer.json>|byte|spm:mistral"
    )
  tokenizer = data_lib.tokenizer_from_config(cfg.data, cache_dir=default_cache_dir())
  data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  return tokenizer


def _mc_name(path: str, taken: dict) -> str:
  name = paths.basename(path)
  name = name[: name.rindex(".")] if name.rfind(".") > 0 else name  # the file name's stem
  return name if name not in taken else path


def scoring_note(model_cfg, seq_len: int) -> str:
  """How this model's documents and choices are scored (printed and saved with results)."""
  if model_cfg.kind == "mmfree":
    return (
      "MatMul-free LM: no context limit; documents and contexts are scored with their "
      "full context (recurrent state carried across chunks), each multiple-choice "
      "context is prefilled once and its state reused for every choice"
    )
  return (
    f"Transformer++: at most data.seq_len={seq_len} input tokens per forward (rolling "
    "windows for documents, oldest context tokens dropped otherwise); multiple-choice "
    "context + choice recomputed for each choice (no KV-cache reuse)"
  )


def _model_summary(model, seq_len: int, tokenizer) -> dict:
  cfg = model.cfg
  out = {
    "kind": cfg.kind,
    "params": count_params(abstract_model(cfg)),
    "d_model": cfg.d_model,
    "num_layers": cfg.num_layers,
    "vocab_size": cfg.vocab_size,
    "seq_len": seq_len,
    "tokenizer": getattr(tokenizer, "spec", type(tokenizer).__name__),
  }
  if getattr(model, "fmt", None) is not None:  # a PackedLM
    out["packed_format"] = model.fmt
    out["packed_method"] = model.method
  return out


def _validation_perplexity(model, cfg, tokenizer, options: EvalOptions) -> dict:
  batches = data_lib.validation_batches(
    cfg.data,
    tokenizer,
    batch_size=options.batch_size,
    num_batches=options.val_batches,
    cache_dir=default_cache_dir(),
  )
  return perplexity_of_batches(model, batches, tokenizer)


def _generation(model, tokenizer, prompt: str, options: EvalOptions, seq_len: int) -> dict:
  sampling = options.sampling or generate_lib.SamplingConfig()
  if sampling.eos_id is None:
    sampling = sampling._replace(eos_id=tokenizer.eos_id)
  on_text = None
  if options.stream_to is not None:
    options.stream_to.write(f"prompt: {prompt!r}\n→ ")
    options.stream_to.flush()

    def on_text(piece):
      options.stream_to.write(piece)
      options.stream_to.flush()

  g = generate_lib.generate_text(
    model, tokenizer, prompt, sampling, seed=options.seed, context_limit=seq_len, on_text=on_text
  )
  if options.stream_to is not None:
    options.stream_to.write("\n")
  return {
    "prompt": prompt,
    "text": g.text,
    "prompt_tokens": g.prompt_tokens,
    "new_tokens": len(g.new_tokens),
    "token_ids": list(g.new_tokens),
    "stopped_at_eos": g.stopped_at_eos,
    "notes": g.notes,
    "sampling": dict(sampling._asdict(), seed=options.seed),
  }


def evaluate_workdir(
  workdir: str,
  options: EvalOptions,
  *,
  step: int | None = None,
  config=None,
  tokenizer: Tokenizer | None = None,
  output_dir: str | None = None,
  packed: bool = False,
  packed_method: str = DEFAULT_METHOD,
  write: bool = True,
  mesh=None,
) -> dict:
  """Loads a checkpoint, runs `options`, writes and returns the results.

  Args:
    workdir: a training or import workdir (config.json + checkpoints/), or with `packed` a
      packed directory (`python -m mmfree_jax.export`; `step` is then the exported one),
      loaded for the `packed_method` product.
    step: checkpoint step (None = latest).
    config: a full config overriding the workdir's (architecture must match).
    tokenizer: None = `data.tokenizer_from_config(config.data)`.
    output_dir: where `step_<N>.json` goes (default `WORKDIR/eval`); an existing file of that
      step is updated (sections not run now are kept).
    write: False leaves the writing to the caller (`write_results`; eval.py shows the
      results first, so a read-only workdir loses nothing).
    mesh: a `jax.sharding.Mesh` (`parallel.mesh.make_mesh(cfg.mesh.shape)`; eval.py's
      `--config.mesh.shape.*`) to run on, under the config's `mesh.axis_rules`: the params
      split as in training, each forward's tokens over the batch axes and the sequence over
      the context axis (long documents, contexts and prompts prefilled split); None = one
      device. Not for a packed model.
  Returns:
    `{"step", "workdir", "model", "perplexity": {name: ...}, "multiple_choice": {name: ...},
    "generation": [...], "notes": [...], "seconds", "output": path}`.
  """
  started = time.time()
  mc_examples = _check_options(options)  # bad options and files fail before loading
  if packed and mesh is not None:
    raise ValueError(
      "a packed model runs on one device: drop the --config.mesh.shape overrides, or "
      "evaluate the training --workdir on the mesh"
    )
  if packed:
    model, cfg, step = load_packed_for_eval(workdir, config, packed_method)
  else:
    model, cfg, step = load_for_eval(workdir, step, config)
  tokenizer = tokenizer or load_tokenizer_for(cfg, model.cfg)
  seq_len = int(cfg.data.seq_len)
  results: dict[str, Any] = {
    "step": step,
    "workdir": paths.absolute(workdir),
    "model": _model_summary(model, seq_len, tokenizer),
    "perplexity": {},
    "multiple_choice": {},
    "generation": [],
    "notes": [scoring_note(model.cfg, seq_len)],
  }
  layout = None if mesh is None else (mesh, sharding.normalize_rules(cfg.mesh.axis_rules))
  with sharding.within(layout):
    _run(results, model, cfg, tokenizer, options, mc_examples)
  results["seconds"] = time.time() - started
  results["output"] = (
    write_results(results, output_dir or paths.join(workdir, "eval")) if write else None
  )
  return results


def _run(results: dict, model, cfg, tokenizer, options: EvalOptions, mc_examples) -> None:
  """Fills `results`' perplexity, multiple-choice and generation sections."""
  seq_len = int(cfg.data.seq_len)
  max_len = seq_len if model.cfg.kind == "transformer" else None
  common = dict(batch_size=options.batch_size, chunk_len=options.chunk_len)
  if options.ppl_split == "val":
    results["perplexity"]["val"] = _validation_perplexity(model, cfg, tokenizer, options)
  for path in options.ppl_files:
    out = perplexity_of_texts(
      model, tokenizer, read_documents(path, options.text_field), max_len=max_len, **common
    )
    results["perplexity"][path] = dict(out, file=paths.absolute(path))
  for path, examples in mc_examples.items():
    out = evaluate_multiple_choice(
      model, tokenizer, examples, max_len=max_len, delimiter=options.mc_delimiter, **common
    )
    results["multiple_choice"][_mc_name(path, results["multiple_choice"])] = dict(
      out, file=paths.absolute(path)
    )
  for prompt in options.prompts:
    results["generation"].append(_generation(model, tokenizer, prompt, options, seq_len))


def write_results(results: dict, output_dir: str) -> str:
  """Writes `output_dir/step_<N>.json` (local or in a bucket), updating the sections of an
  existing file; the file is replaced whole (`paths.write_atomic`), never seen half-written."""
  paths.makedirs(output_dir)
  path = paths.join(output_dir, f"step_{results['step']}.json")
  merged = {}
  if paths.exists(path):
    merged = json.loads(paths.read_text(path))
  for key, value in results.items():
    if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "model":
      merged[key] = {**merged[key], **value}
    elif key != "output":
      merged[key] = value
  text = json.dumps(_finite_or_null(merged), indent=2, sort_keys=True, allow_nan=False)
  paths.write_atomic(path, text)
  return path


def _finite_or_null(value):
  """The results with NaN / Infinity (not JSON: strict readers refuse them) as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  return value


def format_table(results: dict, *, generation: bool = True) -> str:
  """A plain-text table of the headline numbers of `evaluate_workdir`'s results ('' when there
  are none), then the generated text unless `generation` is False (it was streamed)."""
  rows = [("what", "metric", "value")]
  for name, r in results.get("perplexity", {}).items():
    rows.append((f"ppl {paths.basename(name)}", "perplexity", f"{r['perplexity']:.4g}"))
    if "bits_per_byte" in r:
      rows.append(("", "bits/byte", f"{r['bits_per_byte']:.4f}"))
    rows.append(("", "tokens", str(r["tokens"])))
  for name, r in results.get("multiple_choice", {}).items():
    rows.append((f"mc {name} (n={r['n']})", "acc", f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"))
    rows.append(("", "acc_norm", f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"))
  lines = []
  if len(rows) > 1:  # no header over an empty table (a --prompt-only run)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
  for g in results.get("generation", []) if generation else []:
    lines.append(
      f"\nprompt: {g['prompt']!r}\n→ {g['text']!r}" + (" [eos]" if g["stopped_at_eos"] else "")
    )
  return "\n".join(lines).lstrip("\n")
