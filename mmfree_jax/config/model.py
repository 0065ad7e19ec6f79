"""`ModelConfig`: the validated, frozen `model` section the modules take (its fields are the
schema's `model` keys, with the schema's defaults)."""

from __future__ import annotations

import dataclasses
import math

from mmfree_jax.config import schema


def _dtypes() -> dict:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  out = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
  }
  assert tuple(out) == schema.DTYPE_NAMES
  return out


def _remat_policies() -> dict:
  """The `model.remat` registry: name -> what the layer scan saves for the backward (None: no
  remat)."""
  import jax  # pylint: disable=import-outside-toplevel

  out = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  assert tuple(out) == schema.REMAT_NAMES
  return out


# `DTYPES` and `REMAT_POLICIES` hold jax objects, built on first access: the config (its schema,
# validation and `ModelConfig`) imports without jax, so a CLI reports a bad config in a second.
_LAZY = {"DTYPES": _dtypes, "REMAT_POLICIES": _remat_policies}


def __getattr__(name):  # pylint: disable=invalid-name
  if name in _LAZY:
    value = _LAZY[name]()
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
  """Bad config values: every problem found, one line each."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    if len(self.problems) == 1:
      super().__init__(self.problems[0])
    else:
      super().__init__(f"{len(self.problems)} config errors:\n  " + "\n  ".join(self.problems))


def resolve_dtype(name: str):
  """Maps a dtype name from the config to a jnp dtype, with an error naming the choices.

  `auto` is bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are emulated).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  try:
    return _dtypes()[name]
  except (KeyError, TypeError):
    names = sorted(schema.DTYPE_NAMES) + ["auto"]
    raise ValueError(f"unknown dtype {name!r}; choose one of {names}") from None


def intermediate_size_for(d_model: int, hidden_ratio: int) -> int:
  """The reference's GLU width: `256 * ceil(int(d * hidden_ratio * 2/3) / 256)`."""
  return 256 * math.ceil(int(d_model * hidden_ratio * 2 / 3) / 256)


def field_errors(section: str, values: dict) -> list[str]:
  """Each schema check of `section` that `values` fails, one line each."""
  out = []
  for key, field in schema.SCHEMA[section].items():
    if key in values:
      error = field.check.error(f"{section}.{key}", values[key])
      if error:
        out.append(error)
  return out


def section_values(section: str, given) -> dict:
  """`given` (a ConfigDict or dict) over the section's defaults; unknown keys raise."""
  values = dict(given.to_dict() if hasattr(given, "to_dict") else given)
  known = schema.SCHEMA[section]
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ConfigError([f"unknown {section} config keys {unknown}; known keys: {sorted(known)}"])
  return {**schema.section_defaults(section), **values}


def model_errors(cfg) -> list[str]:
  """Checks across model keys (each key's own check is in the schema)."""
  if cfg.kind != "transformer" or any(
    not isinstance(getattr(cfg, k), int) or getattr(cfg, k) < 1 for k in ("d_model", "num_heads")
  ):
    return []
  if cfg.d_model % cfg.num_heads:
    return [
      f"model.d_model={cfg.d_model} is not divisible by model.num_heads="
      f"{cfg.num_heads}; pick num_heads dividing d_model"
    ]
  out = []
  if isinstance(cfg.num_kv_heads, int) and cfg.num_heads % cfg.num_kv_heads:
    out.append(
      f"model.num_kv_heads={cfg.num_kv_heads!r} must be a positive divisor of "
      f"model.num_heads={cfg.num_heads} (grouped-query attention)"
    )
  if cfg.head_dim % 2:
    out.append(f"head_dim={cfg.head_dim} must be even for RoPE; change model.num_heads")
  return out


class _ModelConfigMethods:
  """What `ModelConfig` adds to its schema fields."""

  @property
  def compute_dtype(self):
    return resolve_dtype(self.dtype)

  @property
  def weight_dtype(self):
    return resolve_dtype(self.param_dtype)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    """Validates a `model` config section (ConfigDict or dict) and freezes it; a
    `ConfigError` lists every bad key."""
    values = section_values("model", model_cfg)
    problems = field_errors("model", values)
    if not problems:
      if values["intermediate_size"] is None:
        values["intermediate_size"] = intermediate_size_for(
          values["d_model"], values["hidden_ratio"]
        )
      if values["num_kv_heads"] is None:
        values["num_kv_heads"] = values["num_heads"]
      problems = model_errors(cls(**values))
    if problems:
      raise ConfigError(problems)
    return cls(**values)

  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """A small model for tests and notebooks."""
    return cls.from_config(
      {"vocab_size": 256, "d_model": 64, "num_layers": 2, "num_heads": 4, **overrides}
    )

  def validate(self) -> None:
    problems = field_errors("model", dataclasses.asdict(self)) or model_errors(self)
    if problems:
      raise ConfigError(problems)


def section_dataclass(name: str, section: str, base: type, doc: str) -> type:
  """A frozen (hashable) dataclass whose fields are the section's keys and defaults."""
  fields = []
  for key, field in schema.SCHEMA[section].items():
    kind = field.placeholder or type(field.default)
    annotation = f"{kind.__name__} | None" if field.placeholder else kind.__name__
    fields.append((key, annotation, dataclasses.field(default=field.default)))
  cls = dataclasses.make_dataclass(
    name,
    fields,
    bases=(base,),
    frozen=True,
    namespace={"__doc__": doc, "__module__": base.__module__},
  )
  return cls


ModelConfig = section_dataclass(
  "ModelConfig",
  "model",
  _ModelConfigMethods,
  "Validated model hyper-parameters (hashable: usable as a static jit argument); one field "
  "per `model` key of the schema. `from_config` resolves `intermediate_size` and "
  "`num_kv_heads` from None.",
)
