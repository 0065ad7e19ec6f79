"""Multi-process start-up: `jax.distributed.initialize` from the `dist` config or environment."""

from __future__ import annotations

import os

import jax

# What `dist.coordinator=auto` reads, by cluster (JAX's cluster detection, jax._src.clusters):
# the launchers in launch/ set these, and tests/test_launch.py checks that they do.
AUTO_ENV = {
  "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
  # GKE TPU pods (one JobSet replicated job per slice); on TPU VMs the metadata server
  # answers instead
  "gke_tpu": ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES"),
  "multislice": ("MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID"),
}


def _cpu_collectives_over_gloo() -> None:
  """CPU processes exchange arrays through gloo (XLA:CPU has no other cross-process path)."""
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _initialize_auto(timeouts: dict) -> None:
  """JAX finds coordinator, process count and index in the cluster's environment."""
  try:
    jax.distributed.initialize(**timeouts)
  except ValueError as e:
    if "coordinator_address" not in str(e):
      raise
    raise ValueError(
      "dist.coordinator=auto found no cluster environment (Cloud TPU, GKE TPU, SLURM under "
      "srun, Kubernetes, Open MPI); start the processes with a launcher from launch/ or set "
      "--config.dist.coordinator=HOST:PORT, dist.num_processes and dist.process_id"
    ) from None


def maybe_initialize(dist_cfg) -> bool:
  """Initializes JAX's distributed runtime when configured; returns whether it did.

  Sources, in order: `dist.coordinator / num_processes / process_id` from the config, else the
  environment variables `MMFREE_COORDINATOR`, `MMFREE_NUM_PROCESSES`, `MMFREE_PROCESS_ID`.
  `dist.coordinator='auto'` lets JAX discover everything (Cloud TPU, SLURM: see `AUTO_ENV`).
  On CPU the collectives go through gloo.
  """
  coordinator = dist_cfg.coordinator or os.environ.get("MMFREE_COORDINATOR", "")
  if not coordinator:
    return False
  timeouts = {
    "heartbeat_timeout_seconds": int(dist_cfg.heartbeat_timeout_s),
    "initialization_timeout": int(dist_cfg.initialization_timeout_s),
  }
  if coordinator == "auto":
    _cpu_collectives_over_gloo()
    _initialize_auto(timeouts)
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
      "MMFREE_PROCESS_ID"
    )
  _cpu_collectives_over_gloo()
  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=num_processes, process_id=process_id, **timeouts
  )
  return True
