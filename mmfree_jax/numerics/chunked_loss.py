"""Cross-entropy over token chunks: the head and the loss without `[tokens, vocab]` logits.

`chunked_cross_entropy_sums(head, x, targets, mask, z_loss, chunk)` equals
`loss.cross_entropy_sums(head(x), targets, mask, z_loss)` (the same per-token formula, reused
per chunk; only the order of the final sums differs) while holding one chunk's logits at a
time, forward and backward: a `lax.scan` over the chunks whose body is `jax.checkpoint`ed, so
the backward pass recomputes each chunk's logits from its hidden states instead of storing
them all. The price is one more forward of the head (its matmul, norm and quantizer) per step.

Chunks are strided over the sequence: with `n = ceil(seq / chunk)` chunks, chunk k holds
positions `k, k + n, k + 2n, ...` of every row. Under context parallelism (the sequence split
in `c` contiguous shards) the `[batch, seq, d]` -> `[batch, chunk, n, d]` reshape is then local
to each shard whenever `c` divides `chunk`, and every chunk is spread over all the shards; a
contiguous split would put each chunk on one shard. A `seq` the chunk does not divide is padded
at the end with masked positions (zero hidden states: finite logits, zero weight).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mmfree_jax.numerics.loss import cross_entropy_sums


def chunk_layout(seq: int, chunk: int) -> tuple[int, int]:
  """`(chunks, padded positions)` of a `seq`-long sequence in chunks of `chunk` positions."""
  if chunk < 1:
    raise ValueError(f"loss chunk must be >= 1 positions; got {chunk}")
  n = -(-seq // chunk)
  return n, n * chunk - seq


def _strided(a: jax.Array, n: int, pad: int) -> jax.Array:
  """`[batch, seq, ...]` -> `[n, batch, (seq + pad) / n, ...]`: chunk k = positions k, k+n..."""
  if pad:
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  batch, padded = a.shape[:2]
  a = a.reshape((batch, padded // n, n) + a.shape[2:])
  return jnp.moveaxis(a, 2, 0)


def chunked_cross_entropy_sums(
  head: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  targets: jax.Array,
  mask: jax.Array,
  z_loss: float = 0.0,
  chunk: int = 0,
):
  """`cross_entropy_sums(head(x), targets, mask, z_loss)`, one chunk of positions at a time.

  Args:
    head: `[batch, c, d] -> logits [batch, c, vocab]`, position-wise (the model's final norm
      and lm_head; the MatMul-free head quantizes per token, so a chunk's logits equal those
      rows of the full ones).
    x: `[batch, seq, d]` the last block's output, any float dtype.
    targets: `[batch, seq]` int.
    mask: `[batch, seq]` bool.
    z_loss: coefficient of `log(Z)^2`, 0 to disable.
    chunk: sequence positions per chunk (all rows of the batch together); 0, or a chunk
      covering the whole sequence, is the unchunked `head(x)`.
  Returns:
    (sum of NLL, sum of z-loss terms, number of counted tokens), acc-dtype scalars.
  """
  seq = targets.shape[1]
  if chunk == 0 or chunk >= seq:
    return cross_entropy_sums(head(x), targets, mask, z_loss)
  n, pad = chunk_layout(seq, chunk)
  parts = (_strided(x, n, pad), _strided(targets, n, pad), _strided(mask, n, pad))

  @jax.checkpoint  # keep no logits for the backward pass: recompute them per chunk
  def one(x_k, targets_k, mask_k):
    return cross_entropy_sums(head(x_k), targets_k, mask_k, z_loss)

  def body(sums, part):
    return jax.tree.map(jnp.add, sums, one(*part)), None

  shapes = jax.eval_shape(one, *(p[0] for p in parts))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  sums, _ = jax.lax.scan(body, zeros, parts)
  return sums
