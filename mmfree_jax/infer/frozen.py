"""Quantize-once BitLinears for inference: `FrozenBitLinear` replaces a trained `BitLinear` in
a copy of the model, with the same call (`[..., in]` → `[..., out]` in the compute dtype) and
the same outputs, but its ternary weights computed once instead of at every call (a decode
step would otherwise re-quantize every weight at every token).
"""

from __future__ import annotations

import jax
from flax import nnx

from mmfree_jax.nn import layers
from mmfree_jax.ops import bitlinear


class FrozenBitLinear(nnx.Module):
  """A `layers.BitLinear` with its weights quantized once (`bitlinear.freeze_weights`).

  Params: `weights` (the int8 codes for `bitlinear_impl=int8`, else the STE weights in the
  compute dtype; the latent kernel itself when `latent`), `w_mean_abs` (its scale),
  `norm_scale`; with a leading layer axis on each when made from stacked layers. Not
  trainable.

  latent: keep the latent kernel and store only its scale; each call derives the weights in
  one fused element-wise pass (no second copy of them: for the in-place layer loop, where
  every call converts its weights anyway).
  """

  def __init__(self, layer: layers.BitLinear, *, latent: bool = False):
    self.impl, weights, mean_abs = bitlinear.freeze_weights(
      layer.kernel[...], layer.impl, layer.dtype, keep_latent=latent
    )
    self.latent = latent
    self.eps = layer.eps
    self.dtype = layer.dtype
    self.weights = nnx.Param(weights)
    self.w_mean_abs = nnx.Param(mean_abs)
    self.norm_scale = nnx.Param(layer.norm_scale[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    return bitlinear.bitlinear_frozen(
      x,
      self.weights[...],
      self.w_mean_abs[...],
      self.norm_scale[...],
      impl=self.impl,
      eps=self.eps,
      dtype=self.dtype,
      latent=self.latent,
    )


def freeze_bitlinears(module: nnx.Module, *, latent: bool = False) -> nnx.Module:
  """In place: every `BitLinear` inside `module` (or `module` itself) becomes a
  `FrozenBitLinear`. Returns `module` (or its replacement). Call it on a copy."""
  if isinstance(module, layers.BitLinear):
    return FrozenBitLinear(module, latent=latent)
  for name, child in list(vars(module).items()):
    if isinstance(child, nnx.Module):
      setattr(module, name, freeze_bitlinears(child, latent=latent))
  return module
