"""mmfree_jax: MatMul-free language models (ternary BitLinear + MLGRU) in JAX/Flax NNX."""

from mmfree_jax.config import ModelConfig, base_config
from mmfree_jax.model import (KVCache, MatMulFreeLM, RecurrentState, TransformerLM,
                              abstract_model, build_model, count_params, decode)

__all__ = [
    "ModelConfig", "base_config", "KVCache", "MatMulFreeLM", "RecurrentState", "TransformerLM",
    "abstract_model", "build_model", "count_params", "decode",
]
