"""Multi-process start-up: `jax.distributed.initialize` from the `dist` config or environment."""

from __future__ import annotations

import os

import jax


def maybe_initialize(dist_cfg) -> bool:
  """Initializes JAX's distributed runtime when configured; returns whether it did.

  Sources, in order: `dist.coordinator / num_processes / process_id` from the config, else the
  environment variables `MMFREE_COORDINATOR`, `MMFREE_NUM_PROCESSES`, `MMFREE_PROCESS_ID`.
  On Cloud TPU and SLURM, `dist.coordinator='auto'` lets JAX discover everything.
  On CPU the collectives go through gloo.
  """
  coordinator = dist_cfg.coordinator or os.environ.get("MMFREE_COORDINATOR", "")
  if not coordinator:
    return False
  timeouts = dict(heartbeat_timeout_seconds=int(dist_cfg.heartbeat_timeout_s),
                  initialization_timeout=int(dist_cfg.initialization_timeout_s))
  if coordinator == "auto":
    jax.distributed.initialize(**timeouts)
    return True
  num_processes = dist_cfg.num_processes or int(os.environ.get("MMFREE_NUM_PROCESSES", "0"))
  process_id = dist_cfg.process_id
  if process_id < 0:
    process_id = int(os.environ.get("MMFREE_PROCESS_ID", "-1"))
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
        f"distributed run needs dist.num_processes >= 1 and 0 <= dist.process_id < "
        f"num_processes; got num_processes={num_processes}, process_id={process_id}. Set "
        "--config.dist.num_processes/--config.dist.process_id or MMFREE_NUM_PROCESSES/"
        "MMFREE_PROCESS_ID")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, **timeouts)
  return True
