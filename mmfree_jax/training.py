"""The training loop: config → data → sharded state → jitted steps → metrics and checkpoints.

`train(cfg, workdir)` is what `train.py` runs and what notebooks call. Starting in a workdir
that holds checkpoints resumes from the latest (params, optimizer, step, RNG, data position).
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

from mmfree_jax import checkpoint as ckpt_lib
from mmfree_jax import config as config_lib
from mmfree_jax import data as data_lib
from mmfree_jax import distributed, flops, loading, mesh as mesh_lib, metrics as metrics_lib
from mmfree_jax import optim, sharding, steps
from mmfree_jax import train_state as state_lib
from mmfree_jax.generate import SamplingConfig, generate

log = logging.getLogger("mmfree_jax")
NAN_POLICIES = ("skip", "stop")


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
  sample: str | None
  interrupted: bool
  wall_time_s: float


def default_cache_dir() -> str:
  return os.environ.get("MMFREE_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "mmfree_jax"))


def check_workdir_writable(workdir: str) -> None:
  """Fails before any compute if the workdir cannot be created or written."""
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
  deleted, so a run can continue from an older step (e.g. past a corrupted checkpoint).
  """
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
    aside = os.path.join(workdir, "abandoned_checkpoints", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for step in newer:
      shutil.move(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step)), aside)
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
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": tokens}


def train(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          stop_after_steps: int | None = None, sample_prompt: str | None = "In the beginning",
          restore_step: int | None = None) -> TrainResult:
  """Trains `cfg` in `workdir` (resuming from its latest checkpoint).

  Args:
    cfg: a full config (see `mmfree_jax.config.base_config`).
    workdir: checkpoints, metrics.jsonl, TensorBoard files and the config go here.
    progress: show a tqdm progress bar on process 0.
    stop_after_steps: stop (with a checkpoint) after this many steps of this call, as if
      preempted; None runs to `train.steps`.
    sample_prompt: text to continue at the end (None: no sample).
    restore_step: resume from this step instead of the latest (newer steps are moved to
      `WORKDIR/abandoned_checkpoints/`).
  """
  start_time = time.time()
  distributed.maybe_initialize(cfg.dist)
  model_cfg = config_lib.validate(cfg)
  train_cfg = cfg.train
  if train_cfg.nan_policy not in NAN_POLICIES:
    raise ValueError(f"unknown train.nan_policy {train_cfg.nan_policy!r}; choose one of "
                     f"{NAN_POLICIES}")
  schedule = optim.learning_rate_schedule(cfg.optim, train_cfg.steps)
  tx = optim.make_optimizer(cfg.optim, train_cfg.steps)
  mesh = mesh_lib.make_mesh(cfg.mesh.shape)
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  check_batch_layout(train_cfg, mesh)
  check_workdir_writable(workdir)
  is_main = jax.process_index() == 0

  latest = select_restore_step(workdir, restore_step)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
  if latest is not None:  # refuse another architecture's checkpoint before any compute
    ckpt_lib.check_compatible(checkpointer.read_config(latest), cfg.model.to_dict(),
                              checkpointer.directory)

  cache_dir = default_cache_dir()
  tokenizer = data_lib.tokenizer_from_config(cfg.data, cache_dir=cache_dir)
  data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  train_iter = data_lib.train_iterator(
      cfg.data, tokenizer, global_batch=train_cfg.global_batch,
      process_index=jax.process_index(), process_count=jax.process_count(),
      cache_dir=cache_dir)
  val_batches = data_lib.validation_batches(
      cfg.data, tokenizer, batch_size=train_cfg.global_batch, num_batches=train_cfg.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count(),
      cache_dir=cache_dir) if train_cfg.eval_batches > 0 else []

  graphdef = state_lib.model_graphdef(model_cfg)
  state_shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  abstract_state = state_lib.abstract_train_state(model_cfg, tx, state_shardings)
  check_disk_space(workdir, sum(x.size * x.dtype.itemsize
                                for x in jax.tree.leaves(abstract_state)))

  if latest is not None and checkpointer.has_train_state(latest):
    state = checkpointer.restore(latest, abstract_state, train_iter)
    log.info("resumed from step %d in %s", latest, checkpointer.directory)
  elif latest is not None:  # params only (imported weights): fine-tune with a fresh optimizer
    params = checkpointer.restore_params(latest, abstract_state.params)
    state = state_lib.train_state_from_params(params, tx, latest, train_cfg.seed,
                                              state_shardings)
    log.info("fine-tuning from the params of step %d in %s", latest, checkpointer.directory)
  else:
    state = state_lib.create_sharded_train_state(model_cfg, tx, train_cfg.seed, state_shardings)

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

  config_dict = json.loads(cfg.to_json())
  if is_main:
    loading.save_workdir_config(workdir, cfg)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  flops_per_token = flops.train_flops_per_token(model_cfg, cfg.data.seq_len)
  peak, peak_source = metrics_lib.device_peak_flops(train_cfg.peak_flops_per_device)
  tokens_per_step = train_cfg.global_batch * cfg.data.seq_len
  stop = _StopSignal()

  first_step = int(state.step)
  last_step = train_cfg.steps
  if stop_after_steps is not None:
    last_step = min(last_step, first_step + stop_after_steps)
  history, eval_history = [], []
  bar = None
  if progress and is_main:
    from tqdm.auto import tqdm
    bar = tqdm(total=train_cfg.steps, initial=first_step, unit="step", dynamic_ncols=True,
               desc=f"{model_cfg.kind} d={model_cfg.d_model} L={model_cfg.num_layers}")

  def save(step: int, force: bool = False):
    if step in checkpointer.all_steps():  # e.g. a periodic save just wrote this step
      return
    if not bool(_all_finite(state.params)):  # never write a checkpoint with NaNs
      raise NonFiniteLossError(f"params are not finite at step {step}; not checkpointing. The "
                               f"last checkpoint ({checkpointer.latest_step()}) is intact")
    checkpointer.save(step, state, train_iter, config_dict, force=force)

  pending = None  # (step, metrics on device): read one step late, no stall
  interrupted = False
  last_time = time.perf_counter()

  def consume(pending_step, device_metrics):
    nonlocal last_time
    m = jax.device_get(device_metrics)
    now = time.perf_counter()
    step_time = now - last_time
    last_time = now
    row = {k: float(v) for k, v in m.items()}
    if row["finite"] < 1.0:
      msg = (f"non-finite loss or gradient at step {pending_step} (loss={row['loss']}, "
             f"grad_norm={row['grad_norm']}); the update was skipped")
      if train_cfg.nan_policy == "stop":
        raise NonFiniteLossError(msg + "; stopping (train.nan_policy='stop'). Lower "
                                 "optim.lr or check the data; the last checkpoint is intact")
      log.warning(msg)
    row["step_time_s"] = step_time
    row["tokens_per_s"] = tokens_per_step / step_time
    row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
    row["perplexity"] = float(np.exp(min(row["loss"], 50.0)))
    row["step"] = pending_step
    history.append(row)
    if pending_step % train_cfg.log_every == 0 or pending_step == last_step:
      writer.write(pending_step, {k: v for k, v in row.items() if k != "step"})
    if bar is not None:
      bar.update(pending_step - bar.n)
      bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                      lr=f"{row['lr']:.2e}")

  try:
    step = first_step
    while step < last_step:
      batch = _to_global(next(train_iter), batch_sharding)
      state, device_metrics = train_step(state, batch)
      step += 1
      if pending is not None:
        consume(*pending)
      pending = (step, device_metrics)
      if val_batches and (step % train_cfg.eval_every == 0 or step == train_cfg.steps):
        consume(*pending)
        pending = None
        ev = _evaluate(eval_step, state.params, val_batches, batch_sharding)
        ev["step"] = step
        eval_history.append(ev)
        writer.write(step, {"loss": ev["loss"], "perplexity": ev["perplexity"]}, prefix="val_")
        if bar is not None:
          bar.write(f"step {step}: val loss {ev['loss']:.4f} (ppl {ev['perplexity']:.1f})")
      if step % train_cfg.checkpoint_every == 0:
        save(step)
      if stop.any_process_requested():
        interrupted = True
        break
    if pending is not None:
      consume(*pending)
    if stop_after_steps is not None and step < train_cfg.steps:
      interrupted = True
    if step != first_step or latest is None:
      save(step, force=True)
  finally:
    checkpointer.close()
    writer.close()
    stop.restore()
    if bar is not None:
      bar.close()

  params = state.params
  if jax.process_count() > 1:  # other processes' shards are not addressable here
    params = multihost_utils.process_allgather(params, tiled=True)
  model = nnx.merge(graphdef, jax.device_get(params))
  sample = None
  if sample_prompt and not interrupted and train_cfg.sample_tokens > 0:
    prompt = np.asarray([tokenizer.encode(sample_prompt)], np.int32)
    new = generate(model, prompt, SamplingConfig(max_new_tokens=train_cfg.sample_tokens,
                                                 temperature=0.8, top_k=40,
                                                 eos_id=tokenizer.eos_id), seed=train_cfg.seed)
    sample = sample_prompt + tokenizer.decode(new[0].tolist())
  log.info("peak FLOP/s per device for MFU: %.3g (%s)", peak, peak_source)
  return TrainResult(state, model, tokenizer, history, eval_history, sample, interrupted,
                     time.time() - start_time)
