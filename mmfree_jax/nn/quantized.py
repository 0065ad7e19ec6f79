"""The one quantized linear of inference, `QuantizedLinear`, and its storage formats.

A `QuantizedLinear` takes a trained BitLinear's place in the quantized model (`nn.packed`):
the same call, `[..., in]` → `[..., out]` in the compute dtype, on stored tensors
(`PackedLinear`) in one of

  code formats (`CODE_FORMATS`, also on disk: `export/`): the ternary codes
    `clip(round_even(W / mean|W|), -1, 1)` and the scale `mean|W|` (1e-5 floor, §1 of
    docs/architecture.md): '2bit' (4 codes per byte) and 'base3' (5 per byte, 1.6 bits),
    bit-packed by `ternary_packing`; 'int8'; 'float32' / 'bfloat16' (plain-storage
    baselines). The product `(x_codes @ w_codes) * mean|W| / sx` has an exact integer
    accumulator, so all code formats give bit-identical outputs, equal to the latent layer's
    up to float round-off (it multiplies de-quantized values).
  frozen formats (`FROZEN_FORMATS`, in memory only: `infer`'s quantize-once plans): what
    `ops.bitlinear.freeze_weights` returns for the trained `bitlinear_impl`, multiplied as
    that impl multiplies (`bitlinear_frozen`), so outputs equal the latent layer's: 'frozen'
    (weights quantized once) and 'latent_scale' (the latent kernel kept, its scale stored;
    each product derives its weights in one fused pass: the CPU workaround of `infer.plan`).

Bit-packed codes are held as the matvec method reads them: bytes for 'lut' and 'unpack', bit
planes (2 bits/weight, base-3 grows by a quarter) for 'popcount', the default: the fastest
exact product on XLA:CPU from 1 to 64 rows (benchmarks/RESULTS.md §7), within ~1.1-1.7x of
unpacking to fp32 on a 256-token prefill.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mmfree_jax import registry
from mmfree_jax.numerics import quant
from mmfree_jax.numerics import ternary_packing as packing
from mmfree_jax.ops import bitlinear

# The code-format registry: name -> how the ternary codes are stored (PACKED = bit-packed by
# `ternary_packing`, else that dtype). Export, loading and the product all read it.
PACKED = "packed"
CODE_FORMATS = {
  "2bit": PACKED,
  "base3": PACKED,
  "int8": jnp.int8,
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
}
# The in-memory formats of a latent model quantized once (module docstring); never on disk.
FROZEN = "frozen"
LATENT_SCALE = "latent_scale"
FROZEN_FORMATS = (FROZEN, LATENT_SCALE)
FORMATS = (*CODE_FORMATS, *FROZEN_FORMATS)
# With method 'lut', bit-packed formats use the lookup-table matvec up to this many rows
# (tokens) per product: its table and gathered partial sums grow with the rows, while
# unpacking a block of codes and multiplying costs about the same for any row count. Both
# are exact. One CPU run, ms for the 2.7B's gate_proj (2560 x 13824) at 1 / 2 / 4 / 8 rows:
# 2-bit LUT 2.5 / 10.7 / 21 / 59 against unpack 7.3 / 7.4 / 8.6 / 10; base-3 LUT 2.2 / 9.7 /
# 25 / 57 against unpack 12.9 / 13.7 / 13.4 / 13.0 (a 1024 x 1024 matrix: the LUT wins to 2
# rows for both formats).
LUT_MAX_ROWS = {"2bit": 2, "base3": 2}
DEFAULT_METHOD = registry.DEFAULT_MATVEC_METHOD


class PackedLinear(NamedTuple):
  """One BitLinear's stored tensors (or a stack of them with a leading layer axis).

  `w`: packed uint8 `[..., packed_length(in), out]`, bit planes uint32 `[..., 2, out,
  plane_words(in)]` (method 'popcount'), codes `[..., in, out]` (int8/float), or for the
  frozen formats `freeze_weights`' weights `[..., in, out]`; `scale`: `[...]` fp32
  `max(mean|W|, 1e-5)`; `norm_scale`: `[..., in]` the RMSNorm gamma.
  """

  w: jax.Array
  scale: jax.Array
  norm_scale: jax.Array


def holds_planes(fmt: str, method: str) -> bool:
  """Whether codes of `fmt` are held in memory as bit planes (`ternary_packing.to_planes`)
  for `method`: 'popcount' on a bit-packed format."""
  return method == "popcount" and CODE_FORMATS.get(fmt) == PACKED


def _matvec(x_codes, w, fmt: str, method: str, n_in: int, layer=None) -> jax.Array:
  """Exact `x_codes @ w_codes` (integers), `[rows, in]` int8 → `[rows, out]`; `layer`: the
  layer of a stacked `w [layers, ...]`."""
  if holds_planes(fmt, method):
    return packing.planes_matvec(x_codes, w, n_in, layer=layer)
  if CODE_FORMATS[fmt] == PACKED:
    if method == "lut" and x_codes.shape[0] > LUT_MAX_ROWS[fmt]:
      # many rows (prefill, big batches): unpack and multiply, a block of columns at a time
      return packing.unpacked_matmul(x_codes, w, fmt, n_in, layer=layer)
    return packing.packed_matvec(x_codes, w, fmt, n_in, method, layer=layer)
  if fmt == "int8":
    return jax.lax.dot(x_codes, w, preferred_element_type=jnp.int32)
  # float storage: products and sums of small integers are exact in the fp32 accumulator
  return jnp.matmul(x_codes.astype(w.dtype), w, preferred_element_type=jnp.float32)


class PackedWeight(nnx.Variable):
  """A stored inference tensor of `PackedLM` (codes, scales, embeddings, norms)."""


class PackedCodes(PackedWeight):
  """Stacked bit-packed codes `[layers, ...]`, read in place by the layer scan
  (`read_in_place` leaves them unsliced; the product indexes its layer)."""


class QuantizedLinear(nnx.Module):
  """The BitLinear of inference: `[..., in]` → `[..., out]` in the compute dtype `dtype`, on
  the stored tensors of one `PackedLinear` in `fmt` (module docstring), computed by `method`.

  layers: the number of stacked layers whose codes this linear holds in place (bit-packed
  formats, stacked): it then keeps `layer`, the layer index, sliced to its layer by the
  scan like every other leaf, and reads its layer's codes at that index.
  """

  def __init__(self, p: PackedLinear, *, fmt: str, method: str, dtype, layers: int | None = None):
    self.fmt, self.method, self.dtype = fmt, method, dtype
    in_place = layers is not None and CODE_FORMATS.get(fmt) == PACKED
    self.w = (PackedCodes if in_place else PackedWeight)(p.w)
    self.scale = PackedWeight(p.scale)
    self.norm_scale = PackedWeight(p.norm_scale)
    self.layer = PackedWeight(jnp.arange(layers)) if in_place else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.fmt in FROZEN_FORMATS:
      return bitlinear.bitlinear_frozen(
        x,
        self.w[...],
        self.scale[...],
        self.norm_scale[...],
        impl=self.method,
        dtype=self.dtype,
        latent=self.fmt == LATENT_SCALE,
      )
    _, codes, sx = quant.bitlinear_input(x, self.norm_scale[...], quant.BITLINEAR_NORM_EPS)
    n_in = codes.shape[-1]
    layer = None if self.layer is None else self.layer[...]
    acc = _matvec(codes.reshape(-1, n_in), self.w[...], self.fmt, self.method, n_in, layer)
    acc = acc.reshape(codes.shape[:-1] + acc.shape[-1:])
    return quant.integer_output(acc, self.scale[...], sx, self.dtype)
