"""Checks a run makes before any compute: workdir, disk, batch layout, resume point, memory.

Each raises one line naming the fix (`ValueError`, `OSError`, `CheckpointError`).
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
from jax.experimental import multihost_utils

from mmfree_jax import paths
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.parallel import mesh as mesh_lib

log = logging.getLogger("mmfree_jax")


def check_workdir_scheme(workdir: str) -> None:
  """Refuses a workdir this run cannot checkpoint to (`checkpoint.manager.check_workdir_store`)."""
  ckpt_lib.check_workdir_store(
    workdir, "pass a gs:// or shared-disk --workdir for a multi-process run"
  )


def missing_folders(workdir: str) -> list[str]:
  """What a start creates, outermost first: the workdir's missing parents on a disk (`/ckpt`
  of `/ckpt/370m`), the workdir, its `checkpoints/`."""
  folders = [d for d in (workdir, ckpt_lib.checkpoint_dir(workdir)) if not paths.exists(d)]
  parent = paths.dirname(workdir)
  while (
    not paths.is_remote(workdir) and parent != paths.dirname(parent) and not paths.exists(parent)
  ):
    folders, parent = [parent] + folders, paths.dirname(parent)
  return folders


def check_workdir_writable(workdir: str) -> None:
  """Fails before any compute if the workdir cannot be created or written."""
  check_workdir_scheme(workdir)
  probe = paths.join(workdir, f".write_probe_{os.getpid()}")
  try:
    paths.makedirs(workdir)
    paths.write_atomic(probe, "ok")
    paths.remove(probe)
  except OSError as e:
    raise OSError(
      f"workdir {workdir!r} is not writable ({e.strerror or e}); pass a --workdir on a "
      "writable disk with free space"
    ) from e


def check_disk_space(workdir: str, needed_bytes: int) -> None:
  """Fails before compute if the workdir's disk cannot hold one more checkpoint (a bucket has
  no such limit to ask for)."""
  if paths.is_remote(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise OSError(
      f"workdir {workdir!r} has {free / 2**20:.1f} MiB free but one checkpoint "
      f"needs about {needed_bytes / 2**20:.1f} MiB; free space or pass another "
      "--workdir"
    )


def select_restore_step(workdir: str, restore_step: int | None) -> int | None:
  """The step to resume from: the latest, or `restore_step` (newer ones are moved aside).

  Steps newer than an explicitly chosen one go to `WORKDIR/abandoned_checkpoints/`, not
  deleted, so a run can continue from an older step (e.g. past a corrupted checkpoint); so do
  uncommitted step folders, which this run then saves again.
  """
  if jax.process_index() == 0:
    ckpt_lib.set_aside_uncommitted(workdir)
  listing = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps_found = listing.all_steps()
  finally:
    listing.close()
  if restore_step is None:
    return max(steps_found) if steps_found else None
  if restore_step not in steps_found:
    raise ckpt_lib.CheckpointError(
      f"--restore_step={restore_step} is not in {ckpt_lib.checkpoint_dir(workdir)}; "
      f"available steps: {steps_found}"
    )
  newer = [s for s in steps_found if s > restore_step]
  if newer and jax.process_index() == 0:
    aside = ckpt_lib.move_aside(workdir, newer, "newer")
    log.warning(
      "moved checkpoints %s (newer than --restore_step=%d) to %s", newer, restore_step, aside
    )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("select_restore_step")
  return restore_step


def check_batch_layout(train_cfg, mesh) -> None:
  """Global batch must split evenly into microbatches and each microbatch over data shards."""
  batch, micro = train_cfg.global_batch, train_cfg.microbatches
  shards = mesh_lib.data_parallel_size(mesh)
  if micro < 1 or batch % micro:
    raise ValueError(
      f"train.global_batch={batch} is not divisible by train.microbatches="
      f"{micro}; pick microbatches dividing the global batch"
    )
  if (batch // micro) % shards:
    raise ValueError(
      f"the microbatch of {batch // micro} rows (global_batch {batch} / microbatches {micro}) "
      f"is not divisible by the {shards} data shards (mesh data x fsdp); set "
      f"--config.train.global_batch to a multiple of {shards * micro}"
    )
  if batch % jax.process_count():
    raise ValueError(
      f"train.global_batch={batch} is not divisible by the {jax.process_count()} processes"
    )


def check_steps_unchanged(saved_config: dict, cfg, step: int, allow: bool) -> None:
  """Refuses (unless `allow`) a resume whose train.steps differs from the checkpoint's: the LR
  schedule spans train.steps, so changing it moves the decay under a run already in it."""
  saved = saved_config.get("train", {}).get("steps")
  if saved is None or saved == cfg.train.steps:
    return
  msg = (
    f"train.steps changed from {saved} (checkpoint step {step}) to {cfg.train.steps}: the "
    f"{cfg.optim.schedule} LR schedule spans train.steps, so the learning rate would jump "
    "mid-run"
  )
  if not allow:
    raise ValueError(
      msg + "; pass --allow_steps_change (train(..., allow_steps_change=True)) "
      f"to accept that, or keep --config.train.steps={saved}"
    )
  log.warning("%s (accepted: allow_steps_change)", msg)
