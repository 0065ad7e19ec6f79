"""Optimizer from the `optim` config section: AdamW, decay mask, clipping, LR schedule (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmfree_jax.config.schema import SCHEDULES


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine/linear decay to `lr * end_lr_ratio`, or constant."""
  lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
  end = lr * optim_cfg.end_lr_ratio
  if optim_cfg.schedule not in SCHEDULES:
    raise ValueError(f"unknown optim.schedule {optim_cfg.schedule!r}; choose one of {SCHEDULES}")
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f"optim.warmup_steps={warmup} must be in [0, train.steps={total_steps}]")
  if optim_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
  warmup_fn = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if optim_cfg.schedule == "linear":
    decay_fn = optax.linear_schedule(lr, end, max(total_steps - warmup, 1))
  else:
    decay_fn = optax.constant_schedule(lr)
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def weight_decay_mask(params, decay_embeddings: bool = False):
  """True for leaves that get weight decay: dense kernels (and the embedding if asked).

  Norm scales and the MLGRU lower bounds are never decayed.
  """

  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name == "kernel" or (decay_embeddings and name == "embedding")

  return jax.tree_util.tree_map_with_path(decays, params)


def all_finite(tree) -> jax.Array:
  """bool scalar: every floating leaf of `tree` is finite (True for a tree without one).

  The one test of an update (`skip_nonfinite`) and of a checkpoint (the trainer's save).
  """
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner`, applied only when the update is finite everywhere, else skipped and counted.

  `update(grads, state, params, loss=None)` applies `inner` when `all_finite` holds for the
  loss, every gradient leaf, the params after the update and `inner`'s new state; otherwise
  it returns zero updates and the previous inner state, so params and moments stay exactly as
  they were. `optax.apply_if_finite` looks at the gradients only: a finite gradient can still
  overflow the second moment (`g**2`) or the params (a huge lr), which then reached the state.
  The state is `optax.ApplyIfFiniteState` (the layout checkpoints hold): `last_finite` says
  whether the last update was applied, `total_notfinite` counts the skipped ones.
  """

  def init(params):
    return optax.ApplyIfFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.asarray(True),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update(grads, state, params=None, *, loss=None, **extra_args):
    del extra_args
    updates, inner_state = inner.update(grads, state.inner_state, params)
    new_params = optax.apply_updates(params, updates) if params is not None else None
    ok = all_finite((loss, grads, new_params, inner_state))
    updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
    inner_state = jax.tree.map(
      lambda new, old: jnp.where(ok, new, old), inner_state, state.inner_state
    )
    skipped = jnp.where(ok, 0, 1).astype(jnp.int32)
    return updates, optax.ApplyIfFiniteState(
      notfinite_count=jnp.where(ok, 0, state.notfinite_count + 1).astype(jnp.int32),
      last_finite=ok,
      total_notfinite=state.total_notfinite + skipped,
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformationExtraArgs:
  """`clip_by_global_norm → adamw(schedule, mask)` behind `skip_nonfinite`.

  A step whose loss, gradients, new params or new moments are not all finite changes nothing
  and is counted in the state (`total_notfinite`), so a checkpoint never holds NaNs.
  """
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  chain = []
  if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(
    optax.adamw(
      schedule,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=lambda p: weight_decay_mask(p, optim_cfg.decay_embeddings),
    )
  )
  return skip_nonfinite(optax.chain(*chain))
