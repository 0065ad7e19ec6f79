"""mmfree_jax: MatMul-free language models (ternary BitLinear + MLGRU) in JAX/Flax NNX.

Top-level names are imported lazily, so `import mmfree_jax.data` (e.g. in grain worker
processes) does not pay for importing jax and flax.
"""

import importlib

_EXPORTS = {
  "ModelConfig": "mmfree_jax.config",
  "base_config": "mmfree_jax.config",
  "KVCache": "mmfree_jax.nn.model",
  "MatMulFreeLM": "mmfree_jax.nn.model",
  "RecurrentState": "mmfree_jax.nn.model",
  "TransformerLM": "mmfree_jax.nn.model",
  "abstract_model": "mmfree_jax.nn.model",
  "build_model": "mmfree_jax.nn.model",
  "count_params": "mmfree_jax.nn.model",
  "decode": "mmfree_jax.nn.model",
}

__all__ = sorted(_EXPORTS)


def lazy_exports(package: str, exports: dict[str, str]):
  """A package's module `__getattr__` that imports `exports[name]` (a module path) on the
  first access to `name`, so that importing the package stays light."""

  def __getattr__(name):  # pylint: disable=invalid-name
    if name in exports:
      return getattr(importlib.import_module(exports[name]), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  return __getattr__


__getattr__ = lazy_exports(__name__, _EXPORTS)
