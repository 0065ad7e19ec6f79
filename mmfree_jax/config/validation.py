"""Validation of a whole config in one pass: every key's own check (from the schema), then the
rules across keys; one `ConfigError` lists every problem with its fix."""

from __future__ import annotations

import math

import ml_collections

from mmfree_jax.config import schema
from mmfree_jax.config.distill import distill_errors
from mmfree_jax.config.model import ConfigError, ModelConfig, field_errors, section_values


def mixture_weights(mixture: str) -> list[float] | None:
  """`data.mixture` parsed: None when empty, else finite weights >= 0 with a positive sum."""
  if not (mixture or "").strip():
    return None
  try:
    weights = [float(w) for w in mixture.split(",")]
  except ValueError:
    raise ValueError(
      f"data.mixture={mixture!r} must be comma-separated numbers, one weight "
      "per data.paths folder (e.g. 0.7,0.3)"
    ) from None
  if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(
      f"data.mixture={mixture!r}: weights must be finite, >= 0 and sum to a positive number"
    )
  return weights


def data_errors(data_cfg) -> list[str]:
  """The data section's rules across keys (files and folders are checked when opened)."""
  out = []
  if data_cfg.get("mixture") and data_cfg.get("source") != "array_record":
    out.append(
      "data.mixture weights prepared folders: set --config.data.source=array_record, "
      "or clear --config.data.mixture"
    )
  try:
    mixture_weights(data_cfg.get("mixture", ""))
  except (ValueError, AttributeError) as e:
    out.append(str(e))
  return out


def validate_data(data_cfg) -> None:
  """Raises a `ConfigError` listing the data section's problems."""
  problems = field_errors("data", dict(data_cfg)) + data_errors(data_cfg)
  if problems:
    raise ConfigError(problems)


def loss_chunk_errors(cfg: ml_collections.ConfigDict) -> list[str]:
  """`train.loss_chunk_tokens` must split evenly over the context shards (each chunk's
  positions are spread over them; `numerics.chunked_loss`)."""
  chunk = cfg.train.get("loss_chunk_tokens", 0) if "train" in cfg else 0
  context = cfg.mesh.shape.get("context", 1) if "mesh" in cfg else 1
  if not (isinstance(chunk, int) and isinstance(context, int)) or chunk <= 0 or context <= 1:
    return []
  if chunk % context:
    return [
      f"train.loss_chunk_tokens={chunk} is not a multiple of mesh.shape.context={context}; "
      f"set --config.train.loss_chunk_tokens to a multiple of {context} (or 0: unchunked)"
    ]
  return []


def context_errors(cfg: ml_collections.ConfigDict) -> list[str]:
  """`data.seq_len` must split evenly over the context shards: a length they do not divide
  runs unsplit on every device (correct, but without the memory the context axis buys)."""
  seq_len = cfg.data.get("seq_len") if "data" in cfg else None
  context = cfg.mesh.shape.get("context", 1) if "mesh" in cfg else 1
  if not (isinstance(seq_len, int) and isinstance(context, int)) or context <= 1:
    return []
  if seq_len % context:
    return [
      f"data.seq_len={seq_len} is not a multiple of mesh.shape.context={context}; set "
      f"--config.data.seq_len to a multiple of {context}"
    ]
  return []


def _model_problems(model_section) -> tuple[list[str], ModelConfig | None]:
  try:
    values = section_values("model", model_section)
  except ConfigError as e:
    return e.problems, None
  try:
    return [], ModelConfig.from_config(values)
  except ConfigError as e:
    return e.problems, None


def config_errors(cfg: ml_collections.ConfigDict) -> tuple[list[str], ModelConfig | None]:
  """Every problem of `cfg` (one line each, naming the key, its value and the fix), and the
  model config when the model section is fine."""
  problems, model = _model_problems(cfg.model)
  for section in schema.SCHEMA:
    if section != "model" and section in cfg:
      values = dict(cfg[section])
      problems += distill_errors(values) if section == "distill" else field_errors(section, values)
  if "data" in cfg:
    problems += data_errors(cfg.data)
  if "mesh" in cfg and field_errors("mesh", dict(cfg.mesh)) == []:
    from mmfree_jax.parallel import axes  # pylint: disable=import-outside-toplevel

    problems += axes.check_rules(cfg.mesh.axis_rules)
    problems += loss_chunk_errors(cfg) + context_errors(cfg)
  if model is not None and "data" in cfg:
    seq_len = cfg.data.get("seq_len")
    if (
      model.kind == "mmfree"
      and model.scan_type == "chunked"
      and isinstance(seq_len, int)
      and seq_len % model.chunk_size
    ):
      problems.append(
        f"data.seq_len={seq_len} is not divisible by model.chunk_size={model.chunk_size} "
        "with model.scan_type='chunked'; set --config.model.chunk_size to a divisor of "
        "seq_len or --config.model.scan_type=sequential"
      )
  return problems, model


def validate(cfg: ml_collections.ConfigDict) -> ModelConfig:
  """Checks a whole config before any compute; returns the frozen model config. Raises one
  `ConfigError` (a ValueError) listing every problem."""
  problems, model = config_errors(cfg)
  if problems:
    raise ConfigError(problems)
  return model


def fit_warmup(cfg: ml_collections.ConfigDict) -> str | None:
  """Scales `optim.warmup_steps` down for a run shorter than it (in place); returns a note.

  A warmup of at least `train.steps` would leave no decay (and the smoke test
  `--config.train.steps=20` would trip over a default warmup of 30): it becomes 10% of the run.
  """
  steps, warmup = cfg.train.steps, cfg.optim.warmup_steps
  if warmup < steps:
    return None
  cfg.optim.warmup_steps = steps // 10
  return (
    f"optim.warmup_steps={warmup} is not shorter than train.steps={steps}; using "
    f"{cfg.optim.warmup_steps} (10% of the run). Set --config.optim.warmup_steps to "
    "choose another"
  )
