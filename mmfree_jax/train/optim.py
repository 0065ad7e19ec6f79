"""Optimizer from the `optim` config section: AdamW, decay mask, clipping, LR schedule (optax)."""

from __future__ import annotations

import jax
import optax

from mmfree_jax.config.schema import SCHEDULES
# Runs of non-finite gradients tolerated by `optax.apply_if_finite` before it gives up and
# applies them; the trainer's nan_policy decides what happens long before that.
MAX_CONSECUTIVE_NONFINITE = 1_000_000


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


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """`clip_by_global_norm → adamw(schedule, mask)`, skipping updates whose grads are not finite.

  The skip keeps params and moments unchanged on a non-finite step and counts it in the state
  (`notfinite_count`), so a checkpoint never holds NaNs.
  """
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  chain = []
  if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(optax.adamw(
      schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=lambda p: weight_decay_mask(p, optim_cfg.decay_embeddings)))
  return optax.apply_if_finite(optax.chain(*chain), MAX_CONSECUTIVE_NONFINITE)
