"""Config: the schema (ml-collections), its validation, and the frozen configs the modules take.

`schema.SCHEMA` declares every key once (default, help, validator). `base_config()` is the whole
schema with defaults; the files in `configs/` start from it, change values and `lock()` it, so
that an unknown key (a typo in a `--config.x.y=v` override or in a config file) raises instead
of being silently ignored. `validate(cfg)` checks everything in one pass and returns the
`ModelConfig`; `ModelConfig.from_config(cfg.model)` validates the model section alone.
"""

from mmfree_jax.config import model as _model
from mmfree_jax.config.checks import Check
from mmfree_jax.config.distill import DistillSettings
from mmfree_jax.config.impls import describe_impls
from mmfree_jax.config.model import (
  ConfigError,
  ModelConfig,
  intermediate_size_for,
  resolve_dtype,
)
from mmfree_jax.config.presets import PAPER_RECIPE, PAPER_SIZES, paper_config
from mmfree_jax.config.schema import (
  EVERY_KEYS,
  MODEL_KINDS,
  NAN_POLICIES,
  SCHEMA,
  TRACKERS,
  Field,
  base_config,
  base_model_config,
  check_override_keys,
  config_from_dict,
  config_help,
  describe,
)
from mmfree_jax.config.validation import (
  config_errors,
  fit_warmup,
  mixture_weights,
  validate,
  validate_data,
)

__all__ = [
  "DTYPES",
  "EVERY_KEYS",
  "MODEL_KINDS",
  "NAN_POLICIES",
  "PAPER_RECIPE",
  "PAPER_SIZES",
  "REMAT_POLICIES",
  "SCHEMA",
  "TRACKERS",
  "Check",
  "ConfigError",
  "DistillSettings",
  "Field",
  "ModelConfig",
  "base_config",
  "base_model_config",
  "check_override_keys",
  "config_errors",
  "config_from_dict",
  "config_help",
  "describe",
  "describe_impls",
  "fit_warmup",
  "intermediate_size_for",
  "mixture_weights",
  "paper_config",
  "resolve_dtype",
  "validate",
  "validate_data",
]


def __getattr__(name):  # pylint: disable=invalid-name
  """`DTYPES` and `REMAT_POLICIES` import jax: built on first access (`config.model`)."""
  if name in ("DTYPES", "REMAT_POLICIES"):
    return getattr(_model, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
