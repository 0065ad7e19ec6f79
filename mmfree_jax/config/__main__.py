"""`python -m mmfree_jax.config --docs` rewrites docs/architecture.md §5 from the schema;
`--check` exits 1 when it is stale; `--print` writes the markdown to stdout."""

import argparse
import sys

from mmfree_jax.config import docs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmfree_jax.config", description=__doc__)
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--docs", action="store_true", help="rewrite the schema section")
  mode.add_argument("--check", action="store_true", help="exit 1 if the section is stale")
  mode.add_argument("--print", action="store_true", help="print the generated markdown")
  parser.add_argument("--path", default=docs.DOC_PATH, help="the markdown file")
  args = parser.parse_args(argv)
  if args.print:
    sys.stdout.write(docs.render_markdown())
    return 0
  if args.check:
    if docs.doc_is_current(args.path):
      return 0
    print(
      f"{args.path}: the config schema section is stale; run python -m mmfree_jax.config --docs",
      file=sys.stderr,
    )
    return 1
  changed = docs.write_doc(args.path)
  print(f"{args.path}: {'updated' if changed else 'already current'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
