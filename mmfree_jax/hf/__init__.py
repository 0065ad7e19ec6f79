"""Hugging Face checkpoint interop for the released MatMul-free LMs (`ridger/MMfreeLM-*`).

    python -m mmfree_jax.hf import --src HF_DIR --workdir DIR [--dtype float32]
    python -m mmfree_jax.hf import --arch llama --src HF_DIR --workdir DIR  # a Transformer++
    python -m mmfree_jax.hf export --workdir DIR --dst HF_DIR [--dtype bfloat16] [--step N]

`mapping` holds the config translation and the one name table import and export share,
`tensors` the tensor-by-tensor readers and the streaming safetensors writer, `checkpoint_io`
the checkpoint import and export (docs/architecture.md §1.6); `llama` imports
LlamaForCausalLM-layout Transformers; `staging` publishes a new folder whole (on a disk or a
`gs://`/`s3://` bucket). Sources and destinations may be bucket paths.
"""

from mmfree_jax import lazy_exports

# Imported on first use: `mmfree_jax.hf.tensors` (the safetensors reader the packed format
# uses) must not pull in the conversions' checkpoint and data stacks.
_EXPORTS = {
  "export_checkpoint": "mmfree_jax.hf.checkpoint_io",
  "import_checkpoint": "mmfree_jax.hf.checkpoint_io",
  "mistral_tokenizer_path": "mmfree_jax.data.tokenizer",
  "NAME_TABLE": "mmfree_jax.hf.mapping",
  "HFCheckpointError": "mmfree_jax.hf.mapping",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
