"""CLI: `python -m mmfree_jax.export --workdir W --format 2bit --dst DIR` (see the package)."""

from __future__ import annotations

import argparse
import sys

from mmfree_jax import cli_logging, paths, registry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m mmfree_jax.export",
    description="Export a MatMul-free workdir's checkpoint as packed ternary weights "
    "(safetensors + config + tokenizer) for `eval.py --packed DIR`.",
  )
  parser.add_argument("--workdir", required=True, help="training or import workdir")
  parser.add_argument("--dst", required=True, help="new directory (must not exist or be empty)")
  parser.add_argument(
    "--format",
    default="2bit",
    choices=registry.EXPORT_FORMATS,
    help="2bit: 4 codes/byte; base3: 5 codes/byte (1.6 bits); int8: 1/byte",
  )
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument(
    "--embedding_dtype",
    default=None,
    choices=registry.EMBEDDING_DTYPES,
    help="stored embedding dtype (default: the checkpoint's param dtype); int8: "
    "per-row absmax codes + fp32 scales, the one lossy choice",
  )
  parser.add_argument(
    "--tokenizer",
    default=None,
    help="data.tokenizer spec to store (byte | hf:<tokenizer.json> | "
    "spm:<model> | spm:mistral); default: the workdir's, and a workdir "
    "that records none exports ids-only",
  )
  cli_logging.add_verbosity_flag(parser)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  with cli_logging.configured(args.verbosity):
    return _run(args)


def _run(args: argparse.Namespace) -> int:
  if not paths.exists(args.workdir):  # before jax loads: a typo costs no import
    print(f"error: --workdir={args.workdir} does not exist", file=sys.stderr)
    return 1
  from mmfree_jax.checkpoint.manager import CheckpointError  # pylint: disable=import-outside-toplevel
  from mmfree_jax.export import layout, writer  # pylint: disable=import-outside-toplevel

  try:
    out = writer.export_workdir(
      args.workdir,
      args.dst,
      fmt=args.format,
      step=args.step,
      embedding_dtype=args.embedding_dtype,
      tokenizer=args.tokenizer,
    )
  except (
    layout.PackedDirError,
    CheckpointError,
    OSError,  # a missing or existing file, or a bucket's refusal (permissions, quota)
    ValueError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"exported step {out['step']} as {out['format']} ({out['bytes'] / 2**20:.1f} MiB "
    f"model.safetensors, embedding {out['embedding_dtype']}) to {out['dst']}; tokenizer: "
    f"{out['tokenizer'] or 'none stored (byte, or ids only: eval.py --tokenizer)'}; "
    "largest checkpoint leaf held: "
    f"{out['peak_leaf_bytes'] / 2**20:.1f} MiB"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
