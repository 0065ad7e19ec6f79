"""The jitted train and eval steps (pure functions of the train state and a batch).

A batch is `{"tokens": int32 [global_batch, seq+1], "segment_ids": int32 [global_batch,
seq+1]}` (packed windows, see `mmfree_jax.data`). The train step splits it into
`microbatches` along the batch axis, accumulates gradients with `lax.scan` and applies one
optimizer update, so k microbatches equal one batch k times larger.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mmfree_jax.config import ModelConfig
from mmfree_jax.numerics import loss as loss_lib
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.parallel import sharding
from mmfree_jax.train.state import TrainState


def _forward_sums(graphdef, params, batch, cfg: ModelConfig, z_loss: float):
  inputs, input_segments, targets, mask = loss_lib.split_window(batch["tokens"],
                                                                batch["segment_ids"])
  model = nnx.merge(graphdef, params)
  segments = input_segments if cfg.reset_at_doc_start else None
  logits, _ = model(inputs, segment_ids=segments)
  return loss_lib.cross_entropy_sums(logits, targets, mask, z_loss)


def split_microbatches(batch: dict, microbatches: int) -> dict:
  """`[B, ...]` → `[microbatches, B / microbatches, ...]`, microbatch j = rows j, j+k, ...

  Strided rather than contiguous, so every data shard holds an equal part of every
  microbatch (a contiguous split would put each microbatch on a few devices only).
  """
  def split(x):
    x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
    return sharding.constrain(jnp.swapaxes(x, 0, 1), (None, "activation_batch", None))
  return jax.tree.map(split, batch)


def make_train_step(cfg: ModelConfig, graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, microbatches: int = 1, z_loss: float = 0.0,
                    mesh: Mesh | None = None, rules=None) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  Metrics (fp32 scalars): `loss` (mean NLL per target token), `z_loss`, `grad_norm`
  (before clipping), `lr`, `tokens` (counted targets), `finite` (1 if the update was applied).
  """

  def loss_fn(params, microbatch, total_tokens):
    nll, z, count = _forward_sums(graphdef, params, microbatch, cfg, z_loss)
    return (nll + z) / total_tokens, (nll, z, count)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    ctx = sharding.logical_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with ctx:
      acc = acc_dtype(cfg.compute_dtype)  # fp32 (f64 under x64)
      total_tokens = jnp.maximum(jnp.sum(batch["segment_ids"][:, 1:] != 0), 1).astype(acc)
      if microbatches == 1:
        (_, (nll, z, _)), grads = grad_fn(state.params, batch, total_tokens)
      else:
        def accumulate(carry, microbatch):
          grads_acc, nll_acc, z_acc = carry
          (_, (nll, z, _)), grads = grad_fn(state.params, microbatch, total_tokens)
          grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
          return (grads_acc, nll_acc + nll, z_acc + z), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), acc), jnp.zeros((), acc))
        (grads, nll, z), _ = jax.lax.scan(accumulate, init,
                                          split_microbatches(batch, microbatches))
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      finite = jnp.isfinite(optax.global_norm(grads)) & jnp.isfinite(nll)
      metrics = {
          "loss": nll / total_tokens,
          "z_loss": z / total_tokens,
          "grad_norm": optax.global_norm(grads),
          "lr": jnp.asarray(schedule(state.step), acc),
          "tokens": total_tokens,
          "finite": finite.astype(jnp.float32),
          # updates skipped so far because of non-finite gradients (optax.apply_if_finite)
          "skipped_steps": opt_state.total_notfinite.astype(jnp.float32),
      }
      new_state = TrainState(state.step + 1, params, opt_state, state.rng)
      return new_state, metrics

  return train_step


def make_eval_step(cfg: ModelConfig, graphdef, *, mesh: Mesh | None = None,
                   rules=None) -> Callable:
  """Returns `eval_step(params, batch) -> {"nll_sum", "tokens"}` (not yet jitted)."""

  def eval_step(params, batch):
    ctx = sharding.logical_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with ctx:
      nll, _, count = _forward_sums(graphdef, params, batch, cfg, 0.0)
      return {"nll_sum": nll, "tokens": count}

  return eval_step

