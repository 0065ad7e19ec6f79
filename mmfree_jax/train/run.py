"""`setup`: a run built from a config (mesh, state, steps, iterators, checkpoints, metrics).

Every user error is raised here, before compute (and before the data is read where it can be):
config, mesh and batch layout, workdir and lock, the checkpoint to resume, the teacher, the
step's memory, the data. The loop that runs a `Run` is `trainer.train`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from mmfree_jax import accounting, paths
from mmfree_jax import config as config_lib
from mmfree_jax import data as data_lib
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.data.cache import default_cache_dir
from mmfree_jax.data.pipeline import process_batch_block
from mmfree_jax.numerics.loss import perplexity
from mmfree_jax.parallel import distributed, sharding
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.train import (
  banner,
  checks,
  distill,
  goodput,
  memory,
  optim,
  steps,
  trackers,
)
from mmfree_jax.train import metrics as metrics_lib
from mmfree_jax.train import state as state_lib
from mmfree_jax.train.step_log import NonFiniteLossError
from mmfree_jax.train.workdir_lock import WorkdirLock

log = logging.getLogger("mmfree_jax")


def _batch_block(batch_sharding) -> tuple[int, int]:
  """This process's block of the global batch and the number of blocks (processes sharing
  the batch rows of their devices, a context axis across hosts, load the same block)."""
  return process_batch_block(batch_sharding.mesh, batch_sharding.spec[0], jax.process_index())


def to_global(batch: dict, batch_sharding) -> dict:
  """Process-local numpy rows → one global jax.Array per key, sharded over the batch axis."""
  out = {}
  blocks = _batch_block(batch_sharding)[1]
  for key, local in batch.items():
    global_shape = (local.shape[0] * blocks,) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(
      batch_sharding, np.asarray(local), global_shape
    )
  return out


def evaluate(eval_step, params, batches, batch_sharding) -> dict:
  """Mean NLL per target token over `batches`, its perplexity and the token count."""
  nll, tokens = 0.0, 0.0
  for batch in batches:
    out = eval_step(params, to_global(batch, batch_sharding))
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
  loss = nll / max(tokens, 1.0)
  return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


def note(text: str) -> None:
  """A warning for the person at the terminal: printed once by process 0 (logging it as well
  showed it twice in a batch job's log), logged by the others."""
  if jax.process_index() == 0:
    print(f"note: {text}", flush=True)
  else:
    log.warning(text)


@dataclasses.dataclass
class Layout:
  """A run's optimizer, mesh and shardings: from the config alone, nothing on device."""

  tx: optax.GradientTransformationExtraArgs
  schedule: optax.Schedule
  mesh: Any
  rules: tuple
  graphdef: Any
  state_shardings: state_lib.TrainState
  batch_sharding: Any
  abstract_state: state_lib.TrainState

  @classmethod
  def from_config(cls, cfg, model_cfg: config_lib.ModelConfig) -> Layout:
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, dcn_cfg=cfg.mesh.dcn)
    rules = sharding.normalize_rules(cfg.mesh.axis_rules)
    shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
    return cls(
      tx,
      optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
      mesh,
      rules,
      state_lib.model_graphdef(model_cfg),
      shardings,
      sharding.batch_sharding(mesh, rules),
      state_lib.abstract_train_state(model_cfg, tx, shardings),
    )

  def abstract_batch(self, cfg) -> dict:
    """ShapeDtypeStructs of one global batch (int32 `[global_batch, seq_len + 1]`)."""
    shape = (cfg.train.global_batch, cfg.data.seq_len + 1)
    window = jax.ShapeDtypeStruct(shape, np.int32, sharding=self.batch_sharding)
    return {"tokens": window, "segment_ids": window}


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by `setup`."""

  cfg: ml_collections.ConfigDict
  model_cfg: config_lib.ModelConfig
  workdir: str
  graphdef: Any
  state: state_lib.TrainState
  train_step: Any  # jitted (state, batch) -> (state, metrics)
  eval_step: Any  # jitted (params, batch) -> {"nll_sum", "tokens"}
  batch_sharding: Any
  tokenizer: Any
  train_iter: Any  # grain iterator; its position is checkpointed
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
  goodput: goodput.Recorder = dataclasses.field(default_factory=goodput.Recorder)

  def save(self, step: int, force: bool = False) -> None:
    """Checkpoints `state` at `step` (once per step; never a non-finite state)."""
    if self.checkpointer.has_step(step):  # e.g. a periodic save just wrote this step
      return
    if not bool(_all_finite(self.state)):
      raise NonFiniteLossError(
        f"the train state is not finite at step {step}; not checkpointing. The last "
        f"checkpoint ({self.checkpointer.latest_step()}) is intact"
      )
    self.checkpointer.save(
      step, self.state, self.train_iter, json.loads(self.cfg.to_json()), force=force
    )
    self.writer.sync()

  def evaluate(self) -> dict:
    return evaluate(self.eval_step, self.state.params, self.val_batches, self.batch_sharding)

  def close(self) -> None:
    try:
      self.checkpointer.close()
      self.writer.close()
    finally:
      if self.lock is not None:
        self.lock.release()


_all_finite = jax.jit(optim.all_finite)


@dataclasses.dataclass
class _Data:
  tokenizer: Any
  train_iter: Any
  val_batches: list
  first_batch: Callable[[], dict]  # a fresh iterator's first global batch (distill.calibrate)


def _data(cfg, model_cfg, batch_sharding) -> _Data:
  cache_dir = default_cache_dir()
  block, blocks = _batch_block(batch_sharding)
  procs = {"process_index": block, "process_count": blocks}
  tokenizer = data_lib.tokenizer_from_config(cfg.data, cache_dir=cache_dir)
  data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  iterator = lambda: data_lib.train_iterator(
    cfg.data, tokenizer, global_batch=cfg.train.global_batch, cache_dir=cache_dir, **procs
  )
  val_batches = (
    data_lib.validation_batches(
      cfg.data,
      tokenizer,
      batch_size=cfg.train.global_batch,
      num_batches=cfg.train.eval_batches,
      cache_dir=cache_dir,
      **procs,
    )
    if cfg.train.eval_batches > 0
    else []
  )
  first_batch = lambda: to_global(next(iter(iterator())), batch_sharding)
  return _Data(tokenizer, iterator(), val_batches, first_batch)


def _check_resume(cfg, checkpointer, latest: int | None, allow_steps_change: bool) -> None:
  """Refuses another architecture's checkpoint (and a changed schedule) before any compute."""
  if latest is None:
    return
  saved_config = checkpointer.read_config(latest)
  ckpt_lib.check_compatible(saved_config, cfg.model.to_dict(), checkpointer.directory)
  if checkpointer.has_train_state(latest):
    checks.check_steps_unchanged(saved_config, cfg, latest, allow_steps_change)


def _initial_state(
  cfg, model_cfg, layout: Layout, checkpointer, latest, data: _Data, distiller
) -> tuple[state_lib.TrainState, str]:
  """The state to start from and how it was obtained (for the banner)."""
  seed = cfg.train.seed
  if latest is not None and checkpointer.has_train_state(latest):
    return (
      checkpointer.restore(latest, layout.abstract_state, data.train_iter),
      f"resumed from step {latest}",
    )
  if latest is not None:  # params only (imported weights): fine-tune with a fresh optimizer
    params = checkpointer.restore_params(latest, layout.abstract_state.params)
    state = state_lib.train_state_from_params(
      params, layout.tx, latest, seed, layout.state_shardings
    )
    return state, f"fine-tuning from the params of step {latest}"
  state = state_lib.create_sharded_train_state(model_cfg, layout.tx, seed, layout.state_shardings)
  if distiller is not None:  # the student starts from the teacher (distill.init)
    state = distiller.init_state(state, layout.tx, seed, layout.state_shardings, data.first_batch)
  return state, "fresh start"


def _jit_steps(cfg, model_cfg, layout: Layout, distiller, first_step: int):
  """The jitted train step (the distillation stepper in distill mode) and eval step."""
  if distiller is not None:  # same contract: (state, batch) -> (state, metrics)
    train_step = distiller.stepper(
      layout.graphdef,
      layout.tx,
      layout.schedule,
      microbatches=cfg.train.microbatches,
      z_loss=cfg.optim.z_loss,
      shardings=layout.state_shardings,
      batch_sharding=layout.batch_sharding,
      first_step=first_step,
    )
  else:
    train_step = jax.jit(
      steps.make_train_step(
        model_cfg,
        layout.graphdef,
        layout.tx,
        layout.schedule,
        microbatches=cfg.train.microbatches,
        z_loss=cfg.optim.z_loss,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens,
        mesh=layout.mesh,
        rules=layout.rules,
      ),
      in_shardings=(layout.state_shardings, layout.batch_sharding),
      out_shardings=(layout.state_shardings, sharding.replicated(layout.mesh)),
      donate_argnums=0,
    )
  eval_step = jax.jit(
    steps.make_eval_step(
      model_cfg,
      layout.graphdef,
      loss_chunk_tokens=cfg.train.loss_chunk_tokens,
      mesh=layout.mesh,
      rules=layout.rules,
    ),
    in_shardings=(layout.state_shardings.params, layout.batch_sharding),
    out_shardings=sharding.replicated(layout.mesh),
  )
  return train_step, eval_step


def _writer(cfg, workdir: str) -> metrics_lib.MetricsWriter:
  is_main = jax.process_index() == 0
  tracker = trackers.make_tracker(cfg.train.tracker, workdir, cfg.to_dict()) if is_main else None
  return metrics_lib.MetricsWriter(workdir, enabled=is_main, tracker=tracker)


def _throughput(cfg, model_cfg) -> metrics_lib.Throughput:
  peak, peak_source, peak_note = metrics_lib.device_peak_flops(cfg.train.peak_flops_per_device)
  return metrics_lib.Throughput(
    cfg.train.global_batch * cfg.data.seq_len,
    accounting.train_flops_per_token(model_cfg, cfg.data.seq_len),
    peak,
    peak_source,
    jax.device_count(),
    peak_note,
  )


def _validate(cfg) -> config_lib.ModelConfig:
  model_cfg = config_lib.validate(cfg)
  warmup_note = config_lib.fit_warmup(cfg)
  if warmup_note:
    note(warmup_note)
  return model_cfg


def _record_start(cfg, workdir: str, latest: int | None) -> None:
  """Process 0: writes the run's config to the workdir and drops the metrics rows of steps
  after the restored one (this run redoes those steps)."""
  loading.save_workdir_config(workdir, cfg)
  dropped = metrics_lib.drop_rows_after(workdir, latest or 0)
  if dropped:
    note(
      f"dropped {dropped} metrics.jsonl row(s) after step {latest or 0}: this run "
      "redoes those steps"
    )


def _banner_lines(
  cfg, model_cfg, layout: Layout, workdir: str, resume: str, distiller, compiled: str
) -> list[str]:
  """The startup banner: the run's shape, the distiller's line (distill mode) and the step's
  compiled memory."""
  lines = banner.banner_lines(
    cfg, model_cfg, layout.mesh, layout.abstract_state.params, paths.absolute(workdir), resume
  )
  if distiller is not None:
    lines.append(distiller.banner_line())
  lines.append(compiled)
  return lines


def _lock(cfg, workdir: str) -> WorkdirLock:
  """The workdir's lock, taken (process 0 only)."""
  heartbeat_s, stale_s = cfg.train.lock_heartbeat_s, cfg.train.lock_stale_s
  return WorkdirLock(workdir, heartbeat_s=heartbeat_s, stale_s=stale_s).acquire()


def _close_opened(checkpointer, writer, lock) -> None:
  """Closes what a failed `setup` opened (None: not opened yet); the lock is released last."""
  try:
    if checkpointer is not None:
      checkpointer.close()
    if writer is not None:
      writer.close()
  finally:
    if lock is not None:
      lock.release()


def setup(
  cfg: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_after_steps: int | None = None,
  restore_step: int | None = None,
  allow_steps_change: bool = False,
) -> Run:
  """Validates `cfg` and builds the run: every user error is raised here, before compute.

  Takes the workdir lock (process 0) and closes everything it opened when it raises.
  """
  started, recorder = time.time(), goodput.Recorder()
  distributed.maybe_initialize(cfg.dist)
  model_cfg = _validate(cfg)
  layout = Layout.from_config(cfg, model_cfg)
  checks.check_batch_layout(cfg.train, layout.mesh)
  created = checks.missing_folders(workdir)
  checks.check_workdir_writable(workdir)
  is_main = jax.process_index() == 0
  lock = _lock(cfg, workdir) if is_main else None
  checkpointer = writer = None
  try:
    latest = checks.select_restore_step(workdir, restore_step)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    _check_resume(cfg, checkpointer, latest, allow_steps_change)
    distiller = distill.setup(cfg, model_cfg, layout.mesh, layout.rules)  # None: plain training
    checks.check_disk_space(
      workdir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layout.abstract_state))
    )
    train_step, eval_step = _jit_steps(cfg, model_cfg, layout, distiller, latest or 0)
    with recorder.phase("compile"):
      compiled = memory.check_step_memory(
        train_step, layout.abstract_state, layout.abstract_batch(cfg)
      )
    data = _data(cfg, model_cfg, layout.batch_sharding)
    with recorder.phase("checkpoint_restore" if latest is not None else None):
      state, resume = _initial_state(cfg, model_cfg, layout, checkpointer, latest, data, distiller)
    log.info("%s in %s", resume, checkpointer.directory)
    if is_main:
      _record_start(cfg, workdir, latest)
    first_step = int(state.step)
    last_step = (
      cfg.train.steps
      if stop_after_steps is None
      else min(cfg.train.steps, first_step + stop_after_steps)
    )
    writer = _writer(cfg, workdir)
    run = Run(
      cfg,
      model_cfg,
      workdir,
      layout.graphdef,
      state,
      train_step,
      eval_step,
      layout.batch_sharding,
      data.tokenizer,
      data.train_iter,
      data.val_batches,
      checkpointer,
      writer,
      _throughput(cfg, model_cfg),
      first_step,
      last_step,
      latest,
      started,
      lock,
    )
    run.banner = _banner_lines(cfg, model_cfg, layout, workdir, resume, distiller, compiled)
    run.goodput = recorder
    return run
  except BaseException:
    try:
      _close_opened(checkpointer, writer, lock)
    finally:
      _remove_if_empty(created)
    raise


def _remove_if_empty(folders: list[str]) -> None:
  """A failed start leaves none of the `folders` it created (innermost last) empty behind; a
  folder with anything in it stays."""
  for folder in reversed(folders):
    paths.remove_empty_dir(folder)
