"""Distillation losses, as sums over tokens (exact accumulation across microbatches).

- Stage 1, hidden-state alignment: each student block, fed the teacher's input to that block,
  should produce the teacher block's output: `sum_l sum_tokens mean_d (s_l - t_l)^2`.
- Stage 2, logit distillation: `T^2 KL(softmax(t / T) || softmax(s / T))` per token (Hinton
  et al.; the T^2 keeps gradient magnitudes comparable across temperatures), mixed with the
  next-token cross entropy by the caller (`alpha * KL + (1 - alpha) * CE`).

All statistics in fp32 (f64 under x64). Masks are `[batch, seq]` bool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.dtypes import acc_dtype


def _acc(x):
  return x.astype(acc_dtype(x.dtype))


def hidden_mse_sums(student: jax.Array, teacher: jax.Array, mask: jax.Array):
  """Summed per-token mean squared error of hidden states.

  Args:
    student, teacher: `[layers, batch, seq, d]` block outputs (teacher's: no gradient).
    mask: `[batch, seq]` bool, tokens that count.
  Returns:
    (sum over layers and counted tokens of `mean_d (s - t)^2`, sum over layers and counted
    tokens of `mean_d t^2` (for a relative error), number of counted tokens), fp32 scalars.
  """
  if student.shape != teacher.shape or student.ndim != 4:
    raise ValueError(
      f"hidden states must both be [layers, batch, seq, d]; got {student.shape} and {teacher.shape}"
    )
  s, t = _acc(student), _acc(jax.lax.stop_gradient(teacher))
  weights = mask.astype(s.dtype)[None]
  err = jnp.sum(jnp.mean(jnp.square(s - t), axis=-1) * weights)
  ref = jnp.sum(jnp.mean(jnp.square(t), axis=-1) * weights)
  return err, ref, jnp.sum(mask.astype(s.dtype))


def kl_divergence_sums(
  student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, temperature: float = 1.0
):
  """Summed `T^2 KL(p_teacher || p_student)` of temperature-softened distributions.

  Args:
    student_logits, teacher_logits: `[batch, seq, vocab]` any float dtype.
    mask: `[batch, seq]` bool.
    temperature: T > 0.
  Returns:
    (sum of per-token KL times T^2, number of counted tokens), fp32 scalars.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")
  s = _acc(student_logits) / temperature
  t = _acc(jax.lax.stop_gradient(teacher_logits)) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  weights = mask.astype(kl.dtype)
  return temperature**2 * jnp.sum(kl * weights), jnp.sum(weights)
