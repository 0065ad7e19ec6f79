"""Packed ternary inference directories: a training workdir → a small file → tokens.

    python -m mmfree_jax.export --workdir W [--step N] --format 2bit|base3|int8 --dst DIR
    python eval.py --packed DIR --prompt "..." --mc_file ... --ppl_file ...

`packed_dir` holds the file layout, the streaming export (one checkpoint leaf in memory at a
time) and `load_packed`, which returns a `nn.packed.PackedLM`: the same call contract as the
latent `MatMulFreeLM`, so `generate`, `eval` and the lm-eval adapter run on it unchanged.
"""

from mmfree_jax.export.packed_dir import (EXPORT_FORMATS, PackedDirError, export_workdir,
                                          layout, load_config, load_packed)

__all__ = ["EXPORT_FORMATS", "PackedDirError", "export_workdir", "layout", "load_config",
           "load_packed"]
