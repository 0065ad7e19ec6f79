"""Train a MatMul-free LM (or the Transformer++ baseline).

  python train.py                                   # tiny default on the built-in corpus
  python train.py --config=configs/tiny.py:transformer --workdir=/tmp/tf
  python train.py --config=configs/mmfree_370m.py --config.data.paths=/data/*.jsonl \
      --workdir=gs://... --config.mesh.shape.fsdp=-1

A workdir that already holds checkpoints is resumed from the latest; one run per workdir (a
lock file). `--print_config` shows the resolved config with every key's help and exits.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def _check_config_overrides(argv):
  """An unknown `--config.x` key in one line; ml_collections fails on it while the flag is
  being defined, with a ~70-line traceback."""
  from mmfree_jax.config import check_override_keys  # pylint: disable=g-import-not-at-top

  try:
    check_override_keys(argv[1:])
  except ValueError as e:
    print(f"{os.path.basename(argv[0])}: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _check_config_overrides(sys.argv)
config_flags.DEFINE_config_file(
  "config",
  os.path.join(_HERE, "configs", "tiny.py"),
  "Config file (ml-collections), optionally `file.py:arg`.",
  lock_config=True,
)
flags.DEFINE_string("workdir", "workdir/tiny", "Checkpoints, metrics and logs go here.")
flags.DEFINE_integer(
  "stop_after_steps",
  None,
  "Stop (with a checkpoint) after this many steps of this invocation, "
  "counted from the resume point (not an absolute step), as if preempted.",
)
flags.DEFINE_bool(
  "progress",
  True,
  "Progress bar on a terminal; --noprogress (or no TTY) "
  "prints a log line every train.log_every steps instead.",
)
flags.DEFINE_string(
  "sample_prompt",
  "In the beginning",
  "Text to continue after training (train.sample_tokens tokens; '' = none).",
)
flags.DEFINE_integer(
  "restore_step",
  None,
  "Resume from this checkpoint step instead of the latest (e.g. to skip a "
  "corrupted one); newer steps are moved to WORKDIR/abandoned_checkpoints.",
)
flags.DEFINE_bool(
  "allow_steps_change",
  False,
  "Resume although train.steps differs from the checkpoint's (the LR schedule changes mid-run).",
)
flags.DEFINE_bool(
  "print_config", False, "Print the resolved config (every key with its help text) and exit."
)
flags.DEFINE_bool(
  "traceback",
  False,
  "Show the full traceback of user errors (bad config, data, checkpoints) instead of one message.",
)
_HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def _parse_flags(argv):
  """absl parsing, with a bad flag reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"train.py: error: {e}\nPass --help for usage.", file=sys.stderr)
    sys.exit(2)


def _check_before_jax(cfg) -> None:
  """The config and data-path checks `trainer.setup` starts with, run before jax imports (10-50
  s on a loaded machine) so that a typo is reported in about a second."""
  from mmfree_jax.config import validate  # pylint: disable=g-import-not-at-top
  from mmfree_jax.data import sources  # pylint: disable=g-import-not-at-top

  try:
    validate(cfg)
    if cfg.data.source == "array_record":  # their manifests are checked when opened
      sources.prepared_dirs(cfg.data.paths)
    else:
      sources.source_from_config(cfg.data)
  except (ValueError, OSError) as e:
    if flags.FLAGS.traceback:
      raise
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(1)


def main(argv):
  del argv
  from mmfree_jax import cli_logging  # pylint: disable=g-import-not-at-top

  cli_logging.setup(cli_logging.absl_verbosity())
  if flags.FLAGS.print_config:
    from mmfree_jax.config import describe  # pylint: disable=g-import-not-at-top

    print(describe(flags.FLAGS.config))
    return
  _check_before_jax(flags.FLAGS.config)
  # import after flags: jax picks up XLA_FLAGS
  from mmfree_jax.checkpoint.manager import CheckpointError  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train.workdir_lock import WorkdirLockedError  # pylint: disable=g-import-not-at-top

  user_errors = (
    ValueError,
    OSError,
    ImportError,
    CheckpointError,
    WorkdirLockedError,
    trainer.NonFiniteLossError,
  )
  try:
    result = trainer.train(
      flags.FLAGS.config,
      flags.FLAGS.workdir,
      progress=flags.FLAGS.progress,
      stop_after_steps=flags.FLAGS.stop_after_steps,
      restore_step=flags.FLAGS.restore_step,
      allow_steps_change=flags.FLAGS.allow_steps_change,
    )
  except user_errors as e:
    if flags.FLAGS.traceback:
      raise
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(1)
  last = result.history[-1] if result.history else None
  if last:
    print(
      f"step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, "
      f"wall {result.wall_time_s:.1f}s"
    )
  if result.eval_history:
    print(f"validation loss {result.eval_history[-1]['loss']:.4f}")
  if result.skipped_steps:
    print(
      f"skipped {len(result.skipped_steps)} step(s) with non-finite loss or gradient "
      f"(updates not applied): {result.skipped_steps[:20]}"
    )
  if result.interrupted:
    print(f"stopped at step {int(result.state.step)}; rerun the same command to resume")
  cfg = flags.FLAGS.config
  if flags.FLAGS.sample_prompt and not result.interrupted and cfg.train.sample_tokens > 0:
    from mmfree_jax import generate as generate_lib  # pylint: disable=g-import-not-at-top

    sampling = generate_lib.SamplingConfig(
      max_new_tokens=cfg.train.sample_tokens, temperature=0.8, top_k=40
    )
    g = generate_lib.generate_text(
      result.model, result.tokenizer, flags.FLAGS.sample_prompt, sampling, seed=cfg.train.seed
    )
    print("sample:", g.prompt + g.text)


if __name__ == "__main__":
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as exit_:  # absl exits 1 after printing --help: asking for help succeeded
    if exit_.code == 1 and any(a in _HELP_FLAGS for a in sys.argv[1:]):
      sys.exit(0)
    raise
