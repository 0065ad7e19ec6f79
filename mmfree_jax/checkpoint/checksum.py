"""Checksums of checkpointed arrays: a 64-bit digest of each global array, computed on device.

A checkpoint step stores `{"algorithm", "<item>": {"<path>": {"digest", "dtype"}}}` in its
`checksums` item; a restore recomputes the digests of what it read and compares.

The digest is of the global array's values, not of the bytes each process writes. It depends
only on the values, so a step saved on one mesh (8 devices, fsdp) verifies when restored on
another (one device), and every process computes the same digest from its own shards: the
reduction is a sum of uint32 terms, which wraps modulo 2^32 and so gives the same result in any
order or partition. Orbax's files are never read back or touched.

For an array whose elements, viewed as uint32 words `w_i` (2-byte and 1-byte dtypes widened,
8-byte ones split into two words) at row-major index `i`:

    h_i = mix(w_i ^ (i * K) ^ S),   digest = (sum_i h_i, sum_i h_i * (i | 1))   mod 2^32 each

`mix` is murmur3's 32-bit finalizer, a bijection, and `i | 1` is odd (invertible mod 2^32), so
a change of any single word always changes both halves; the index term makes moved or swapped
elements count too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "murmur3-fmix32-indexed-sums-v2"
_K, _S = 0x9E3779B1, 0x85EBCA77


def _mix(h: jax.Array) -> jax.Array:
  """murmur3 fmix32 on uint32 (wrapping arithmetic)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of x as uint32, shape x.shape (x.shape + (2,) for 8-byte dtypes)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):  # row-major flat index, wrapping past 2^32
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride = stride * words.shape[axis] % 2**32
  h = _mix(words ^ (index * jnp.uint32(_K)) ^ jnp.uint32(_S))
  return jnp.sum(h, dtype=jnp.uint32), jnp.sum(h * (index | 1), dtype=jnp.uint32)


@jax.jit
def _digests(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  return [_digest(x) for x in leaves]


def path_name(path) -> str:
  """'params/embed/embedding' for a pytree key path (dict keys, attributes, indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _host_value(x) -> int:
  # A scalar result is replicated on every device: any local copy holds the global value.
  return int(np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x))


def digests(tree: Any) -> dict[str, dict]:
  """`{path name: {"digest": 16 hex digits, "dtype": str}}` for every array leaf of tree.

  tree: a pytree of `jax.Array`s (any sharding; every process calls this with its global
  arrays, as for a save) or numpy arrays.
  """
  with_path = jax.tree_util.tree_leaves_with_path(tree)
  on_device = [i for i, (_, x) in enumerate(with_path) if isinstance(x, jax.Array)]
  results = dict(zip(on_device, _digests([with_path[i][1] for i in on_device])))
  out = {}
  for i, (path, x) in enumerate(with_path):
    if i not in results:  # a host array: one at a time, never a device copy of the whole tree
      x = jnp.asarray(x)
      (results[i],) = _digests([x])
    a, b = results[i]
    out[path_name(path)] = {
      "digest": f"{_host_value(a):08x}{_host_value(b):08x}",
      "dtype": str(x.dtype),
    }
  return out


def mismatches(tree: Any, saved: dict[str, dict]) -> list[str]:
  """Names of tree's leaves whose digest differs from `saved` (as `digests` returned it).

  Leaves that `saved` does not list, or that were restored into another dtype (a cast changes
  the bytes), are not checked.
  """
  computed = digests(tree)
  return [
    name
    for name, got in computed.items()
    if name in saved
    and saved[name]["dtype"] == got["dtype"]
    and saved[name]["digest"] != got["digest"]
  ]
