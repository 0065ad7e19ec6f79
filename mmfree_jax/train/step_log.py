"""The training loop's per-step bookkeeping: metric rows, the NaN policy, progress output.

`StepLog` reads each step's metrics one step late (so the host never stalls the device),
decides what a skipped update means (`train.nan_policy`, `train.max_consecutive_skips`),
writes `metrics.jsonl`/tracker rows and drives the progress bar or the log lines.
"""

from __future__ import annotations

import logging
import time

import jax

from mmfree_jax.numerics.loss import perplexity
from mmfree_jax.train import banner

log = logging.getLogger("mmfree_jax")


class NonFiniteLossError(RuntimeError):
  """A run that cannot go on (or ended) because its values are not finite: with
  nan_policy='stop' a skipped step, too many skipped steps in a row, a run whose every step
  was skipped, or a non-finite final validation loss."""


class StepLog:
  """Reads a step's metrics one step late (no device stall), applies the NaN policy, writes
  metric rows and drives the progress bar (a terminal) or the log lines (batch jobs)."""

  def __init__(self, run, progress: bool):
    self.run = run
    self.cfg = run.cfg.train
    self.history: list[dict] = []
    self.eval_history: list[dict] = []
    self.skipped: list[int] = []  # steps whose non-finite update was not applied
    self.consecutive_skips = 0
    self.pending = None  # (step, metrics on device)
    self.last_time = time.perf_counter()
    self.bar = self.lines = None
    self.goodput_row = None  # () -> the workdir's goodput fractions, added to logged rows
    is_main = jax.process_index() == 0
    if is_main and not (progress and banner.is_interactive()):
      self.lines = banner.StepLines(
        run.first_step, run.last_step, self.cfg.steps, self.cfg.log_every
      )
    elif is_main:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top  # optional terminal UI

      m = run.model_cfg
      self.bar = tqdm(
        total=self.cfg.steps,
        initial=run.first_step,
        unit="step",
        dynamic_ncols=True,
        desc=f"{m.kind} d={m.d_model} L={m.num_layers}",
      )

  def push(self, step: int, device_metrics) -> None:
    self.flush()
    self.pending = (step, device_metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, device_metrics = self.pending
    self.pending = None
    m = jax.device_get(device_metrics)
    now = time.perf_counter()
    row = {k: float(v) for k, v in m.items()}
    self.check_finite(step, row)
    row.update(self.run.throughput.row(now - self.last_time))
    self.last_time = now
    row["perplexity"] = perplexity(row["loss"])
    row["step"] = step
    self.history.append(row)
    if due(step, self.cfg.log_every, self.run.last_step):
      scalars = {k: v for k, v in row.items() if k != "step"}
      if self.goodput_row is not None:  # cumulative, at log steps only (not in `history`)
        scalars.update(self.goodput_row())
      self.run.writer.write(step, scalars)
    if self.lines is not None:
      self.lines.maybe_print(step, row)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(
        loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{row['lr']:.2e}"
      )

  @property
  def last_skipped(self) -> bool:
    """Whether the last flushed step's update was skipped (then nothing is checkpointed)."""
    return self.consecutive_skips > 0

  def check_finite(self, step: int, row: dict) -> None:
    if row["finite"] >= 1.0:
      self.consecutive_skips = 0
      return
    self.skipped.append(step)
    self.consecutive_skips += 1
    msg = (
      f"non-finite values at step {step} (loss={row['loss']}, grad_norm="
      f"{row['grad_norm']}): the update was skipped (the loss, a gradient, the new params "
      "or the optimizer state was not finite)"
    )
    stop = (
      "Lower optim.lr or check the data; the last checkpoint "
      f"({self.run.checkpointer.latest_step()}) is intact"
    )
    if self.cfg.nan_policy == "stop":
      raise NonFiniteLossError(f"{msg}; stopping (train.nan_policy='stop'). {stop}")
    if self.consecutive_skips > self.cfg.max_consecutive_skips:
      raise NonFiniteLossError(
        f"{msg}; {self.consecutive_skips} updates in a row were non-finite, more than "
        f"train.max_consecutive_skips={self.cfg.max_consecutive_skips}: giving up "
        f"({len(self.skipped)} skipped steps in all). {stop}"
      )
    log.warning(msg)

  def validation(self, step: int, ev: dict) -> None:
    self.eval_history.append(dict(ev, step=step))
    self.run.writer.write(step, {"loss": ev["loss"], "perplexity": ev["perplexity"]}, prefix="val_")
    text = f"step {step}: val loss {ev['loss']:.4f} (ppl {ev['perplexity']:.1f})"
    if self.bar is not None:
      self.bar.write(text)
    elif self.lines is not None:  # --noprogress / no terminal: the same line in the log
      print(text, file=self.lines.stream, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def due(step: int, every: int, last: int | None = None) -> bool:
  """Every `every` steps (0 = never) and at `last`."""
  return (every > 0 and step % every == 0) or step == last
