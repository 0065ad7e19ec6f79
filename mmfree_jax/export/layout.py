"""The packed inference directory's layout: its files, every tensor with its shape and dtype per
format, and the error its writer (`export.writer`) and reader (`export.reader`) raise.

Layout of `DIR` (docs/architecture.md; `python -m mmfree_jax.export`):

    model.safetensors   the tensors below, metadata {"format": <fmt>, "mmfree_jax": "packed/1"}
    config.json         the workdir's full config (data.tokenizer pointing at the copy below)
    packed.json         {"format", "version", "step", "source", "embedding_dtype", "bytes"}
    tokenizer.json | tokenizer.model   the tokenizer, when the config names a file or a BPE

Tensors (L layers, P = every BitLinear: i/f/g/o_proj, gate_proj, down_proj, lm_head):

    embedding                      [vocab, d]          checkpoint dtype (or --embedding_dtype)
    embedding.scale                [vocab]             fp32, only for --embedding_dtype int8:
                                                       row ≈ codes / scale (lossy, opt-in)
    final_norm, lower_bounds       [d], [L, d]          fp32 (the effective forget-gate bounds)
    blocks.<l>.{attn,g,mlp}_norm   [d]                  fp32
    <P>.codes                      uint8 [packed_length(in), out] ('2bit', 'base3') or int8 /
                                   float [in, out]: `nn.packed.CODE_FORMATS`
    <P>.scale                      fp32 [1]: max(mean|W|, 1e-5)
    <P>.norm_scale                 fp32 [in]

The tensors are in `layout` order: the checkpoint's stacked leaves one after another, so the
writer restores each leaf once.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mmfree_jax import registry
from mmfree_jax.config import ModelConfig
from mmfree_jax.hf import tensors
from mmfree_jax.nn import packed
from mmfree_jax.numerics import ternary_packing as packing

VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "packed.json"
EXPORT_FORMATS = registry.EXPORT_FORMATS  # what the CLI offers; loading reads any CODE_FORMATS
LAYER_LINEARS = (
  ("attn", "i_proj"),
  ("attn", "f_proj"),
  ("attn", "g_proj"),
  ("attn", "o_proj"),
  ("mlp", "gate_proj"),
  ("mlp", "down_proj"),
)
LAYER_NORMS = {
  "attn_norm": ("attn_norm", "scale"),
  "g_norm": ("attn", "g_norm", "scale"),
  "mlp_norm": ("mlp_norm", "scale"),
}
INT8 = np.dtype(np.int8)
F32 = np.dtype(np.float32)
EMBEDDING_DTYPES = {
  "float32": F32,
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float64": np.dtype(np.float64),
  "int8": INT8,
}
STORED_DTYPES = {**tensors.SAFETENSORS_DTYPES, "U8": np.dtype(np.uint8), "I8": INT8}


class PackedDirError(ValueError):
  """A packed directory (or a request to write one) that cannot be used; names the file."""


def code_shape(n_in: int, n_out: int, fmt: str) -> tuple[tuple[int, int], np.dtype]:
  """Shape and dtype of the stored codes of an `[n_in, n_out]` kernel in `fmt`."""
  kind = packed.CODE_FORMATS[fmt]
  if kind == packed.PACKED:
    return (packing.packed_length(n_in, fmt), n_out), np.dtype(np.uint8)
  return (n_in, n_out), np.dtype(ml_dtypes.bfloat16 if kind == jnp.bfloat16 else kind)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  d, inter = cfg.d_model, cfg.intermediate_size
  return {
    "i_proj": (d, d),
    "f_proj": (d, d),
    "g_proj": (d, d),
    "o_proj": (d, d),
    "gate_proj": (d, 2 * inter),
    "down_proj": (inter, d),
  }


def stat_dtype(cfg: ModelConfig) -> np.dtype:
  """Norm scales, weight scales and lower bounds: fp32 (f64 for a float64 checkpoint)."""
  return np.dtype(np.float64) if cfg.param_dtype == "float64" else F32


def layout(
  cfg: ModelConfig, fmt: str, embedding_dtype: np.dtype
) -> list[tuple[str, tuple, np.dtype]]:
  """Every stored tensor `(name, shape, dtype)` in file order: the checkpoint's stacked leaves
  one after another (so export restores each leaf once)."""
  d, layers = cfg.d_model, cfg.num_layers
  stat = stat_dtype(cfg)
  out = [("embedding", (cfg.vocab_size, d), embedding_dtype)]
  if embedding_dtype == INT8:
    out.append(("embedding.scale", (cfg.vocab_size,), stat))
  out += [("final_norm", (d,), stat), ("lower_bounds", (layers, d), stat)]
  for name in LAYER_NORMS:
    out += [(f"blocks.{l}.{name}", (d,), stat) for l in range(layers)]
  linears = [
    (f"blocks.{l}.{proj}", shape)
    for proj, shape in linear_shapes(cfg).items()
    for l in range(layers)
  ] + [("lm_head", (d, cfg.vocab_size))]
  for prefix, (n_in, n_out) in linears:
    shape, dtype = code_shape(n_in, n_out, fmt)
    out += [
      (f"{prefix}.codes", shape, dtype),
      (f"{prefix}.scale", (1,), stat),
      (f"{prefix}.norm_scale", (n_in,), stat),
    ]
  return out
