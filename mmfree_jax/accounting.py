"""FLOPs, parameters and memory of a model, counted from its own parameter shapes.

Every count here reads `nn.model.abstract_model(cfg)` (shapes only, nothing allocated), so a
change in the model (grouped-query K/V, a wider head, an extra projection) changes the counts
with it; nothing assumes that a projection is `d x d`. MFU (train/metrics), the benchmarks'
rooflines and the generation memory guard all read these.

FLOP convention (PaLM's, dense-equivalent): a matmul with `n` weights costs `2 n` FLOPs per
token forward and `4 n` backward; ternary matmuls count as dense (that is what the hardware
runs); element-wise work (norms, gates, the MLGRU recurrence: O(d) per token) is not counted.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from mmfree_jax.config import ModelConfig
from mmfree_jax.nn import model as model_lib


@functools.lru_cache(maxsize=32)
def param_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """`{"blocks/attn/q_proj/kernel": ShapeDtypeStruct, ...}` of the model's parameters."""
  state = nnx.state(model_lib.abstract_model(cfg), nnx.Param)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    out["/".join(k for k in keys if k != "value")] = leaf
  return out


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters."""
  return int(sum(np.prod(s.shape) for s in param_shapes(cfg).values()))


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: every projection kernel (stacked layers
  included), the LM head's too; the embedding is a lookup and is excluded."""
  return int(
    sum(np.prod(s.shape) for p, s in param_shapes(cfg).items() if p.rsplit("/", 1)[-1] == "kernel")
  )


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of causal softmax attention (Transformer++; 0 for MatMul-free).

  `Q K^T` and `A V` each cost `2 T (heads x head_dim)` per token over the full window, half of
  it causal: `2 T heads head_dim` per layer. Grouped K/V heads do not reduce it (every query
  head attends)."""
  if cfg.kind != "transformer":
    return 0.0
  return 2.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward, no remat recompute): `6 N` for the
  `N = matmul_params` weights plus three times the causal attention forward."""
  return 6.0 * matmul_params(cfg) + 3.0 * attention_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one forward token: `2 N` plus the causal attention forward."""
  return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def param_bytes(cfg: ModelConfig, dtype=None, *, matmul_only: bool = False) -> int:
  """Bytes of the parameters, each in its stored dtype or all in `dtype` (e.g. the compute
  dtype of a frozen decode copy; `jnp.int8` for int8 codes); `matmul_only` counts the
  projection kernels only (what a frozen or quantized copy holds)."""
  total = 0
  for path, s in param_shapes(cfg).items():
    if matmul_only and path.rsplit("/", 1)[-1] != "kernel":
      continue
    total += int(np.prod(s.shape)) * np.dtype(dtype or s.dtype).itemsize
  return total


def decode_state_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes of the decode state `model.init_state(batch, max_len)` allocates: the KV cache of
  `max_len` positions for Transformer++ (K/V width from its `num_kv_heads`), the constant
  `[layers, batch, d]` recurrent state for MatMul-free (the cache's position scalar aside)."""
  model = model_lib.abstract_model(cfg)
  state = jax.eval_shape(lambda: model.init_state(batch, max_len))
  return int(
    sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state) if x.ndim)
  )


def kv_cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes of a Transformer++ KV cache of `max_len` positions; 0 for MatMul-free (no cache)."""
  return decode_state_bytes(cfg, batch, max_len) if cfg.kind == "transformer" else 0
