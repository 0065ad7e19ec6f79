"""Hugging Face checkpoint interop for the released MatMul-free LMs (`ridger/MMfreeLM-*`).

    python -m mmfree_jax.hf import --src HF_DIR --workdir DIR [--dtype float32]
    python -m mmfree_jax.hf import --arch llama --src HF_DIR --workdir DIR  # a Transformer++
    python -m mmfree_jax.hf export --workdir DIR --dst HF_DIR [--dtype bfloat16] [--step N]

`mapping` holds the config translation and the one name table import and export share,
`tensors` the tensor-by-tensor readers and the streaming safetensors writer, `convert` the two
conversions (docs/architecture.md §1.6); `llama` imports LlamaForCausalLM-layout
Transformers.
"""

import importlib

# Imported on first use: `mmfree_jax.hf.tensors` (the safetensors reader the packed format
# uses) must not pull in the conversions' checkpoint and data stacks.
_EXPORTS = {"export_checkpoint": "convert", "import_checkpoint": "convert",
            "mistral_tokenizer_path": "convert", "NAME_TABLE": "mapping",
            "HFCheckpointError": "mapping"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mmfree_jax.hf.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'mmfree_jax.hf' has no attribute {name!r}")
