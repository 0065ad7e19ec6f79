"""Next-token cross-entropy with an optional z-loss, in fp32, as sums (exact accumulation), and
perplexity from a mean loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.dtypes import acc_dtype

# exp(700) is near float64's largest finite value: a diverged loss reports a huge, finite
# perplexity rather than inf.
PERPLEXITY_LOG_CAP = 700.0


def split_window(tokens: jax.Array, segment_ids: jax.Array, take=None):
  """Turns packed `[batch, seq+1]` windows into model inputs and targets.

  `take(x, start, length)` cuts `x[:, start:start + length]` (default: a slice; the trainer
  passes one that cuts each device's chunk locally, `parallel.context_positions.take_chunks`).

  Returns:
    inputs `[batch, seq]`, input segment ids `[batch, seq]`, targets `[batch, seq]`,
    loss mask `[batch, seq]` bool (False where the target is padding, segment id 0).
  """
  take = take or (lambda x, start, length: x[:, start : start + length])
  seq = tokens.shape[1] - 1
  return (
    take(tokens, 0, seq),
    take(segment_ids, 0, seq),
    take(tokens, 1, seq),
    take(segment_ids, 1, seq) != 0,
  )


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0):
  """Summed token losses.

  Args:
    logits: `[batch, seq, vocab]` any float dtype (upcast to fp32 here).
    targets: `[batch, seq]` int.
    mask: `[batch, seq]` bool.
    z_loss: coefficient of `log(Z)^2` (PaLM's auxiliary loss), 0 to disable.
  Returns:
    (sum of NLL, sum of z-loss terms, number of counted tokens), fp32 scalars.
  """
  logits = logits.astype(acc_dtype(logits.dtype))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  weights = mask.astype(logits.dtype)
  nll = jnp.sum((log_z - target_logits) * weights)
  z = jnp.sum(z_loss * jnp.square(log_z) * weights)
  return nll, z, jnp.sum(weights)


def perplexity(mean_nll: float) -> float:
  """`exp(mean NLL in nats)` as a Python float, capped at `exp(PERPLEXITY_LOG_CAP)`."""
  return float(math.exp(min(float(mean_nll), PERPLEXITY_LOG_CAP)))
