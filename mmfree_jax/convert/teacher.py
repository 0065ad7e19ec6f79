"""Reading a distillation teacher: one of our Transformer++ workdirs or an HF Llama folder.

`read_teacher_config` reads only `config.json` (so a teacher is checked against the student
before anything is loaded); `load_teacher_params` then loads the params straight into the
shardings the caller gives (a workdir restores into them, an HF folder is placed after
reading). The trainer (`mmfree_jax.train.distill`) uses both; HF files are read here, not
in `train/`.
"""

from __future__ import annotations

import json

import jax

from mmfree_jax import paths
from mmfree_jax.checkpoint import loading
from mmfree_jax.config import ModelConfig
from mmfree_jax.hf import llama
from mmfree_jax.hf import mapping as hf_mapping
from mmfree_jax.hf import tensors as hf_tensors


def teacher_source(path: str) -> str:
  """'workdir' (ours: config.json with a model section) or 'llama' (an HF folder)."""
  config = json.loads(paths.read_text(paths.join(path, "config.json")))
  if isinstance(config, dict) and "model" in config:
    return "workdir"
  if isinstance(config, dict) and "model_type" in config:
    return "llama"
  raise ValueError(
    f"{path}/config.json is neither an mmfree_jax workdir config nor an HF "
    "config (no 'model' section, no 'model_type')"
  )


def read_teacher_config(path: str, student: ModelConfig) -> ModelConfig:
  """The teacher's model config at `path`, from its config.json only (nothing loaded).

  The teacher computes in the student's compute dtype (`model.dtype`) with the student's remat
  policy; its params keep their stored dtype (an HF teacher is read in the student's
  param_dtype).
  """
  overrides = {"dtype": student.dtype, "remat": student.remat}
  if teacher_source(path) == "workdir":
    section = loading.load_workdir_config(path).model.to_dict()
  else:
    section = llama.model_section_from_llama(hf_tensors.read_hf_config(path), student.param_dtype)
  section.update(overrides)
  teacher = ModelConfig.from_config(section)
  if teacher.kind != "transformer":
    raise ValueError(
      f"distill.teacher={path!r} holds a model.kind={teacher.kind!r} model; the "
      "teacher must be a Transformer++ (kind 'transformer') or an HF Llama"
    )
  return teacher


def load_teacher_params(
  path: str, teacher: ModelConfig, step: int | None = None, shardings=None
) -> dict:
  """The teacher's params (a workdir's `step`, default its latest), placed with `shardings`
  (None: the default device)."""
  if teacher_source(path) == "workdir":
    params, _ = loading.load_params(path, teacher, step, param_shardings=shardings)
    return params
  _, flat = llama.load_llama(path, dtype=teacher.param_dtype)
  return jax.device_put(hf_mapping.unflatten(flat), shardings)
