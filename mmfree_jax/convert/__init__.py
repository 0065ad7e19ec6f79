"""Transformer → MatMul-free LM conversion: the student's initialisation from a teacher.

Its own package rather than part of `mmfree_jax.hf`: it maps our Transformer++ params onto our
MatMul-free params, whatever the teacher came from (an HF Llama import or one of our own
training workdirs), and `mmfree_jax.train.distill` and the notebooks use it without any HF file.
"""

from mmfree_jax.convert.calibrate import (
  CALIBRATIONS,
  Calibration,
  calibration_from_teacher,
  input_rms,
  named_calibration,
  needs_batch,
  teacher_projection_inputs,
  ternary_gain,
)
from mmfree_jax.convert.student import (
  ConversionError,
  check_compatible,
  init_student_params,
  student_config,
)

__all__ = [
  "CALIBRATIONS",
  "Calibration",
  "ConversionError",
  "calibration_from_teacher",
  "check_compatible",
  "init_student_params",
  "input_rms",
  "named_calibration",
  "needs_batch",
  "student_config",
  "teacher_projection_inputs",
  "ternary_gain",
]
