"""Tokenize a corpus once into ArrayRecord shards: `python -m mmfree_jax.data.prepare`.

  python -m mmfree_jax.data.prepare --inputs 'data/*.parquet' --format parquet \\
      --text_field text --tokenizer spm:mistral --out /data/web --num_proc 16 --val_shards 2

Reads Parquet, JSONL (`.gz`, `.zst`), text or `datasets.save_to_disk` folders (`formats.py`),
tokenizes in `--num_proc` processes, and writes `DIR/shard-NNNNN.array_record` plus
`DIR/manifest.json`; training reads DIR with `data.source=array_record` (`prepared.py`).
`--inputs` and `--out` may be local or in a bucket (`gs://…`, `s3://…`): inputs are streamed,
and each shard is staged on local disk and uploaded when committed (`shards.py`).

What a shard holds. Each shard is a contiguous piece of the corpus token stream: its documents
in input order, each `[bos] + ids + [eos]` (`Tokenizer.encode_document`), concatenated, and cut
into records of exactly `--record_tokens` tokens (the last record of a shard shorter), stored
as little-endian uint16 (vocab <= 65536) or int32 bytes, ArrayRecord `group_size:1`,
zstd-compressed per record (`--compression none` to store them raw).
Fixed-size records rather than one document per record, because the training pipeline packs
by concatenate-then-split: a window of `seq_len + 1` tokens is a slice of the split's token
stream, its segment ids and the model's document resets come from the EOS tokens inside it
(`sequence_packing.py`). With fixed records a window's records follow from arithmetic (no
per-document index), any window touches at most `ceil(seq_len / record_tokens) + 1` records
whatever the document lengths (a book-long document is not one huge record, and 20-token
documents are not 100 reads per window), and `seq_len` stays free at training time (not fixed
windows written for one seq_len). Documents never straddle shards, so held-out validation
shards hold whole documents.

Deterministic and restartable. Shards are cut from the token stream alone (a shard closes
after the document that brings it to `--shard_tokens`), so the output is byte-identical
whatever `--num_proc`: processes only tokenize chunks of documents, and the results are
written in input order. Each shard is written to `*.tmp`, renamed, then its sidecar
`shard-NNNNN.json` (counts, sha256, the input position where it ends) is written atomically:
the sidecar is the commit. Rerunning the same command keeps every committed shard whose
checksum verifies, deletes anything after it and resumes reading at the recorded input
position. `manifest.json` is the folder's publish marker (`paths.publish_marker`), written
last, after every shard and sidecar (on a bucket, after their uploads completed); training
refuses a folder without it.

Held-out validation: `--val_shards N` (or `--val_fraction F` of the shards) marks N shards
spread evenly over the corpus as validation in the manifest (default one, so that `train.py`'s
defaults find validation data; a corpus that fits one shard is cut in two, `cutting.py`);
rerunning with another value only rewrites the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time

from mmfree_jax import cli_logging
from mmfree_jax import paths as paths_lib
from mmfree_jax.data import cutting, formats, untrusted
from mmfree_jax.data import shards as shards_lib
from mmfree_jax.data import tokenizer as tok_lib
from mmfree_jax.data.cache import default_cache_dir
from mmfree_jax.data.prepare_encode import input_chunks, input_texts, tokenized

log = logging.getLogger(__name__)

FORMAT_VERSION = shards_lib.FORMAT_VERSION
MANIFEST = shards_lib.MANIFEST
PLAN = "plan.json"
# group_size 1: one record per random read. zstd level 1: spm:mistral ids of the KJV took 1.1
# bytes/token (vs 2.0 raw uint16) at ~2x the read time of an uncompressed record (~130 vs
# ~60 us under load), far below what the loader needs (bench_data); `--compression none` skips it.
COMPRESSION = {"zstd": "group_size:1,zstd:1", "none": "group_size:1,uncompressed"}
_TOKENIZER_FILES = {"hf": "tokenizer.json", "bpe": "tokenizer.json", "spm": "tokenizer.model"}


@dataclasses.dataclass
class PrepareOptions:
  """What `prepare` reads and writes (the CLI flags of the same names)."""

  inputs: str
  format: str
  tokenizer: str
  out: str
  text_field: str = "text"
  num_proc: int = 1
  shard_tokens: int = 100_000_000
  record_tokens: int = 4096
  val_shards: int | None = None  # None: one when the corpus made two shards or more
  val_fraction: float = 0.0
  hf_split: str = "train"
  compression: str = "zstd"
  cache_dir: str | None = None

  def validate(self) -> None:
    if not isinstance(self.num_proc, int) or self.num_proc < 1:
      raise ValueError(f"--num_proc={self.num_proc} must be a positive int")
    if self.record_tokens < 1:
      raise ValueError(f"--record_tokens={self.record_tokens} must be >= 1")
    if self.shard_tokens < self.record_tokens:
      raise ValueError(
        f"--shard_tokens={self.shard_tokens} must be >= --record_tokens={self.record_tokens}"
      )
    if self.val_shards is not None and self.val_shards < 0:
      raise ValueError(f"--val_shards={self.val_shards} must be >= 0")
    if not 0.0 <= self.val_fraction < 1.0:
      raise ValueError(f"--val_fraction={self.val_fraction} must be in [0, 1)")
    if self.compression not in COMPRESSION:
      raise ValueError(f"--compression={self.compression!r}; choose one of {sorted(COMPRESSION)}")
    if self.val_shards and self.val_fraction:
      raise ValueError("pass --val_shards or --val_fraction, not both")


# ---------------------------------------------------------------------------- tokenizer


def load_prepare_tokenizer(opts: PrepareOptions, paths: list[str], out: str):
  """(tokenizer, its file or None for `byte`), loaded from that file as training will.

  A `bpe:<vocab>` spec is trained on the inputs once (cached in the cache dir), or read back
  from `out/tokenizer.json` where an interrupted run of this prepare stored it.
  """
  spec = opts.tokenizer
  kind, _, arg = spec.partition(":")
  cache_dir = opts.cache_dir or default_cache_dir()
  if kind == "bpe":
    source = paths_lib.join(out, "tokenizer.json")
    if not paths_lib.isfile(source):
      corpus_id = hashlib.sha256(
        json.dumps(
          [
            "prepare",
            opts.format,
            opts.text_field,
            opts.hf_split,
            [formats.input_identity(p) for p in paths],
          ]
        ).encode()
      ).hexdigest()
      source = tok_lib.bpe_cache_path(cache_dir, int(arg), corpus_id) if arg.isdigit() else ""
      if not paths_lib.isfile(source):  # train it once (load_tokenizer also rejects a bad spec)
        tok_lib.load_tokenizer(
          spec,
          corpus_texts=lambda: input_texts(paths, opts),
          corpus_id=corpus_id,
          cache_dir=cache_dir,
        )
        source = tok_lib.bpe_cache_path(cache_dir, int(arg), corpus_id)
  else:
    source = tok_lib.tokenizer_file(spec)
    if source is None:  # byte: no file
      return tok_lib.load_tokenizer(spec, cache_dir=cache_dir), None
  file_kind = "hf" if source.endswith(".json") else "spm"
  return tok_lib.load_tokenizer(f"{file_kind}:{source}", cache_dir=cache_dir), source


def store_tokenizer(source: str | None, out: str, spec: str) -> str:
  """Copies the tokenizer file into `out`; returns the spec that loads the copy."""
  if source is None:
    return spec
  local = paths_lib.join(out, _TOKENIZER_FILES[spec.partition(":")[0]])
  if paths_lib.absolute(source) != local:
    paths_lib.write_atomic(local, paths_lib.read_bytes(source))  # a few MB at most
  return f"{'hf' if local.endswith('.json') else 'spm'}:{local}"


def tokenizer_record(tok, spec: str, local_spec: str) -> dict:
  """The manifest's description of the tokenizer (training checks the fingerprint)."""
  file = paths_lib.basename(local_spec.partition(":")[2]) if ":" in local_spec else None
  return {
    "spec": spec,
    "fingerprint": tok.fingerprint,
    "vocab_size": tok.vocab_size,
    "eos_id": tok.eos_id,
    "bos_id": tok.bos_id,
    "pad_id": tok.pad_id,
    "file": file,
  }


# ---------------------------------------------------------------------------- prepare


def validation_shards(num_shards: int, val_shards: int, val_fraction: float) -> list[int]:
  """Indices of the held-out shards: `n` spread evenly over `range(num_shards)`; by default
  (val_shards None, no val_fraction) one shard, none if the corpus made only one."""
  if val_shards is None and not val_fraction:
    if num_shards < 2:  # a single document: nothing to cut
      log.warning(
        "the corpus made one shard: none is held out for validation; train with "
        "--config.train.eval_batches=0, or add documents"
      )
    return [num_shards // 2] if num_shards >= 2 else []
  n = val_shards or (max(1, round(val_fraction * num_shards)) if val_fraction else 0)
  if n and n >= num_shards:
    raise ValueError(
      f"the corpus made {num_shards} shard(s): too few to hold out {n} for "
      "validation and train on the rest; rerun with a smaller --val_shards/"
      "--val_fraction (finished shards are kept, only the manifest is "
      "rewritten) or a smaller --shard_tokens (re-tokenizes, in a new --out)"
    )
  return sorted({int((i + 0.5) * num_shards / n) for i in range(n)})


def _check_out_dir(out: str) -> None:
  if paths_lib.isfile(out):
    raise ValueError(f"--out {out!r} is a file; pass a folder")
  if (
    paths_lib.isdir(out)
    and paths_lib.listdir(out)
    and not paths_lib.isfile(paths_lib.join(out, PLAN))
  ):
    raise ValueError(
      f"--out {out!r} is not empty and holds no {PLAN} (not a prepare output); "
      "pass a new or empty folder"
    )


def _check_plan(out: str, plan: dict) -> None:
  path = paths_lib.join(out, PLAN)
  if paths_lib.isfile(path):
    old = untrusted.load_json(
      path,
      what="the settings of the prepare in --out",
      fix="pass a new --out, or delete the folder to start over",
    )
    if old != plan:
      old = old if isinstance(old, dict) else {}
      keys = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      raise ValueError(
        f"--out {out!r} holds a prepare with other settings (differing: {keys}); "
        "pass a new --out, or delete the folder to start over"
      )
  else:
    shards_lib.write_json_atomic(path, plan)


def prepare(opts: PrepareOptions) -> dict:
  """Tokenizes opts.inputs into shards in opts.out (resuming a partial run); returns the
  manifest. Raises ValueError for bad input before any tokenizing."""
  opts.validate()
  paths = formats.resolve_inputs(opts.inputs, opts.format)
  formats.check_inputs(paths, opts.format, opts.text_field, opts.hf_split)
  out = paths_lib.absolute(paths_lib.expanduser(opts.out))
  _check_out_dir(out)
  paths_lib.makedirs(out)
  tok, tokenizer_file = load_prepare_tokenizer(opts, paths, out)
  dtype = shards_lib.token_dtype(tok.vocab_size)
  plan = {
    "format": FORMAT_VERSION,
    "input_format": opts.format,
    "text_field": opts.text_field,
    "hf_split": opts.hf_split,
    "inputs": [[p, formats.input_identity(p)] for p in paths],
    "tokenizer_fingerprint": tok.fingerprint,
    "shard_tokens": int(opts.shard_tokens),
    "record_tokens": int(opts.record_tokens),
    "dtype": dtype.str,
    "writer_options": COMPRESSION[opts.compression],
  }
  _check_plan(out, plan)
  worker_spec = store_tokenizer(tokenizer_file, out, opts.tokenizer)
  plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]

  shards = shards_lib.committed_shards(out, plan_id)
  if not (shards and shards[-1]["final"]) and paths_lib.is_published(out, MANIFEST):
    paths_lib.remove(paths_lib.join(out, MANIFEST))
  start_time = time.perf_counter()
  new_tokens = 0
  if not (shards and shards[-1]["final"]):
    start = tuple(shards[-1]["end"]) if shards else (0, 0)
    if shards:
      log.info("resuming after %d committed shards at input %d, unit %d", len(shards), *start)
    stream = tokenized(
      input_chunks(paths, opts, start),
      tok,
      worker_spec,
      opts.num_proc,
      dtype,
      opts.cache_dir or default_cache_dir(),
    )
    new_tokens = cutting.write_shards(
      stream, shards, cutting.Target(out, paths, opts, plan, plan_id, tok)
    )
  if not shards:
    raise ValueError(
      f"the inputs ({', '.join(paths)}) hold no documents (every "
      f"{opts.text_field!r} is empty?); fix --inputs/--text_field"
    )
  if new_tokens:
    log.info(
      "tokenized %d tokens in %.1f s (%.0f tokens/s)",
      new_tokens,
      time.perf_counter() - start_time,
      new_tokens / (time.perf_counter() - start_time),
    )
  val = validation_shards(len(shards), opts.val_shards, opts.val_fraction)
  return write_manifest(out, tokenizer_record(tok, opts.tokenizer, worker_spec), plan, shards, val)


def write_manifest(out: str, tokenizer: dict, plan: dict, shards: list[dict], val) -> dict:
  """Writes manifest.json, the publish marker (atomically, last): the folder is complete from
  then on."""
  manifest = {
    "format": FORMAT_VERSION,
    "tokenizer": tokenizer,
    "dtype": plan["dtype"],
    "record_tokens": plan["record_tokens"],
    "writer_options": plan["writer_options"],
    "inputs": {
      "format": plan["input_format"],
      "text_field": plan["text_field"],
      "files": [p for p, _ in plan["inputs"]],
    },
    "num_documents": sum(s["documents"] for s in shards),
    "num_tokens": sum(s["tokens"] for s in shards),
    "shards": [
      {k: s[k] for k in ("path", "documents", "tokens", "records", "bytes", "sha256")}
      for s in shards
    ],
    "splits": {"train": [i for i in range(len(shards)) if i not in val], "validation": list(val)},
  }
  paths_lib.publish_marker(out, MANIFEST, json.dumps(manifest, indent=1))
  return manifest


# ---------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> PrepareOptions:
  """The options of a command line."""
  return parse_command_line(argv)[0]


def parse_command_line(argv=None) -> tuple[PrepareOptions, int | None]:
  """The options, and `--verbosity` (the log level; None: the default)."""
  parser = argparse.ArgumentParser(
    prog="python -m mmfree_jax.data.prepare",
    description="Tokenize a corpus once into ArrayRecord shards for data.source=array_record.",
  )
  parser.add_argument(
    "--inputs",
    required=True,
    help="comma-separated files, folders (hf_disk) or globs, in sorted order",
  )
  parser.add_argument("--format", required=True, choices=formats.SOURCE_FORMATS)
  parser.add_argument(
    "--text_field",
    default="text",
    help="Parquet column / JSON field / dataset column holding the text",
  )
  parser.add_argument(
    "--tokenizer", required=True, help=f"tokenizer spec, one of {', '.join(tok_lib.SPEC_FORMS)}"
  )
  parser.add_argument("--out", required=True, help="output folder (new, or a partial run's)")
  parser.add_argument("--num_proc", type=int, default=1, help="tokenizer processes")
  parser.add_argument(
    "--shard_tokens",
    type=float,
    default=1e8,
    help="tokens per shard (a shard closes at the document reaching it)",
  )
  parser.add_argument(
    "--record_tokens",
    type=int,
    default=4096,
    help="tokens per ArrayRecord record (random-read unit)",
  )
  parser.add_argument(
    "--val_shards",
    type=int,
    default=None,
    help="held-out validation shards (default 1, 0 for none)",
  )
  parser.add_argument(
    "--val_fraction",
    type=float,
    default=0.0,
    help="held-out fraction of the shards (instead of --val_shards)",
  )
  parser.add_argument(
    "--hf_split", default="train", help="split of a DatasetDict folder (--format hf_disk)"
  )
  parser.add_argument(
    "--compression",
    default="zstd",
    choices=sorted(COMPRESSION),
    help="per-record compression of the shards",
  )
  cli_logging.add_verbosity_flag(parser)
  args = parser.parse_args(argv)
  opts = PrepareOptions(
    inputs=args.inputs,
    format=args.format,
    tokenizer=args.tokenizer,
    out=args.out,
    text_field=args.text_field,
    num_proc=args.num_proc,
    shard_tokens=int(args.shard_tokens),
    record_tokens=args.record_tokens,
    val_shards=args.val_shards,
    val_fraction=args.val_fraction,
    hf_split=args.hf_split,
    compression=args.compression,
  )
  return opts, args.verbosity


def main(argv=None) -> int:
  opts, verbosity = parse_command_line(argv)
  with cli_logging.configured(verbosity):
    return _run(opts)


def _run(opts: PrepareOptions) -> int:
  t = time.perf_counter()
  try:
    manifest = prepare(opts)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # a missing file, a bucket's refusal (missing, permissions, quota)
    reason = " ".join(str(e).split()) or type(e).__name__
    print(
      f"error: reading --inputs or writing --out {opts.out} failed: {reason}; check the "
      "paths and, for a bucket, that it exists and your credentials may use it",
      file=sys.stderr,
    )
    return 1
  splits = manifest["splits"]
  print(
    f"{opts.out}: {len(manifest['shards'])} shards ({len(splits['validation'])} "
    f"validation), {manifest['num_documents']:,} documents, {manifest['num_tokens']:,} "
    f"tokens ({manifest['dtype']}), tokenizer {manifest['tokenizer']['spec']}; "
    f"{time.perf_counter() - t:.1f} s"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
