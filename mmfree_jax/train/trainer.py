"""The trainer: `train(cfg, workdir)` builds a run (`run.setup`) and runs its loop.

`train` is what `train.py` runs and what notebooks call. Starting in a workdir that holds
checkpoints resumes from the latest (params, optimizer, step, RNG, data position). The steps
themselves are pure jitted functions (`steps.py`); the per-step bookkeeping is `step_log.py`;
this module moves batches, validation and checkpoints around them and judges the run's end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mmfree_jax.train import goodput
from mmfree_jax.train import state as state_lib
from mmfree_jax.train.run import Run, setup, to_global
from mmfree_jax.train.step_log import NonFiniteLossError, StepLog, due

__all__ = ["NonFiniteLossError", "Run", "TrainResult", "final_model", "setup", "train"]

log = logging.getLogger("mmfree_jax")


@dataclasses.dataclass
class TrainResult:
  """What a finished (or interrupted) run leaves for the caller."""

  state: state_lib.TrainState
  model: nnx.Module  # the final params merged into a model (for sampling, notebooks)
  tokenizer: Any
  history: list[dict]
  eval_history: list[dict]
  interrupted: bool
  wall_time_s: float
  skipped_steps: list[int] = dataclasses.field(default_factory=list)  # non-finite, not applied
  goodput: dict = dataclasses.field(default_factory=dict)  # goodput.breakdown of the workdir


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then saves and exits)."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    log.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.requested = True

  def any_process_requested(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _save_unless_skipped(run: Run, logger: StepLog, step: int, force: bool = False) -> None:
  """Checkpoints `step` unless its update was skipped for non-finite values."""
  logger.flush()  # the step's metrics say whether its update was applied
  if logger.last_skipped:
    log.warning(
      "not checkpointing step %d: its update was skipped (non-finite); the last checkpoint is %s",
      step,
      run.checkpointer.latest_step(),
    )
    return
  with run.goodput.phase("checkpoint_save"):
    run.save(step, force=force)


def train(
  cfg: ml_collections.ConfigDict,
  workdir: str,
  *,
  progress: bool = True,
  stop_after_steps: int | None = None,
  restore_step: int | None = None,
  allow_steps_change: bool = False,
) -> TrainResult:
  """Trains `cfg` in `workdir` (resuming from its latest checkpoint).

  Args:
    cfg: a full config (see `mmfree_jax.config.base_config`).
    workdir: checkpoints, metrics.jsonl, TensorBoard files and the config go here.
    progress: show a tqdm progress bar on process 0 when stderr is a terminal; otherwise (or
      with False) print a log line every train.log_every steps.
    stop_after_steps: stop (with a checkpoint) after this many steps of this call, as if
      preempted; None runs to `train.steps`.
    restore_step: resume from this step instead of the latest (newer steps are moved to
      `WORKDIR/abandoned_checkpoints/`).
    allow_steps_change: accept a resume whose train.steps differs from the checkpoint's (the
      LR schedule changes mid-run); refused otherwise.
  """
  run = setup(
    cfg,
    workdir,
    stop_after_steps=stop_after_steps,
    restore_step=restore_step,
    allow_steps_change=allow_steps_change,
  )
  if jax.process_index() == 0:  # before the progress bar draws its first line
    print("\n".join(run.banner), flush=True)
  try:
    stop, logger = _StopSignal(), StepLog(run, progress)
    ledger = goodput.Ledger(run.workdir, run.goodput, enabled=jax.process_index() == 0)
    logger.goodput_row = ledger.fractions
  except BaseException:
    run.close()
    raise
  try:
    step, interrupted = _loop(run, logger, stop, ledger)
    with run.goodput.phase("checkpoint_save"):  # the last async save's commit
      run.checkpointer.wait()
    fractions = ledger.save()  # while the workdir lock is still held
  finally:
    try:
      run.close()
    finally:
      logger.close()
      stop.restore()

  if logger.skipped:
    log.warning(
      "%d step(s) had non-finite values and were skipped: %s",
      len(logger.skipped),
      logger.skipped[:20],
    )
  log.info(
    "peak FLOP/s per device for MFU: %.3g (%s)", run.throughput.peak_flops, run.throughput.peak_note
  )
  if jax.process_index() == 0:
    print(goodput.summary_line(fractions), flush=True)
  check_run_end(
    step - run.first_step, logger.skipped, logger.eval_history, run.checkpointer.latest_step()
  )
  return TrainResult(
    run.state,
    final_model(run),
    run.tokenizer,
    logger.history,
    logger.eval_history,
    interrupted,
    time.time() - run.started,
    list(logger.skipped),
    fractions,
  )


def _loop(run: Run, logger: StepLog, stop: _StopSignal, ledger: goodput.Ledger) -> tuple[int, bool]:
  """Steps from `run.first_step` to `run.last_step` (or a stop signal), with validation and
  checkpoints; returns the step reached and whether the run stopped before `train.steps`."""
  train_cfg = run.cfg.train
  step, interrupted = run.first_step, False
  timer = run.goodput
  timer.begin_loop(step)
  while step < run.last_step:
    with timer.phase("data"):
      batch = to_global(next(run.train_iter), run.batch_sharding)
    started = time.perf_counter()
    run.state, device_metrics = run.train_step(run.state, batch)
    if step == run.first_step:
      jax.block_until_ready(device_metrics)
      if jax.process_index() == 0:
        print(f"first step {time.perf_counter() - started:.1f}s", flush=True)
    step += 1
    logger.push(step, device_metrics)
    if (
      run.val_batches
      and train_cfg.eval_every > 0
      and due(step, train_cfg.eval_every, train_cfg.steps)
    ):
      logger.flush()
      with timer.phase("eval"):
        logger.validation(step, run.evaluate())
    timer.lap(step, first=step == run.first_step + 1)
    checkpoint = due(step, train_cfg.checkpoint_every)
    if checkpoint:  # before the save: a run killed during it has still done this step
      timer.mark(step)
    if checkpoint or due(step, train_cfg.log_every, run.last_step):
      ledger.save()
    if checkpoint:
      _save_unless_skipped(run, logger, step)
    if stop.any_process_requested():
      interrupted = True
      break
  logger.flush()
  if step != run.first_step or run.resumed_from is None:
    timer.mark(step)
    _save_unless_skipped(run, logger, step, force=True)
  return step, interrupted or step < train_cfg.steps


def check_run_end(
  steps_run: int, skipped: list[int], eval_history: list[dict], last_checkpoint: int | None
) -> None:
  """Raises `NonFiniteLossError` when the run learned nothing usable: every step it ran was
  skipped (non-finite), or its last validation loss is not finite."""
  kept = (
    f"the last checkpoint is step {last_checkpoint}"
    if last_checkpoint is not None
    else "no checkpoint was written"
  )
  if steps_run > 0 and len(skipped) >= steps_run:
    raise NonFiniteLossError(
      f"every step of this run ({steps_run} of {steps_run}) was skipped: its loss, gradients, "
      f"new params or optimizer state were never finite, so nothing was learned and {kept}; "
      "check the model settings (e.g. model.rms_norm_eps > 0) and the data, or lower optim.lr"
    )
  if eval_history and not math.isfinite(eval_history[-1]["loss"]):
    last = eval_history[-1]
    raise NonFiniteLossError(
      f"the validation loss at step {last['step']} is {last['loss']}: the model's outputs "
      f"are not finite ({kept}); check the model settings and the data, or lower optim.lr"
    )


def final_model(run: Run) -> nnx.Module:
  """The trained params gathered to host and merged into a model (for sampling, notebooks)."""
  params = run.state.params
  if jax.process_count() > 1:  # other processes' shards are not addressable here
    params = multihost_utils.process_allgather(params, tiled=True)
  return nnx.merge(run.graphdef, jax.device_get(params))
