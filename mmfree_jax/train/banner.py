"""What the operator sees: the start-up banner and the per-step log lines of batch jobs.

The banner says what will run (parameters, devices and mesh, tokens per step, the
implementations chosen, workdir, resume point); `StepLines` prints `step, loss, tokens/s, MFU,
ETA` every `train.log_every` steps when there is no progress bar (no TTY, `--noprogress`), so
SLURM / batch logs show progress.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from mmfree_jax.config import describe_impls


def _human(n: float) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(int(n))


def _seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def banner_lines(cfg, model_cfg, mesh, params, workdir: str, resume: str) -> list[str]:
  """The start-up banner; `params` may be abstract (shapes only)."""
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  mesh_shape = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  tokens = cfg.train.global_batch * cfg.data.seq_len
  m = model_cfg
  compute = np.dtype(m.compute_dtype).name
  dtype = f"{m.dtype} -> {compute}" if m.dtype != compute else compute
  impls = (
    describe_impls(m, mesh.devices.flat[0].platform)
    + f"; dtype={dtype} param_dtype={m.param_dtype} remat={m.remat}"
  )
  return [
    f"model: {m.kind} d_model={m.d_model} num_layers={m.num_layers} vocab={m.vocab_size}: "
    f"{n_params:,} params ({_human(n_params)})",
    f"devices: {len(devices)} x {'/'.join(kinds)} ({jax.default_backend()}) in "
    f"{jax.process_count()} process(es); mesh {mesh_shape}",
    f"batch: {cfg.train.global_batch} x {cfg.data.seq_len} = {tokens:,} tokens/step "
    f"(microbatches {cfg.train.microbatches}); {cfg.train.steps} steps = "
    f"{_human(tokens * cfg.train.steps)} tokens; lr {cfg.optim.lr:g} {cfg.optim.schedule}, "
    f"warmup {cfg.optim.warmup_steps}",
    f"implementations: {impls}",
    f"workdir: {workdir}; {resume}",
  ]


def is_interactive() -> bool:
  """A terminal or a notebook (tqdm.auto draws a widget there); batch jobs get log lines."""
  return sys.stderr.isatty() or "ipykernel" in sys.modules


class StepLines:
  """`step N/T: loss, tokens/s, MFU, ETA` lines every `every` steps (and at the last)."""

  def __init__(self, first_step: int, last_step: int, total_steps: int, every: int, stream=None):
    self.first, self.last, self.total, self.every = first_step, last_step, total_steps, every
    self.stream = stream or sys.stdout
    self.started = time.perf_counter()
    self.rate_from = None  # (step, time) after the first (compiling) step: the ETA's base

  def maybe_print(self, step: int, row: dict) -> None:
    now = time.perf_counter()
    if self.rate_from is None:
      self.rate_from = (step, now)
    if not ((self.every > 0 and step % self.every == 0) or step == self.last):
      return
    elapsed = now - self.started
    done, since = step - self.rate_from[0], now - self.rate_from[1]
    eta = since / done * (self.last - step) if done else 0.0
    print(
      f"step {step}/{self.total}: loss {row['loss']:.4f}, lr {row['lr']:.3g}, "
      f"{row['tokens_per_s']:,.0f} tokens/s, MFU {100 * row['mfu']:.2f}%, "
      f"elapsed {_seconds(elapsed)}, ETA {_seconds(eta)}",
      file=self.stream,
      flush=True,
    )
