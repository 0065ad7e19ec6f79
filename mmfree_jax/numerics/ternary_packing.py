"""Ternary weight packing: codes {-1, 0, +1} stored at 2 bits (4 per byte) or in base 3
(5 per byte, 1.6 bits), and the batch-1 friendly matrix-vector product that reads them.

Layout: codes are packed along one axis (for a BitLinear kernel `[in, out]`, the `in` axis,
so each byte holds `k` consecutive input rows of one output column). Code `c` is stored as
the digit `c + 1` in {0, 1, 2}:

    "2bit":  byte = sum_j (c_j + 1) << 2j,   j < 4      (digit 3 never occurs)
    "base3": byte = sum_j (c_j + 1) * 3^j,   j < 5      (bytes 0..242)

A length that `k` does not divide is padded with code 0 (digit 1), which adds nothing to a
product. `unpack_ternary(pack_ternary(c, f), f, n) == c` exactly.

`packed_matvec` computes `x_codes @ W_codes` for integer activation codes (int8) without
materializing the weights in a float type: each packed byte indexes a per-group table of the
3^k (or 4^4) partial sums of `k` activations (T-MAC/bitnet.cpp's lookup-table idea), or the
codes are unpacked to int8 and multiplied with an int32 accumulator. Both are exact integer
arithmetic, so every storage format gives bit-identical results.

Bit planes (`to_planes`, the in-memory layout of the 'popcount' method, also 2 bits/weight):
uint32 `[2, n_out, words]`, `words = ceil(n_in / 32)`; plane 0 has bit `j` of word `w` set
where code `[32w + j]` is +1, plane 1 where it is -1 (pad bits 0). With the int8 activations
split into their 8 two's-complement bit planes `X_b`,

    x @ w[:, o] = sum_b c_b * sum_w (popcount(P[o, w] & X_b[w]) - popcount(N[o, w] & X_b[w]))

with `c_b = 2^b` and `c_7 = -128`: AND, popcount and add on whole words, which XLA:CPU
vectorizes, where the table lookup is one scalar gather per byte.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax import registry

# format -> (codes per byte, radix of a digit)
PACKING_LAYOUTS = {"2bit": (4, 4), "base3": (5, 3)}
# lut / unpack read the byte-packed codes; popcount reads bit planes (`packed_to_planes`)
MATVEC_METHODS = registry.MATVEC_METHODS
WORD_BITS = 32
# the weight of each two's-complement bit plane of an int8 activation
_PLANE_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, -128)


def _format(fmt: str) -> tuple[int, int]:
  try:
    return PACKING_LAYOUTS[fmt]
  except KeyError:
    raise ValueError(
      f"unknown packing format {fmt!r}; choose one of {sorted(PACKING_LAYOUTS)}"
    ) from None


def bits_per_weight(fmt: str) -> float:
  """Storage bits per ternary weight: 2.0 for '2bit', 1.6 for 'base3' (padding excluded)."""
  return 8.0 / _format(fmt)[0]


def packed_length(n: int, fmt: str) -> int:
  """Bytes along the packed axis for `n` codes."""
  k, _ = _format(fmt)
  return -(-n // k)


def _check_codes(codes) -> None:
  if isinstance(codes, jax.core.Tracer):
    return  # values cannot be checked inside jit
  values = np.asarray(codes)
  if values.size and (
    values.min() < -1 or values.max() > 1 or not np.array_equal(values, np.round(values))
  ):
    raise ValueError(
      "pack_ternary expects ternary codes in {-1, 0, 1} (e.g. from "
      "quant.quantize_weights_ternary); got values outside that set"
    )


def pack_ternary(codes, fmt: str = "2bit", axis: int = 0) -> jax.Array:
  """Packs ternary codes along `axis`.

  Args:
    codes: integer or float array of values in {-1, 0, 1}, any shape.
    fmt: '2bit' (4 per byte) or 'base3' (5 per byte).
    axis: the axis to pack (its length becomes `ceil(n / k)`).
  Returns:
    uint8 array, `codes`' shape with `axis` shortened to `packed_length(n, fmt)`.
  """
  k, radix = _format(fmt)
  _check_codes(codes)
  codes = jnp.moveaxis(jnp.asarray(codes), axis, -1)
  n = codes.shape[-1]
  pad = (-n) % k
  digits = codes.astype(jnp.int32) + 1
  if pad:
    digits = jnp.concatenate([digits, jnp.ones(digits.shape[:-1] + (pad,), jnp.int32)], -1)
  digits = digits.reshape(digits.shape[:-1] + ((n + pad) // k, k))
  weights = jnp.asarray(radix ** np.arange(k), jnp.int32)
  packed = jnp.sum(digits * weights, axis=-1).astype(jnp.uint8)
  return jnp.moveaxis(packed, -1, axis)


def unpack_ternary(packed, fmt: str, n: int, axis: int = 0) -> jax.Array:
  """Inverse of `pack_ternary`: int8 codes in {-1, 0, 1} with `n` entries along `axis`."""
  k, _ = _format(fmt)
  packed = jnp.asarray(packed)
  axis = axis % packed.ndim
  if packed.shape[axis] != packed_length(n, fmt):
    raise ValueError(
      f"packed axis has {packed.shape[axis]} bytes; {n} codes in {fmt!r} need "
      f"{packed_length(n, fmt)}"
    )
  # The k digits of each byte go on a new axis right after `axis` (no transpose: for a kernel
  # packed along `in`, the unpacked rows come out in memory order).
  if fmt == "2bit":
    p = jnp.expand_dims(packed.astype(jnp.int32), axis + 1)
    j = np.arange(k).reshape((k,) + (1,) * (packed.ndim - axis - 1))
    codes = (((p >> jnp.asarray(2 * j, jnp.int32)) & 3) - 1).astype(jnp.int8)
  else:  # each byte's digits looked up: divisions by powers of 3 are slow on XLA:CPU
    codes = jnp.take(_digit_table(fmt, jnp.int8), packed.astype(jnp.int32), axis=0)
    codes = jnp.moveaxis(codes, -1, axis + 1)
  shape = packed.shape[:axis] + (packed.shape[axis] * k,) + packed.shape[axis + 1 :]
  return jax.lax.slice_in_dim(codes.reshape(shape), 0, n, axis=axis)


def _digit_table(fmt: str, dtype) -> jax.Array:
  """`[256, k]` codes of every byte value (bytes that cannot occur decode to zeros)."""
  k, radix = _format(fmt)
  b = np.arange(256)
  digits = np.stack([(b // radix**j) % radix for j in range(k)], -1) - 1
  digits[b >= radix**k] = 0
  return jnp.asarray(digits, dtype)


# Bytes of partial sums a matvec holds per loop step (the LUT's gathered `[rows, groups, out]`
# fp32, popcount's per-word `[rows, out, words]` int32): about what stays in cache. Gathering
# all groups at once wrote and re-read them from memory: the 2.7B's gate_proj (2560 x 13824)
# took 40 ms at batch 1 and 268 ms at batch 8 with 36 and 288 MB of temporaries; in 1 MiB
# blocks 5 and 48 ms with 4 and 13 MB (one loaded 2-core run).
MATVEC_BLOCK_BYTES = 1 << 20


def _block_size(rows: int, total: int, width: int, chunk_bytes: int) -> int:
  """Items (of `total`, each `[rows, width]` 4-byte values: a LUT group's gathered sums, a
  popcount column's word sums) per loop step: as few steps as keep each block within
  `chunk_bytes`, of about equal size (the last, remainder block is smaller by under one item
  per step)."""
  fit = max(1, chunk_bytes // (rows * width * 4))
  steps = -(-total // fit)
  return -(-total // steps)


def _stacked(packed: jax.Array, layer: jax.Array | None) -> tuple[jax.Array, jax.Array | int]:
  """`(codes [layers, ...], layer)`: a single matrix becomes a stack of one."""
  return (packed[None], 0) if layer is None else (packed, layer)


def _over_blocks(total: int, size: int, step, init):
  """`step(acc, start, size)` over `[0, total)` in blocks of `size` (a `fori_loop`), then the
  remainder as one smaller step. Padding to whole blocks instead would copy the codes, and
  XLA:CPU schedules that weight-only copy for every layer before the first (a 2-bit 2.7B's
  decode then held 0.65 GB of padded codes)."""
  full, tail = divmod(total, size)
  acc = jax.lax.fori_loop(0, full, lambda i, acc: step(acc, i * size, size), init)
  return step(acc, full * size, tail) if tail else acc


def packed_matvec(
  x_codes: jax.Array,
  packed: jax.Array,
  fmt: str,
  n_in: int,
  method: str = "lut",
  chunk_bytes: int = MATVEC_BLOCK_BYTES,
  layer: jax.Array | None = None,
) -> jax.Array:
  """`x_codes @ unpack(packed)` exactly, for a kernel packed along its input axis.

  Args:
    x_codes: `[batch, n_in]` integer activation codes (int8 range).
    packed: `[packed_length(n_in), n_out]` uint8.
    fmt: the packing format.
    n_in: the unpacked input size.
    method: 'lut' (per-group table of partial sums, one lookup per byte), 'unpack'
      (unpack to int8, int32-accumulating dot) or 'popcount' (converted to bit planes here,
      then `planes_matvec`).
    chunk_bytes: 'lut' gathers and sums the groups in blocks of about this many bytes.
    layer: with `packed [layers, packed_length(n_in), n_out]`, the (traced) layer to use. The
      LUT reads that layer's codes where they lie (one dynamic slice per block), where
      slicing the layer out first would copy it.
  Returns:
    `[batch, n_out]` float32 holding exact integers (|value| <= 128 * n_in < 2^24 for
    n_in < 131072) for 'lut', int32 for 'unpack' and 'popcount'.
  """
  k, _ = _format(fmt)
  packed, layer = _stacked(packed, layer)
  groups, n_out = packed.shape[1:]
  codes = lambda start, size: jax.lax.dynamic_slice(packed, (layer, start, 0), (1, size, n_out))[0]
  if method == "unpack":
    w = unpack_ternary(codes(0, groups), fmt, n_in, axis=0)
    return jax.lax.dot(x_codes.astype(jnp.int8), w, preferred_element_type=jnp.int32)
  if method == "popcount":  # converts on every call: keep planes instead (`packed_to_planes`)
    return planes_matvec(x_codes, packed_to_planes(codes(0, groups), fmt, n_in), n_in)
  if method != "lut":
    raise ValueError(f"unknown packed matvec method {method!r}; choose one of {MATVEC_METHODS}")
  batch = x_codes.shape[0]
  x = x_codes.astype(jnp.float32)  # small integers: every partial sum below is exact
  x = jnp.pad(x, ((0, 0), (0, groups * k - n_in))).reshape(batch, groups, k)
  # table[b, g, v] = sum_j x[b, g*k + j] * code_j(v): the 256 possible partial sums per group
  table = jnp.einsum(
    "bgk,vk->bgv", x, _digit_table(fmt, jnp.float32), precision=jax.lax.Precision.HIGHEST
  )

  def block(acc, start, size):
    t = jax.lax.dynamic_slice_in_dim(table, start, size, axis=1)
    p = codes(start, size)
    gathered = jax.vmap(lambda t: jax.vmap(lambda t_g, p_g: t_g[p_g])(t, p))(t)
    # Sum over groups as a dot with ones: the matmul kernel streams it, where a float reduce
    # over a major axis is not vectorized on XLA:CPU (about 10x slower). Exact: all partial
    # sums are integers below 2^24.
    return acc + jnp.einsum(
      "g,bgo->bo", jnp.ones((size,), jnp.float32), gathered, precision=jax.lax.Precision.HIGHEST
    )

  return _over_blocks(
    groups,
    _block_size(batch, groups, n_out, chunk_bytes),
    block,
    jnp.zeros((batch, n_out), jnp.float32),
  )


# fp32 codes `unpacked_matmul` makes per loop step: one block of output columns. Unpacking a
# whole matrix at once held the 2.7B's gate_proj as int32 digits and fp32 codes (~0.3 GB) and
# was slower: 64 rows x gate_proj 215 ms whole, 89 ms in 2 MiB blocks (1 MiB: 110, 8 MiB:
# 230; 2 MiB also the fastest for down_proj and the square projections, one CPU run).
UNPACK_BLOCK_BYTES = 2 << 20


def unpacked_matmul(
  x_codes: jax.Array,
  packed: jax.Array,
  fmt: str,
  n_in: int,
  layer: jax.Array | None = None,
  block_bytes: int = UNPACK_BLOCK_BYTES,
) -> jax.Array:
  """`x_codes @ unpack(packed)` for many rows (a prefill), exactly: the codes are unpacked to
  fp32 one block of output columns (about `block_bytes`) at a time and multiplied.

  Args:
    x_codes: `[rows, n_in]` integer activation codes (int8 range).
    packed: `[packed_length(n_in), n_out]` uint8, or `[layers, ...]` with `layer` (traced).
    fmt, n_in: the packing format and the unpacked input size.
    block_bytes: fp32 codes per block.
  Returns:
    `[rows, n_out]` float32 holding exact integers (codes and sums below 2^24).
  """
  packed, layer = _stacked(packed, layer)
  groups, n_out = packed.shape[1:]
  cols = min(n_out, max(1, block_bytes // (4 * n_in)))
  x = x_codes.astype(jnp.float32)

  def block(out, start, size):
    w = jax.lax.dynamic_slice(packed, (layer, 0, start), (1, groups, size))[0]
    codes = unpack_ternary(w, fmt, n_in, axis=0).astype(jnp.float32)
    product = jnp.matmul(x, codes, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.dynamic_update_slice_in_dim(out, product, start, axis=1)

  return _over_blocks(n_out, cols, block, jnp.zeros((x.shape[0], n_out), jnp.float32))


# ------------------------------------------------------------------------------ bit planes


def plane_words(n_in: int) -> int:
  """uint32 words per output column of the bit planes for `n_in` inputs."""
  return -(-n_in // WORD_BITS)


def to_planes(codes) -> jax.Array:
  """Ternary codes `[..., n_in, n_out]` → bit planes uint32 `[..., 2, n_out, plane_words(n_in)]`
  (see the module docstring)."""
  codes = jnp.asarray(codes)
  n_in = codes.shape[-2]
  words = plane_words(n_in)
  c = jnp.swapaxes(codes, -1, -2)  # [..., n_out, n_in]: a column's inputs contiguous
  c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, words * WORD_BITS - n_in)])
  c = c.reshape(c.shape[:-1] + (words, WORD_BITS))
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  # distinct bits: the sum is their OR
  plane = lambda value: jnp.sum(
    (c == value).astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32
  )
  return jnp.stack([plane(1), plane(-1)], axis=-3)


def packed_to_planes(packed, fmt: str, n_in: int) -> jax.Array:
  """Byte-packed codes `[..., packed_length(n_in), n_out]` → bit planes (`to_planes`)."""
  packed = jnp.asarray(packed)
  return to_planes(unpack_ternary(packed, fmt, n_in, axis=packed.ndim - 2))


def _activation_planes(x_codes: jax.Array, words: int) -> jax.Array:
  """`[rows, n_in]` int8-range codes → their 8 bit planes uint32 `[rows, 8, words]`."""
  rows, n_in = x_codes.shape
  x = jax.lax.bitcast_convert_type(x_codes.astype(jnp.int8), jnp.uint8).astype(jnp.uint32)
  x = jnp.pad(x, ((0, 0), (0, words * WORD_BITS - n_in))).reshape(rows, 1, words, WORD_BITS)
  bits = (x >> jnp.arange(8, dtype=jnp.uint32)[:, None, None]) & 1
  return jnp.sum(bits << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def planes_matvec(
  x_codes: jax.Array,
  planes: jax.Array,
  n_in: int,
  layer: jax.Array | None = None,
  chunk_bytes: int = MATVEC_BLOCK_BYTES,
) -> jax.Array:
  """`x_codes @ codes` exactly from bit planes, by AND and popcount.

  Args:
    x_codes: `[rows, n_in]` integer activation codes (int8 range).
    planes: uint32 `[2, n_out, plane_words(n_in)]`, or `[layers, 2, ...]` with `layer`
      (traced), read where they lie.
    n_in: the unpacked input size.
    chunk_bytes: output columns go in blocks whose per-word partial sums (`[rows, block,
      words]` int32) take about this many bytes, so they stay in cache: all at once, the
      2.7B's gate_proj at 8 rows took 20 ms where blocks take 7-12 (one CPU run).
  Returns:
    `[rows, n_out]` int32.
  """
  planes, layer = _stacked(planes, layer)
  n_out, words = planes.shape[-2:]
  rows = x_codes.shape[0]
  del n_in  # the planes' zero padding adds nothing
  x = _activation_planes(x_codes, words)[:, :, None, :]  # [rows, 8, 1, words]

  def block(out, start, size):
    plane = lambda p: jax.lax.dynamic_slice(planes, (layer, p, start, 0), (1, 1, size, words))[0, 0]
    pos, neg = plane(0), plane(1)
    count = lambda w, b: jax.lax.population_count(w & x[:, b]).astype(jnp.int32)
    # one elementwise sum over the 8 planes, then one reduce over the words
    terms = sum(c * (count(pos, b) - count(neg, b)) for b, c in enumerate(_PLANE_WEIGHTS))
    return jax.lax.dynamic_update_slice_in_dim(
      out, jnp.sum(terms, axis=-1, dtype=jnp.int32), start, axis=1
    )

  size = _block_size(rows, n_out, words, chunk_bytes)
  return _over_blocks(n_out, size, block, jnp.zeros((rows, n_out), jnp.int32))
