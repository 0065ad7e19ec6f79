"""Train a MatMul-free LM (or the Transformer++ baseline).

  python train.py                                   # tiny default on the built-in corpus
  python train.py --config=configs/tiny.py:transformer --workdir=/tmp/tf
  python train.py --config=configs/mmfree_370m.py --config.data.paths=/data/*.jsonl \
      --workdir=gs://... --config.mesh.shape.fsdp=-1

A workdir that already holds checkpoints is resumed from the latest.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "tiny.py"),
                                "Config file (ml-collections), optionally `file.py:arg`.",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir/tiny", "Checkpoints, metrics and logs go here.")
flags.DEFINE_integer("stop_after_steps", None,
                     "Stop (with a checkpoint) after this many steps, as if preempted.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("sample_prompt", "In the beginning",
                    "Text to continue after training (train.sample_tokens tokens; '' = none).")
flags.DEFINE_integer("restore_step", None,
                     "Resume from this checkpoint step instead of the latest (e.g. to skip a "
                     "corrupted one); newer steps are moved to WORKDIR/abandoned_checkpoints.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr)
  for noisy in ("absl", "jax._src", "orbax", "grain"):  # orbax logs read-only listings at WARNING
    logging.getLogger(noisy).setLevel(logging.ERROR)
  from mmfree_jax.train.trainer import train  # import after flags: jax picks up XLA_FLAGS
  result = train(flags.FLAGS.config, flags.FLAGS.workdir, progress=flags.FLAGS.progress,
                 stop_after_steps=flags.FLAGS.stop_after_steps,
                 restore_step=flags.FLAGS.restore_step)
  last = result.history[-1] if result.history else None
  if last:
    print(f"step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, "
          f"wall {result.wall_time_s:.1f}s")
  if result.eval_history:
    print(f"validation loss {result.eval_history[-1]['loss']:.4f}")
  if result.interrupted:
    print(f"stopped at step {int(result.state.step)}; rerun the same command to resume")
  cfg = flags.FLAGS.config
  if flags.FLAGS.sample_prompt and not result.interrupted and cfg.train.sample_tokens > 0:
    from mmfree_jax import generate as generate_lib  # pylint: disable=g-import-not-at-top
    sampling = generate_lib.SamplingConfig(max_new_tokens=cfg.train.sample_tokens,
                                           temperature=0.8, top_k=40)
    g = generate_lib.generate_text(result.model, result.tokenizer, flags.FLAGS.sample_prompt,
                                   sampling, seed=cfg.train.seed)
    print("sample:", g.prompt + g.text)


if __name__ == "__main__":
  app.run(main)
