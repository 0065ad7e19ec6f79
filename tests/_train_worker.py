"""Runs `mmfree_jax.training.train` in a fresh process (for multi-process and kill tests).

usage: python tests/_train_worker.py WORKDIR OUT_PREFIX '{"train.steps": 6, ...}' [STOP_AFTER]
Writes OUT_PREFIX.json (losses, final step) and, on process 0, OUT_PREFIX.npz (params).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mmfree_jax.train.trainer import train  # noqa: E402
from tests.train_configs import small_config  # noqa: E402


def main():
  workdir, out_prefix, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  stop_after = int(sys.argv[4]) if len(sys.argv) > 4 else None
  cfg = small_config(**overrides)
  result = train(cfg, workdir, progress=False, stop_after_steps=stop_after)
  params = result.state.params
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.device_get(params)
  if jax.process_index() == 0:
    flat = {
      jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)
    }
    np.savez(out_prefix + ".npz", **flat)
    with open(out_prefix + ".json", "w") as f:
      json.dump(
        {
          "losses": [r["loss"] for r in result.history],
          "steps": [r["step"] for r in result.history],
          "final_step": int(result.state.step),
          "process_count": jax.process_count(),
        },
        f,
      )


if __name__ == "__main__":
  main()
