"""CLI: `python -m mmfree_jax.hf {import,export} ...` (see `mmfree_jax.hf`)."""

from __future__ import annotations

import argparse
import sys

from mmfree_jax import cli_logging, paths
from mmfree_jax.hf import tensors
from mmfree_jax.hf.mapping import HFCheckpointError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m mmfree_jax.hf",
    description="Convert between Hugging Face hgrn_bit checkpoints (ridger/MMfreeLM-*) and "
    "mmfree_jax workdirs.",
  )
  sub = parser.add_subparsers(dest="command", required=True)
  dtypes = sorted(tensors.NUMPY_DTYPES)
  imp = sub.add_parser("import", help="HF folder → workdir (params-only checkpoint step 0)")
  imp.add_argument(
    "--arch",
    default="hgrn_bit",
    choices=("hgrn_bit", "llama"),
    help="hgrn_bit: a MatMul-free LM (ridger/MMfreeLM-*); llama: a "
    "LlamaForCausalLM-layout Transformer, imported as model.kind="
    "'transformer' (e.g. a distillation teacher)",
  )
  imp.add_argument("--src", required=True, help="HF model folder (config.json + weights)")
  imp.add_argument("--workdir", required=True, help="new workdir (must not exist or be empty)")
  imp.add_argument(
    "--dtype",
    default="float32",
    choices=dtypes,
    help="param and compute dtype of the imported model (default float32)",
  )
  imp.add_argument(
    "--tokenizer",
    default=None,
    help="hgrn_bit: data.tokenizer spec to record (e.g. spm:mistral, "
    "hf:<tokenizer.json>, byte); default: the folder's tokenizer.model / "
    "tokenizer.json, or none",
  )
  imp.add_argument(
    "--allow_nonfinite",
    action="store_true",
    help="import tensors holding NaN/inf (refused by default: such a model computes NaN losses)",
  )
  exp = sub.add_parser("export", help="workdir → HF folder (config.json + model.safetensors)")
  exp.add_argument("--workdir", required=True, help="training or import workdir")
  exp.add_argument("--dst", required=True, help="new HF folder (must not exist or be empty)")
  exp.add_argument(
    "--dtype",
    default=None,
    choices=dtypes,
    help="dtype of the stored tensors (default: the weights' own dtype, a "
    "bit-exact round trip; bfloat16 as released)",
  )
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  for sub_parser in (imp, exp):
    cli_logging.add_verbosity_flag(sub_parser)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  with cli_logging.configured(args.verbosity):
    return _run(args)


def _run(args: argparse.Namespace) -> int:
  if args.command == "import" and not paths.is_remote(args.src):
    try:  # a folder that is not an HF model, in a second: before jax imports
      tensors.read_hf_config(args.src)
    except HFCheckpointError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  # pylint: disable=g-import-not-at-top
  from mmfree_jax.checkpoint.manager import CheckpointError
  from mmfree_jax.hf import checkpoint_io, llama

  try:
    if args.command == "import":
      if args.arch == "llama":
        out = llama.import_llama(
          args.src, args.workdir, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite
        )
      else:
        out = checkpoint_io.import_checkpoint(
          args.src,
          args.workdir,
          dtype=args.dtype,
          tokenizer=args.tokenizer,
          allow_nonfinite=args.allow_nonfinite,
        )
      model = out["model"]
      tokenizer = out["tokenizer"] or (
        "none (the folder has no tokenizer file; pass --tokenizer to eval.py)"
      )
      print(
        f"imported {out['num_params']:,} params (d_model={model['d_model']}, "
        f"num_layers={model['num_layers']}, vocab_size={model['vocab_size']}, "
        f"{args.dtype}) into {out['workdir']} as step 0; tokenizer {tokenizer}"
      )
      for note in out.get("notes", []):
        print("note:", note)
    else:
      out = checkpoint_io.export_checkpoint(
        args.workdir, args.dst, dtype=args.dtype, step=args.step
      )
      print(
        f"exported step {out['step']} ({out['num_params']:,} params, {out['dtype']}) to "
        f"{out['dst']}; tokenizer file: {out['tokenizer'] or 'none'}"
      )
  # OSError: a missing or existing file, or a bucket's refusal (permissions, quota)
  except (HFCheckpointError, CheckpointError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
