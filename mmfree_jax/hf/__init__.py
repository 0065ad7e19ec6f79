"""Hugging Face checkpoint interop for the released MatMul-free LMs (`ridger/MMfreeLM-*`).

    python -m mmfree_jax.hf import --src HF_DIR --workdir DIR [--dtype float32]
    python -m mmfree_jax.hf import --arch llama --src HF_DIR --workdir DIR  # a Transformer++
    python -m mmfree_jax.hf export --workdir DIR --dst HF_DIR [--dtype bfloat16] [--step N]

`mapping` holds the config translation and the one name table import and export share,
`tensors` the tensor-by-tensor readers and the streaming safetensors writer, `convert` the two
conversions (docs/architecture.md §1.6); `llama` imports LlamaForCausalLM-layout
Transformers.
"""

from mmfree_jax.hf.convert import (export_checkpoint, import_checkpoint,
                                   mistral_tokenizer_path)
from mmfree_jax.hf.mapping import NAME_TABLE, HFCheckpointError

__all__ = ["NAME_TABLE", "HFCheckpointError", "export_checkpoint", "import_checkpoint",
           "mistral_tokenizer_path"]
