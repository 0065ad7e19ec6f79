"""Every train step, built from a loss function; the LM loss; the eval step.

A batch is `{"tokens": int32 [global_batch, seq+1], "segment_ids": int32 [global_batch,
seq+1]}` (packed windows, see `mmfree_jax.data`). `build_train_step(objective, ...)` is the one
step skeleton: it splits the batch into `microbatches` along the batch axis, accumulates the
loss, its metric sums and the gradients with `accumulate_gradients` (one `lax.scan`), and
applies one optimizer update through the optimizer's finiteness guard
(`optim.skip_nonfinite`), so k microbatches equal one batch k times larger. The LM loss below
and the distillation stages (`train/distill.py`) are objectives for it.

A loss function is `loss(params, batch, ctx) -> (loss, sums)`: `loss` a scalar, this batch's
share of the objective (already divided by the global batch's target count
`ctx.total_tokens`, so the shares of microbatches add up), `sums` a dict of additive metric
sums (acc-dtype scalars).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mmfree_jax.config import ModelConfig
from mmfree_jax.numerics import chunked_loss
from mmfree_jax.numerics import loss as loss_lib
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.parallel import context_positions, sharding
from mmfree_jax.train.state import TrainState


class StepContext(NamedTuple):
  """What a loss function sees besides params and batch (the same for every microbatch)."""

  total_tokens: jax.Array  # acc-dtype scalar: target tokens of the whole global batch (>= 1)
  step: jax.Array  # int32 scalar: the step being taken (0-based)
  inputs: Any = None  # the step's extra arguments (e.g. the frozen teacher's params)


class Objective(NamedTuple):
  """A loss function and the metrics it reports from its accumulated sums."""

  loss: Callable  # (params, batch, ctx) -> (loss, sums)
  metrics: Callable[[jax.Array, dict, StepContext], dict]  # (loss, sums, ctx) -> {name: scalar}


def split_microbatches(batch: dict, microbatches: int) -> dict:
  """`[B, ...]` → `[microbatches, B / microbatches, ...]`, microbatch j = rows j, j+k, ...

  Strided rather than contiguous, so every data shard holds an equal part of every
  microbatch (a contiguous split would put each microbatch on a few devices only).
  """

  def split(x):
    x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
    return sharding.constrain(jnp.swapaxes(x, 0, 1), (None, "activation_batch", None))

  return jax.tree.map(split, batch)


def accumulate_gradients(
  loss_fn: Callable, params, batch: dict, ctx: StepContext, microbatches: int = 1
):
  """`(loss, sums, grads)` of `loss_fn` over `batch`, summed over `microbatches` parts.

  One `lax.scan` over the strided microbatches (`split_microbatches`), carrying the running
  sums of loss, metric sums and gradients (each in its own dtype); `microbatches=1` is one
  `value_and_grad`. Since each part's loss is already normalised by the global batch's
  count, the sums equal the whole batch's loss and gradient.

  Under a mesh with a `data` axis the scan runs per data shard on the rows it holds
  (`sharding.sum_over_shards`), and the shards' sums are all-reduced once, after it: one scan
  over the whole batch carries the gradients sharded like the params (replicated over
  `data`), so XLA all-reduces every microbatch's gradients over `data`, which on several
  slices is the data-center network.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (loss, sums), grads = grad_fn(params, batch, ctx)
    return loss, sums, grads

  def scan(replicated, rows):
    params, ctx = replicated
    parts = split_microbatches(rows, microbatches)

    def add(carry, microbatch):
      (loss, sums), grads = grad_fn(params, microbatch, ctx)
      return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    first = jax.tree.map(lambda x: x[0], parts)
    (loss, sums), grads = jax.eval_shape(grad_fn, params, first, ctx)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, sums, grads))
    return jax.lax.scan(add, zeros, parts)[0]

  return sharding.sum_over_shards(scan, (params, ctx), batch, "data")


def target_count(batch: dict, dtype) -> jax.Array:
  """Target tokens of a batch (`segment_ids != 0` past the first column), at least 1."""
  return jnp.maximum(jnp.sum(batch["segment_ids"][:, 1:] != 0), 1).astype(dtype)


def _sharding_context(mesh: Mesh | None, rules):
  return sharding.logical_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext()


def build_train_step(
  objective: Objective,
  tx: optax.GradientTransformationExtraArgs,
  schedule: optax.Schedule,
  *,
  acc,
  microbatches: int = 1,
  mesh: Mesh | None = None,
  rules=None,
) -> Callable:
  """Returns `train_step(state, batch, inputs=None) -> (state, metrics)` (pure, not jitted).

  `inputs` reaches the loss as `ctx.inputs`. `tx` is `optim.make_optimizer`'s (its state an
  `optax.ApplyIfFiniteState`): it receives the loss and decides, by one predicate, whether the
  update is applied. `acc` is the accumulation dtype (`ops.dtypes.acc_dtype`).

  Metrics (scalars): the objective's, plus `grad_norm` (before clipping), `lr`, `tokens`
  (counted targets), `finite` (1 if the update was applied) and `skipped_steps` (updates not
  applied so far in the run).
  """

  def train_step(state: TrainState, batch: dict, inputs=None):
    with _sharding_context(mesh, rules):
      ctx = StepContext(target_count(batch, acc), state.step, inputs)
      loss, sums, grads = accumulate_gradients(
        objective.loss, state.params, batch, ctx, microbatches
      )
      updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=loss)
      params = optax.apply_updates(state.params, updates)
      metrics = dict(objective.metrics(loss, sums, ctx))
      metrics.update(
        {
          "grad_norm": optax.global_norm(grads),
          "lr": jnp.asarray(schedule(state.step), acc),
          "tokens": ctx.total_tokens,
          "finite": opt_state.last_finite.astype(jnp.float32),
          "skipped_steps": opt_state.total_notfinite.astype(jnp.float32),
        }
      )
      return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  return train_step


# --------------------------------------------------------------------------- the LM loss


def split_window_on_mesh(batch: dict):
  """`loss.split_window` of the batch's `[batch, seq+1]` windows; under a mesh whose context
  axis splits the sequence, each device cuts its own `[batch, seq / context]` chunks from the
  windows it holds (`context_positions.take_chunks`: no collective)."""
  return loss_lib.split_window(batch["tokens"], batch["segment_ids"], context_positions.take_chunks)


def _forward_sums(graphdef, params, batch, cfg: ModelConfig, z_loss: float, loss_chunk: int = 0):
  """The model's last hidden state, then its head and the loss over chunks of `loss_chunk`
  positions (`numerics.chunked_loss`; 0 = the whole window at once)."""
  inputs, input_segments, targets, mask = split_window_on_mesh(batch)
  model = nnx.merge(graphdef, params)
  segments = input_segments if cfg.reset_at_doc_start else None
  x, _ = model(inputs, segment_ids=segments, apply_head=False)
  return chunked_loss.chunked_cross_entropy_sums(model.head, x, targets, mask, z_loss, loss_chunk)


def lm_objective(
  cfg: ModelConfig, graphdef, z_loss: float = 0.0, loss_chunk_tokens: int = 0
) -> Objective:
  """Next-token cross-entropy (+ z-loss) per target token; the head and the loss run over
  chunks of `loss_chunk_tokens` sequence positions (0 = unchunked; the same loss).

  Sums `nll`, `z`; metrics `loss` (mean NLL per target token) and `z_loss`.
  """

  def loss(params, batch, ctx: StepContext):
    nll, z, _ = _forward_sums(graphdef, params, batch, cfg, z_loss, loss_chunk_tokens)
    return (nll + z) / ctx.total_tokens, {"nll": nll, "z": z}

  def metrics(loss_value, sums, ctx: StepContext):
    del loss_value
    return {"loss": sums["nll"] / ctx.total_tokens, "z_loss": sums["z"] / ctx.total_tokens}

  return Objective(loss, metrics)


def make_train_step(
  cfg: ModelConfig,
  graphdef,
  tx: optax.GradientTransformationExtraArgs,
  schedule: optax.Schedule,
  *,
  microbatches: int = 1,
  z_loss: float = 0.0,
  loss_chunk_tokens: int = 0,
  mesh: Mesh | None = None,
  rules=None,
) -> Callable:
  """`build_train_step` of `lm_objective`: `train_step(state, batch) -> (state, metrics)`."""
  return build_train_step(
    lm_objective(cfg, graphdef, z_loss, loss_chunk_tokens),
    tx,
    schedule,
    acc=acc_dtype(cfg.compute_dtype),
    microbatches=microbatches,
    mesh=mesh,
    rules=rules,
  )


def make_eval_step(
  cfg: ModelConfig, graphdef, *, loss_chunk_tokens: int = 0, mesh: Mesh | None = None, rules=None
) -> Callable:
  """Returns `eval_step(params, batch) -> {"nll_sum", "tokens"}` (not yet jitted)."""

  def eval_step(params, batch):
    with _sharding_context(mesh, rules):
      nll, _, count = _forward_sums(graphdef, params, batch, cfg, 0.0, loss_chunk_tokens)
      return {"nll_sum": nll, "tokens": count}

  return eval_step
