"""Checkpoints with orbax's CheckpointManager: train state, data iterator, config.

Layout: `WORKDIR/checkpoints/<step>/{state, data, config, checksums}`; a step written by an
importer (`mmfree_jax.hf import`) holds `{params, config, checksums}` only, and training starts
from it with a fresh optimizer state (fine-tuning). Orbax writes each step into a temporary
directory and renames it when complete (atomic; in a `gs://` bucket it writes
`commit_success.txt` last instead), asynchronously, keeping the newest `keep` steps; an
`s3://` workdir's steps are staged in a local folder and mirrored to the bucket
(`staging.py`). A checkpoint records the config it was made with; resuming with a different
model architecture is refused before any compute. Each step also holds `checksums`: a digest
of every saved array (`checksum.py`), verified on every restore, so corrupted bytes are an
error naming the step and the arrays, never silently loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mmfree_jax import paths
from mmfree_jax.checkpoint import checksum
from mmfree_jax.checkpoint.staging import StagedCheckpoints
from mmfree_jax.config import ModelConfig

log = logging.getLogger("mmfree_jax")
# Orbax writes this into a step's folder when the whole step is committed.
COMMIT_MARKER = "commit_success.txt"


def check_workdir_store(workdir: str, fix: str, process_count: int | None = None) -> None:
  """Refuses a workdir this run cannot checkpoint to, in one line ending with `fix`: an
  `s3://` one is staged through a local folder (`staging.py`), which holds one process's
  files only, while orbax's multi-process save merges all processes' files in one store.
  process_count: the run's processes (default: `jax.process_count()`)."""
  count = jax.process_count() if process_count is None else process_count
  if paths.scheme(workdir) == "s3" and count > 1:
    raise ValueError(
      f"workdir {workdir!r}: an s3:// workdir takes one process ({count} "
      f"here): orbax-checkpoint 0.12.8 writes arrays only to gs:// and local paths, so s3:// "
      f"checkpoints are staged on one process's local disk; {fix}"
    )


ITEMS = ("state", "params", "data", "config", "checksums")
# Keys that change the shapes or meaning of the parameters: a checkpoint is only usable by a
# config that agrees on all of them.
ARCHITECTURE_KEYS = (
  "kind",
  "vocab_size",
  "d_model",
  "num_layers",
  "hidden_ratio",
  "intermediate_size",
  "num_heads",
  "num_kv_heads",
  "use_lower_bound",
  "param_dtype",
)


# Architecture keys that only a Transformer++ has (the MatMul-free LM ignores them).
TRANSFORMER_ONLY_KEYS = ("num_heads", "num_kv_heads")


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (other architecture, unreadable files)."""


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.absolute(workdir), "checkpoints")


def move_aside(workdir: str, steps: list[int], why: str) -> str:
  """Moves the folders of `steps` to `WORKDIR/abandoned_checkpoints/<time>-<why>/` (kept, not
  deleted: a person may still want them); returns that folder."""
  aside = paths.join(
    paths.absolute(workdir), "abandoned_checkpoints", f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
  )
  paths.makedirs(aside)
  for step in steps:
    src, dst = paths.join(checkpoint_dir(workdir), str(step)), paths.join(aside, str(step))
    marker = paths.join(src, COMMIT_MARKER)
    # A bucket moves object by object: unpublish first, so a move cut short leaves an
    # uncommitted folder (set aside at the next start), never a committed one missing files.
    if paths.is_remote(src) and paths.exists(marker):
      paths.move(marker, paths.join(dst, COMMIT_MARKER))
    paths.move(src, dst)
  return aside


def set_aside_uncommitted(workdir: str) -> list[int]:
  """Moves step folders without orbax's commit marker (a save cut short: on object storage
  orbax writes the marker last) out of `checkpoints/`, so the run saves those steps again
  instead of finding them taken. Call only while no save is in flight (the start of a run, on
  process 0). Returns the steps moved."""
  directory = checkpoint_dir(workdir)
  if not paths.isdir(directory):
    return []
  steps = sorted(
    int(name)
    for name in paths.listdir(directory)
    if name.isdigit()
    and paths.isdir(paths.join(directory, name))
    and not paths.exists(paths.join(directory, name, COMMIT_MARKER))
  )
  if steps:
    aside = move_aside(workdir, steps, "uncommitted")
    log.warning(
      "checkpoint steps %s in %s have no %s (a save cut short): moved to %s; they "
      "will be saved again",
      steps,
      directory,
      COMMIT_MARKER,
      aside,
    )
  return steps


def read_only_options() -> ocp.CheckpointManagerOptions:
  """Options of a manager that only reads: the writing options set to what read_only needs,
  since orbax logs a warning for each one it has to reset (six per manager by default)."""
  return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items this project saves."""

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    async_save: bool = True,
    read_only: bool = False,
    save_concurrent_gb: int | None = None,
  ):
    """save_concurrent_gb: cap on the bytes orbax serializes at once (its default, 96 GB,
    lets it stage a second full copy of the arrays in host memory; importers set 1)."""
    self.directory = checkpoint_dir(workdir)
    # s3://: orbax works in a local folder that `staging` mirrors to the bucket
    self._staged = None
    if paths.scheme(self.directory) == "s3":
      self._staged = StagedCheckpoints(self.directory, COMMIT_MARKER, None if read_only else keep)
    self._orbax_dir = self.directory if self._staged is None else self._staged.local
    options = (
      read_only_options()
      if read_only
      else ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      )
    )
    handlers = None
    if save_concurrent_gb is not None:
      handlers = {
        item: ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb)
        for item in ("state", "params")
      }
    self.manager = ocp.CheckpointManager(
      self._orbax_dir, item_names=ITEMS, item_handlers=handlers, options=options
    )

  def _local(self, step: int) -> None:
    """Makes `step` readable by orbax: an s3:// step is downloaded first."""
    if self._staged is not None and self._staged.fetch(step):
      self.manager.reload()

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return max(steps) if steps else None

  def has_step(self, step: int) -> bool:
    """Whether `step` exists at all (committed, or being saved right now)."""
    remote = [] if self._staged is None else self._staged.step_folders()
    return step in self.manager.all_steps() or step in remote

  def is_committed(self, step: int) -> bool:
    return paths.exists(paths.join(self.directory, str(step), COMMIT_MARKER))

  def all_steps(self) -> list[int]:
    """Committed steps; a step folder without orbax's commit marker (a save cut short, files
    copied by hand) is not a checkpoint and is skipped with a warning."""
    pending = None if self._staged is None else self._staged.pending
    if self._staged is None:
      found, saving = set(self.manager.all_steps()), self.manager.is_saving_in_progress()
    else:  # s3://: the bucket's step folders, and the step being saved and uploaded
      found, saving = set(self._staged.step_folders()) | {pending}, False
    steps = []
    for step in sorted(found - {None}):
      if saving or step == pending or self.is_committed(step):
        steps.append(step)
      else:
        log.warning(
          "ignoring checkpoint step %d in %s: it has no %s (an interrupted save?); "
          "train.py moves it to abandoned_checkpoints/ and saves the step again",
          step,
          self.directory,
          COMMIT_MARKER,
        )
    return steps

  def save(
    self, step: int, state: Any, data_iterator, config_dict: dict, *, force: bool = False
  ) -> bool:
    """Starts an (async) save of step; returns whether a save was started."""
    args = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(config_dict),
      "checksums": _checksums_arg("state", state),
    }
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._save(step, ocp.args.Composite(**args), force)

  def _save(self, step: int, args: ocp.args.Composite, force: bool) -> bool:
    if self._staged is not None:
      self._staged.wait()  # the previous step is in the bucket before orbax may delete it
    started = self.manager.save(step, args=args, force=force)
    if started and self._staged is not None:
      self._staged.upload_when_committed(step, self.manager.is_saving_in_progress)
    return started

  def save_params(self, step: int, params: Any, config_dict: dict) -> None:
    """Saves params alone (no optimizer state, no data position), e.g. imported weights."""
    self._save(
      step,
      ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave(config_dict),
        checksums=_checksums_arg("params", params),
      ),
      True,
    )

  def has_train_state(self, step: int) -> bool:
    """True if step holds a full train state, False if it holds params only."""
    return paths.isdir(paths.join(self.directory, str(step), "state"))

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the params (from a full train state or a params-only step).

    abstract_params: tree of `jax.ShapeDtypeStruct` with shardings; a subtree of the params
      restores only those leaves.
    """
    restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      abstract_params,
    )
    self.check_item(step, "state" if self.has_train_state(step) else "params")
    self._local(step)
    # A fresh read-only manager: an item's handler is fixed by its first use, and the
    # training manager registered StandardSave for `state`.
    reader = ocp.CheckpointManager(self._orbax_dir, item_names=ITEMS, options=read_only_options())
    try:
      if self.has_train_state(step):
        args = ocp.args.PyTreeRestore(
          item={"params": abstract_params},
          restore_args={"params": restore_args},
          partial_restore=True,
        )
        params = reader.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
        checked, item = {"params": params}, "state"
      else:
        # partial_restore: a subtree of the params (e.g. one leaf, as `mmfree_jax.export` reads)
        args = ocp.args.PyTreeRestore(
          item=abstract_params, restore_args=restore_args, partial_restore=True
        )
        params = reader.restore(step, args=ocp.args.Composite(params=args))["params"]
        checked, item = params, "params"
    except Exception as e:
      raise CheckpointError(
        f"could not restore the params of checkpoint step {step} from {self.directory}: "
        f"{e}. Pick another step (available: {self.all_steps()})"
      ) from e
    finally:
      reader.close()
    self.verify(step, item, checked)
    return params

  def read_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    path = paths.join(self.directory, str(step), "config")
    try:
      self._local(step)
      restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      return restored["config"]
    except Exception as e:
      raise CheckpointError(
        f"the config of checkpoint step {step} ({path}) is unreadable: {e}. Pick an older "
        f"step with --restore_step (available: {self.all_steps()})"
      ) from e

  def check_item(self, step: int, item: str) -> None:
    """Raises CheckpointError naming the step and the fix if `item`'s metadata is missing."""
    metadata = paths.join(self.directory, str(step), item, "_METADATA")
    if not paths.exists(metadata):
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} is incomplete: {metadata} is missing. "
        + (
          f"Resume from another step with --restore_step (available: {others}), or "
          if others
          else "Move it away (or delete it) and start again, or "
        )
        + "restore the file"
      )

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores the state (into abstract_state's shapes/shardings) and the data iterator."""
    self.check_item(step, "state")
    self._local(step)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types; name the step and directory
      raise CheckpointError(
        f"could not restore checkpoint step {step} from {self.directory}: {e}. Pick an older "
        f"step with --restore_step (available: {self.all_steps()})"
      ) from e
    self.verify(step, "state", restored["state"])
    return restored["state"]

  def verify(self, step: int, item: str, tree: Any) -> None:
    """Raises CheckpointError naming the step and the arrays if any array of `tree` (restored
    from `item` of `step`) differs from the checksums saved with it. Steps saved before
    checksums existed are not checked."""
    path = paths.join(self.directory, str(step), "checksums")
    if not paths.exists(path):
      log.info(
        "checkpoint step %d has no checksums (saved by an older version): not verified", step
      )
      return
    try:
      self._local(step)
      saved = self.manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))[
        "checksums"
      ]
    except Exception as e:  # orbax raises many types
      raise CheckpointError(
        f"the checksums of checkpoint step {step} ({path}) are unreadable: "
        f"{e}. {self._fallback(step)}"
      ) from e
    if saved.get("algorithm") != checksum.ALGORITHM:
      log.warning(
        "checkpoint step %d: unknown checksum algorithm %r, not verified",
        step,
        saved.get("algorithm"),
      )
      return
    bad = checksum.mismatches(tree, saved.get(item, {}))
    if bad:
      shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} is corrupted: the bytes read for {shown} "
        f"do not match the checksums saved with it. {self._fallback(step)}"
      )

  def _fallback(self, step: int) -> str:
    others = [s for s in self.all_steps() if s != step]
    if not others:
      return "No other step to fall back to: restore the files, or start a fresh --workdir"
    return (
      f"Resume from another step with train.py --restore_step=N, or evaluate one with "
      f"eval.py --step=N (available: {others})"
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()
    if self._staged is not None:
      self._staged.wait()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._staged is not None:
      self._staged.close()


def _checksums_arg(item: str, tree: Any):
  """The `checksums` item of a step that saves `tree` as `item`."""
  return ocp.args.JsonSave({"algorithm": checksum.ALGORITHM, item: checksum.digests(tree)})


def check_compatible(saved_config: dict, model_config: dict, where: str) -> None:
  """Raises CheckpointError if the saved model architecture differs from the current one.

  Both sides go through `ModelConfig.from_config`, so derived values (intermediate_size=None)
  compare equal to their explicit form.
  """
  try:
    saved = dataclasses.asdict(ModelConfig.from_config(saved_config.get("model", {})))
  except ValueError as e:
    raise CheckpointError(
      f"the checkpoint in {where} has an unreadable model config: {e}"
    ) from None
  current = dataclasses.asdict(ModelConfig.from_config(model_config))
  keys = [
    k
    for k in ARCHITECTURE_KEYS  # the MLGRU has one head: head counts shape nothing
    if not (k in TRANSFORMER_ONLY_KEYS and saved["kind"] == current["kind"] == "mmfree")
  ]
  diffs = [
    f"{k}: checkpoint={saved.get(k)!r} config={current.get(k)!r}"
    for k in keys
    if saved.get(k) != current.get(k)
  ]
  if diffs:
    raise CheckpointError(
      f"the checkpoint in {where} was made by a different model architecture ("
      + "; ".join(diffs)
      + "). Use a fresh --workdir, or pass the config it was trained with"
    )
