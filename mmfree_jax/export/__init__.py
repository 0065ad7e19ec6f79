"""Packed ternary inference directories: a training workdir → a small file → tokens.

    python -m mmfree_jax.export --workdir W [--step N] --format 2bit|base3|int8 --dst DIR
    python eval.py --packed DIR --prompt "..." --mc_file ... --ppl_file ...

`layout` describes the directory; `writer` exports a workdir into one (one checkpoint leaf in
memory at a time); `reader.load_packed` returns a `nn.packed.PackedLM`: the same call contract
as the latent `MatMulFreeLM`, so `generate`, `eval` and the lm-eval adapter run on it
unchanged. The names below import their module on first use, so loading a directory never
imports the writer's checkpoint and data libraries.
"""

from mmfree_jax import lazy_exports

_EXPORTS = {
  "EXPORT_FORMATS": "mmfree_jax.export.layout",
  "PackedDirError": "mmfree_jax.export.layout",
  "layout": "mmfree_jax.export.layout",
  "export_workdir": "mmfree_jax.export.writer",
  "write_packed": "mmfree_jax.export.writer",
  "load_config": "mmfree_jax.export.reader",
  "load_packed": "mmfree_jax.export.reader",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
