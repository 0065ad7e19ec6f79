"""The trainer: `setup` builds a run (mesh, state, steps, iterators, checkpoints, metrics), then
`train` runs a short loop over it.

`train(cfg, workdir)` is what `train.py` runs and what notebooks call. Starting in a workdir
that holds checkpoints resumes from the latest (params, optimizer, step, RNG, data position).
The steps themselves are pure jitted functions (`steps.py`); this module only moves data,
metrics and checkpoints around them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mmfree_jax import accounting
from mmfree_jax import config as config_lib
from mmfree_jax import data as data_lib
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.data.cache import default_cache_dir
from mmfree_jax.numerics.loss import perplexity
from mmfree_jax.parallel import distributed, sharding
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.train import distill
from mmfree_jax.train import banner, optim, steps, trackers
from mmfree_jax.train import metrics as metrics_lib
from mmfree_jax.train import state as state_lib
from mmfree_jax.train.workdir_lock import WorkdirLock

log = logging.getLogger("mmfree_jax")


class NonFiniteLossError(RuntimeError):
  """Raised with nan_policy='stop' when a step produced a non-finite loss or gradient."""


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


def check_workdir_writable(workdir: str) -> None:
  """Fails before any compute if the workdir cannot be created or written."""
  if "://" in workdir:  # os.makedirs would make a local folder named 'gs:'
    raise ValueError(f"workdir {workdir!r}: object-storage workdirs (gs://, s3://) are not "
                     "supported yet; mount the bucket (e.g. Cloud Storage FUSE) and pass "
                     "its local path")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir on a "
                  "writable disk with free space") from e


def check_disk_space(workdir: str, needed_bytes: int) -> None:
  """Fails before compute if the workdir's disk cannot hold one more checkpoint."""
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise OSError(f"workdir {workdir!r} has {free / 2**20:.1f} MiB free but one checkpoint "
                  f"needs about {needed_bytes / 2**20:.1f} MiB; free space or pass another "
                  "--workdir")


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
        f"available steps: {steps_found}")
  newer = [s for s in steps_found if s > restore_step]
  if newer and jax.process_index() == 0:
    aside = ckpt_lib.move_aside(workdir, newer, "newer")
    log.warning("moved checkpoints %s (newer than --restore_step=%d) to %s", newer,
                restore_step, aside)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("select_restore_step")
  return restore_step


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_batch_layout(train_cfg, mesh) -> None:
  """Global batch must split evenly into microbatches and each microbatch over data shards."""
  batch, micro = train_cfg.global_batch, train_cfg.microbatches
  shards = mesh_lib.data_parallel_size(mesh)
  if micro < 1 or batch % micro:
    raise ValueError(f"train.global_batch={batch} is not divisible by train.microbatches="
                     f"{micro}; pick microbatches dividing the global batch")
  if (batch // micro) % shards:
    raise ValueError(
        f"the microbatch of {batch // micro} rows (global_batch {batch} / microbatches {micro}) "
        f"is not divisible by the {shards} data shards (mesh data x fsdp); set "
        f"--config.train.global_batch to a multiple of {shards * micro}")
  if batch % jax.process_count():
    raise ValueError(f"train.global_batch={batch} is not divisible by the "
                     f"{jax.process_count()} processes")


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


def _to_global(batch: dict, batch_sharding) -> dict:
  """Process-local numpy rows → one global jax.Array per key, sharded over the batch axis."""
  out = {}
  for key, local in batch.items():
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(batch_sharding, np.asarray(local),
                                                      global_shape)
  return out


def _evaluate(eval_step, params, batches, batch_sharding) -> dict:
  nll, tokens = 0.0, 0.0
  for batch in batches:
    out = eval_step(params, _to_global(batch, batch_sharding))
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
  loss = nll / max(tokens, 1.0)
  return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by `setup`."""
  cfg: ml_collections.ConfigDict
  model_cfg: config_lib.ModelConfig
  workdir: str
  graphdef: Any
  state: state_lib.TrainState
  train_step: Any           # jitted (state, batch) -> (state, metrics)
  eval_step: Any            # jitted (params, batch) -> {"nll_sum", "tokens"}
  batch_sharding: Any
  tokenizer: Any
  train_iter: Any           # grain iterator; its position is checkpointed
  val_batches: list
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricsWriter
  throughput: metrics_lib.Throughput
  first_step: int
  last_step: int
  resumed_from: int | None
  started: float
  lock: WorkdirLock | None = None
  banner: list[str] = dataclasses.field(default_factory=list)

  def save(self, step: int, force: bool = False) -> None:
    """Checkpoints `state` at `step` (once per step; never with non-finite params)."""
    if self.checkpointer.has_step(step):  # e.g. a periodic save just wrote this step
      return
    if not bool(_all_finite(self.state.params)):
      raise NonFiniteLossError(
          f"params are not finite at step {step}; not checkpointing. The last checkpoint "
          f"({self.checkpointer.latest_step()}) is intact")
    self.checkpointer.save(step, self.state, self.train_iter, json.loads(self.cfg.to_json()),
                           force=force)

  def evaluate(self) -> dict:
    return _evaluate(self.eval_step, self.state.params, self.val_batches, self.batch_sharding)

  def close(self) -> None:
    try:
      self.checkpointer.close()
      self.writer.close()
    finally:
      if self.lock is not None:
        self.lock.release()


def check_steps_unchanged(saved_config: dict, cfg, step: int, allow: bool) -> None:
  """Refuses (unless `allow`) a resume whose train.steps differs from the checkpoint's: the LR
  schedule spans train.steps, so changing it moves the decay under a run already in it."""
  saved = saved_config.get("train", {}).get("steps")
  if saved is None or saved == cfg.train.steps:
    return
  msg = (f"train.steps changed from {saved} (checkpoint step {step}) to {cfg.train.steps}: the "
         f"{cfg.optim.schedule} LR schedule spans train.steps, so the learning rate would jump "
         "mid-run")
  if not allow:
    raise ValueError(msg + "; pass --allow_steps_change (train(..., allow_steps_change=True)) "
                     f"to accept that, or keep --config.train.steps={saved}")
  log.warning("%s (accepted: allow_steps_change)", msg)


def _note(text: str) -> None:
  log.warning(text)
  if jax.process_index() == 0:
    print(f"note: {text}", flush=True)


def setup(cfg: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None,
          restore_step: int | None = None, allow_steps_change: bool = False) -> Run:
  """Validates `cfg` and builds the run: every user error is raised here, before compute.

  Takes the workdir lock (process 0) and closes everything it opened when it raises.
  """
  started = time.time()
  distributed.maybe_initialize(cfg.dist)
  model_cfg = config_lib.validate(cfg)
  config_lib.validate_run(cfg)
  warmup_note = config_lib.fit_warmup(cfg)
  if warmup_note:
    _note(warmup_note)
  train_cfg = cfg.train
  schedule = optim.learning_rate_schedule(cfg.optim, train_cfg.steps)
  tx = optim.make_optimizer(cfg.optim, train_cfg.steps)
  mesh = mesh_lib.make_mesh(cfg.mesh.shape, dcn_cfg=cfg.mesh.dcn)
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  check_batch_layout(train_cfg, mesh)
  check_workdir_writable(workdir)
  is_main = jax.process_index() == 0
  lock = WorkdirLock(workdir).acquire() if is_main else None
  checkpointer = writer = None
  try:
    latest = select_restore_step(workdir, restore_step)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
    if latest is not None:  # refuse another architecture's checkpoint before any compute
      saved_config = checkpointer.read_config(latest)
      ckpt_lib.check_compatible(saved_config, cfg.model.to_dict(), checkpointer.directory)
      if checkpointer.has_train_state(latest):
        check_steps_unchanged(saved_config, cfg, latest, allow_steps_change)

    distiller = distill.setup(cfg, model_cfg, mesh, rules)  # None: plain training
    cache_dir = default_cache_dir()
    procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
    tokenizer = data_lib.tokenizer_from_config(cfg.data, cache_dir=cache_dir)
    data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
    train_iter = data_lib.train_iterator(cfg.data, tokenizer, global_batch=train_cfg.global_batch,
                                         cache_dir=cache_dir, **procs)
    val_batches = data_lib.validation_batches(
        cfg.data, tokenizer, batch_size=train_cfg.global_batch,
        num_batches=train_cfg.eval_batches, cache_dir=cache_dir,
        **procs) if train_cfg.eval_batches > 0 else []

    graphdef = state_lib.model_graphdef(model_cfg)
    state_shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    abstract_state = state_lib.abstract_train_state(model_cfg, tx, state_shardings)
    check_disk_space(workdir, sum(x.size * x.dtype.itemsize
                                  for x in jax.tree.leaves(abstract_state)))

    if latest is not None and checkpointer.has_train_state(latest):
      state = checkpointer.restore(latest, abstract_state, train_iter)
      resume = f"resumed from step {latest}"
    elif latest is not None:  # params only (imported weights): fine-tune with a fresh optimizer
      params = checkpointer.restore_params(latest, abstract_state.params)
      state = state_lib.train_state_from_params(params, tx, latest, train_cfg.seed,
                                                state_shardings)
      resume = f"fine-tuning from the params of step {latest}"
    else:
      state = state_lib.create_sharded_train_state(model_cfg, tx, train_cfg.seed,
                                                   state_shardings)
      if distiller is not None:  # the student starts from the teacher (distill.init)
        # distill.calibrate reads the batch step 0 trains on, from an iterator of its own.
        first_batch = lambda: _to_global(next(iter(data_lib.train_iterator(
            cfg.data, tokenizer, global_batch=train_cfg.global_batch, cache_dir=cache_dir,
            **procs))), batch_sharding)
        state = distiller.init_state(state, tx, train_cfg.seed, state_shardings, first_batch)
      resume = "fresh start"
    log.info("%s in %s", resume, checkpointer.directory)
    if is_main:  # rows of steps after the restored one are redone by this run
      dropped = metrics_lib.drop_rows_after(workdir, latest or 0)
      if dropped:
        _note(f"dropped {dropped} metrics.jsonl row(s) after step {latest or 0}: this run "
              "redoes those steps")
    run = _finish_setup(cfg, model_cfg, workdir, tx, schedule, mesh, rules, state_shardings,
                        batch_sharding, graphdef, state, tokenizer, train_iter, val_batches,
                        checkpointer, stop_after_steps, latest, started, lock)
    if distiller is not None:  # same contract: (state, batch) -> (state, metrics)
      run.train_step = distiller.stepper(
          graphdef, tx, schedule, microbatches=train_cfg.microbatches, z_loss=cfg.optim.z_loss,
          shardings=state_shardings, batch_sharding=batch_sharding, first_step=run.first_step)
    writer = run.writer
    run.banner = banner.banner_lines(cfg, model_cfg, mesh, abstract_state.params,
                                     os.path.abspath(workdir), resume)
    if distiller is not None:
      run.banner.append(distiller.banner_line())
    return run
  except BaseException:
    try:
      if checkpointer is not None:
        checkpointer.close()
      if writer is not None:
        writer.close()
    finally:
      if lock is not None:
        lock.release()
    raise


def _finish_setup(cfg, model_cfg, workdir, tx, schedule, mesh, rules, state_shardings,
                  batch_sharding, graphdef, state, tokenizer, train_iter, val_batches,
                  checkpointer, stop_after_steps, latest, started, lock) -> Run:
  """The jitted steps, workdir config, metrics sinks and step range of a run."""
  train_cfg = cfg.train
  is_main = jax.process_index() == 0
  train_step = jax.jit(
      steps.make_train_step(model_cfg, graphdef, tx, schedule,
                            microbatches=train_cfg.microbatches, z_loss=cfg.optim.z_loss,
                            mesh=mesh, rules=rules),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(model_cfg, graphdef, mesh=mesh, rules=rules),
                      in_shardings=(state_shardings.params, batch_sharding),
                      out_shardings=sharding.replicated(mesh))

  if is_main:
    loading.save_workdir_config(workdir, cfg)
  peak, peak_source, peak_note = metrics_lib.device_peak_flops(
      train_cfg.peak_flops_per_device)
  throughput = metrics_lib.Throughput(
      train_cfg.global_batch * cfg.data.seq_len,
      accounting.train_flops_per_token(model_cfg, cfg.data.seq_len), peak, peak_source,
      jax.device_count(), peak_note)
  first_step = int(state.step)
  last_step = train_cfg.steps
  if stop_after_steps is not None:
    last_step = min(last_step, first_step + stop_after_steps)
  tracker = trackers.make_tracker(train_cfg.tracker, workdir, cfg.to_dict()) if is_main else None
  return Run(cfg, model_cfg, workdir, graphdef, state, train_step, eval_step, batch_sharding,
             tokenizer, train_iter, val_batches, checkpointer,
             metrics_lib.MetricsWriter(workdir, enabled=is_main, tracker=tracker), throughput,
             first_step, last_step, latest, started, lock)


class StepLog:
  """Reads a step's metrics one step late (no device stall), applies the NaN policy, writes
  metric rows and drives the progress bar (a terminal) or the log lines (batch jobs)."""

  def __init__(self, run: Run, progress: bool):
    self.run = run
    self.cfg = run.cfg.train
    self.history: list[dict] = []
    self.eval_history: list[dict] = []
    self.skipped: list[int] = []  # steps whose non-finite update was not applied
    self.consecutive_skips = 0
    self.pending = None  # (step, metrics on device)
    self.last_time = time.perf_counter()
    self.bar = self.lines = None
    is_main = jax.process_index() == 0
    if is_main and not (progress and banner.is_interactive()):
      self.lines = banner.StepLines(run.first_step, run.last_step, self.cfg.steps,
                                    self.cfg.log_every)
    elif is_main:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top  # optional terminal UI
      m = run.model_cfg
      self.bar = tqdm(total=self.cfg.steps, initial=run.first_step, unit="step",
                      dynamic_ncols=True, desc=f"{m.kind} d={m.d_model} L={m.num_layers}")

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
    if _due(step, self.cfg.log_every, self.run.last_step):
      self.run.writer.write(step, {k: v for k, v in row.items() if k != "step"})
    if self.lines is not None:
      self.lines.maybe_print(step, row)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                           lr=f"{row['lr']:.2e}")

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
    msg = (f"non-finite loss or gradient at step {step} (loss={row['loss']}, "
           f"grad_norm={row['grad_norm']}); the update was skipped")
    stop = ("Lower optim.lr or check the data; the last checkpoint "
            f"({self.run.checkpointer.latest_step()}) is intact")
    if self.cfg.nan_policy == "stop":
      raise NonFiniteLossError(f"{msg}; stopping (train.nan_policy='stop'). {stop}")
    if self.consecutive_skips > self.cfg.max_consecutive_skips:
      raise NonFiniteLossError(
          f"{msg}; {self.consecutive_skips} updates in a row were non-finite, more than "
          f"train.max_consecutive_skips={self.cfg.max_consecutive_skips}: giving up "
          f"({len(self.skipped)} skipped steps in all). {stop}")
    log.warning(msg)

  def validation(self, step: int, ev: dict) -> None:
    self.eval_history.append(dict(ev, step=step))
    self.run.writer.write(step, {"loss": ev["loss"], "perplexity": ev["perplexity"]},
                          prefix="val_")
    if self.bar is not None:
      self.bar.write(f"step {step}: val loss {ev['loss']:.4f} (ppl {ev['perplexity']:.1f})")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _due(step: int, every: int, last: int | None = None) -> bool:
  """Every `every` steps (0 = never) and at `last`."""
  return (every > 0 and step % every == 0) or step == last


def _save_unless_skipped(run: Run, logger: StepLog, step: int, force: bool = False) -> None:
  """Checkpoints `step` unless its update was skipped for non-finite values."""
  logger.flush()  # the step's metrics say whether its update was applied
  if logger.last_skipped:
    log.warning("not checkpointing step %d: its update was skipped (non-finite); the last "
                "checkpoint is %s", step, run.checkpointer.latest_step())
    return
  run.save(step, force=force)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          stop_after_steps: int | None = None, restore_step: int | None = None,
          allow_steps_change: bool = False) -> TrainResult:
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
  run = setup(cfg, workdir, stop_after_steps=stop_after_steps, restore_step=restore_step,
              allow_steps_change=allow_steps_change)
  try:
    stop, logger = _StopSignal(), StepLog(run, progress)
  except BaseException:
    run.close()
    raise
  is_main = jax.process_index() == 0
  if is_main:
    print("\n".join(run.banner), flush=True)
  interrupted, step = False, run.first_step
  eval_every = cfg.train.eval_every
  try:
    while step < run.last_step:
      batch = _to_global(next(run.train_iter), run.batch_sharding)
      if step == run.first_step and is_main:
        print("compiling the train step...", end="", flush=True)
        compile_started = time.perf_counter()
      run.state, device_metrics = run.train_step(run.state, batch)
      if step == run.first_step:
        jax.block_until_ready(device_metrics)
        if is_main:
          print(f" done: first step {time.perf_counter() - compile_started:.1f}s (compile + "
                "run)", flush=True)
      step += 1
      logger.push(step, device_metrics)
      if run.val_batches and eval_every > 0 and _due(step, eval_every, cfg.train.steps):
        logger.flush()
        logger.validation(step, run.evaluate())
      if _due(step, cfg.train.checkpoint_every):
        _save_unless_skipped(run, logger, step)
      if stop.any_process_requested():
        interrupted = True
        break
    logger.flush()
    interrupted = interrupted or step < cfg.train.steps
    if step != run.first_step or run.resumed_from is None:
      _save_unless_skipped(run, logger, step, force=True)
  finally:
    try:
      run.close()
    finally:
      logger.close()
      stop.restore()

  if logger.skipped:
    log.warning("%d step(s) had non-finite values and were skipped: %s", len(logger.skipped),
                logger.skipped[:20])
  log.info("peak FLOP/s per device for MFU: %.3g (%s)", run.throughput.peak_flops,
           run.throughput.peak_note)
  return TrainResult(run.state, final_model(run), run.tokenizer, logger.history,
                     logger.eval_history, interrupted, time.time() - run.started,
                     list(logger.skipped))


def final_model(run: Run) -> nnx.Module:
  """The trained params gathered to host and merged into a model (for sampling, notebooks)."""
  params = run.state.params
  if jax.process_count() > 1:  # other processes' shards are not addressable here
    params = multihost_utils.process_allgather(params, tiled=True)
  return nnx.merge(run.graphdef, jax.device_get(params))
