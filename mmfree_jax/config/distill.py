"""`DistillSettings`: the validated, frozen `distill` section (its fields are the schema's
`distill` keys, with the schema's defaults); `mmfree_jax.train.distill` runs it."""

from __future__ import annotations

import dataclasses

from mmfree_jax import paths
from mmfree_jax.config.model import ConfigError, field_errors, section_dataclass, section_values


def distill_errors(values: dict) -> list[str]:
  """The distill section's checks: each key's own, then that the teacher folder has a
  config.json (only when the keys are fine and a teacher is set)."""
  problems = field_errors("distill", values)
  teacher = values.get("teacher")
  if not problems and teacher and not paths.isfile(paths.join(teacher, "config.json")):
    problems.append(
      f"distill.teacher={teacher!r} has no config.json: pass one of our "
      "Transformer++ workdirs or an HF Llama folder (config.json + safetensors)"
    )
  return problems


class _DistillMethods:
  """What `DistillSettings` adds to its schema fields."""

  @property
  def enabled(self) -> bool:
    return bool(self.teacher)

  @classmethod
  def from_config(cls, section) -> "DistillSettings":
    values = section_values("distill", section)
    problems = distill_errors(values)
    if problems:
      raise ConfigError(problems)
    return cls(**values)

  def validate(self) -> None:
    problems = distill_errors(dataclasses.asdict(self))
    if problems:
      raise ConfigError(problems)

  def check_student(self, student) -> None:
    """Raises unless `student` (a ModelConfig) can be distilled into with these settings."""
    if student.kind != "mmfree":
      raise ValueError(
        f"distillation trains a MatMul-free student: set model.kind='mmfree' (got {student.kind!r})"
      )
    if self.quant_ramp_steps and student.bitlinear_impl != "autodiff":
      raise ValueError(
        "distill.quant_ramp_steps > 0 needs model.bitlinear_impl='autodiff' (the "
        "lean BitLinear's custom backward assumes full quantization)"
      )


DistillSettings = section_dataclass(
  "DistillSettings",
  "distill",
  _DistillMethods,
  "The validated `distill` config section (hashable); one field per `distill` key.",
)
