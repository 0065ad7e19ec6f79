"""What the `auto` implementation choices of a model config run on a platform, in words."""

from __future__ import annotations

from mmfree_jax.config.model import ModelConfig
from mmfree_jax.registry import (
  SPLASH_MIN_SEQ,
  resolve_attention_impl,
  resolve_bitlinear_impl,
  resolve_scan_type,
)


def describe_impls(cfg: ModelConfig, platform: str) -> str:
  """One line naming what `model.scan_type` and `model.bitlinear_impl` (MatMul-free) or
  `model.attention_impl` (Transformer++) run on `platform` ('gpu', 'tpu' or 'cpu':
  `kernels.dispatch.platform_of` of the mesh's devices), for a run's startup banner, e.g.
  "scan_type=auto -> pallas (Mosaic kernel); bitlinear_impl=auto -> fused (Mosaic quantizer
  kernel + XLA matmul)"."""
  if cfg.kind != "mmfree":
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    attn = resolve_attention_impl(
      cfg.attention_impl, jnp.dtype(cfg.compute_dtype).name, cfg.head_dim, platform=platform
    )
    attn_what = {
      "cudnn": "cuDNN flash attention",
      "xla": "XLA attention",
      "naive": "T x T reference",
    }.get(attn)
    if attn == "splash":
      attn_what = {
        "tpu": "Pallas splash attention, Mosaic kernel",
        "gpu": "no GPU kernel: XLA attention",
      }.get(platform, "TPU kernel in Pallas interpret mode, slow")
      if cfg.attention_impl == "auto":
        attn_what += f"; XLA's for windows under {SPLASH_MIN_SEQ} tokens"
    return (
      f"Transformer++: attention_impl={cfg.attention_impl} -> {attn} ({attn_what}) on "
      f"{platform}; no recurrence, no BitLinear (scan_type/bitlinear_impl unused)"
    )
  kernel = {"gpu": "Triton", "tpu": "Mosaic"}.get(platform)
  scan = resolve_scan_type(cfg.scan_type, platform)
  impl = resolve_bitlinear_impl(cfg.bitlinear_impl, platform)
  scan_what = (
    (f"{kernel} kernel" if kernel else "TPU kernel in Pallas interpret mode, slow")
    if scan == "pallas"
    else "pure JAX"
  )
  impl_what = (
    (
      f"{kernel} quantizer kernel + XLA matmul"
      if kernel
      else "TPU quantizer kernel in Pallas interpret mode, slow"
    )
    if impl == "fused"
    else "pure JAX"
  )
  return (
    f"scan_type={cfg.scan_type} -> {scan} ({scan_what}); "
    f"bitlinear_impl={cfg.bitlinear_impl} -> {impl} ({impl_what}) on {platform}"
  )
