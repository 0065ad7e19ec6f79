"""Prints the command that starts `train.py` on every host of a Cloud TPU VM slice.

usage: python launch/tpu_vm.py --name=NAME --zone=ZONE [--queued_resource] [--repo=DIR]
           [--venv=DIR] -- [train.py flags...]

Each host runs the same command; `--config.dist.coordinator=auto` lets JAX find the other
hosts through the TPU VM's metadata server (multi-slice: also `MEGASCALE_*`, which a queued
resource with several nodes sets). The repository and its venv must already be on every
worker (same path), e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command='git
clone ... && ...'`. Needs no jax: it only formats the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
  p.add_argument("--zone", required=True, help="its zone, e.g. us-west4-a")
  p.add_argument("--project", default="", help="gcloud project ('' = gcloud's default)")
  p.add_argument(
    "--queued_resource",
    action="store_true",
    help="NAME is a queued resource (multi-slice: one node per slice)",
  )
  p.add_argument("--repo", default="~/mmfree_jax", help="the checkout on every worker")
  p.add_argument("--venv", default=".venv", help="its virtual environment, relative to --repo")
  return p


def tpu_command(args: argparse.Namespace, train_flags: list[str]) -> str:
  """The gcloud command line; its `--command` runs `train.py` with `train_flags` everywhere."""
  remote = f"cd {args.repo} && {args.venv}/bin/python train.py " + shlex.join(
    ["--config.dist.coordinator=auto", *train_flags]
  )
  if args.queued_resource:
    argv = [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "ssh",
      args.name,
      f"--zone={args.zone}",
      "--node=all",
      "--worker=all",
    ]
  else:
    argv = [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "ssh",
      args.name,
      f"--zone={args.zone}",
      "--worker=all",
    ]
  if args.project:
    argv.append(f"--project={args.project}")
  return shlex.join(argv) + " --command=" + shlex.quote(remote)


def main(argv: list[str]) -> str:
  if "--" in argv:
    cut = argv.index("--")
    own, train_flags = argv[:cut], argv[cut + 1 :]
  else:
    own, train_flags = argv, []
  bad = [f for f in train_flags if f.startswith("--config.dist.")]
  if bad:
    raise SystemExit(
      f"tpu_vm.py: error: {bad[0]} is set by the launcher (dist.coordinator=auto); drop it"
    )
  return tpu_command(_parser().parse_args(own), train_flags)


if __name__ == "__main__":
  print(main(sys.argv[1:]))
