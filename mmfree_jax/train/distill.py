"""Distilling a Transformer++ teacher into a MatMul-free student (the `distill` config section).

    python train.py --config=configs/tiny.py --config.distill.teacher=TEACHER --workdir=W

TEACHER is one of our Transformer++ workdirs or an HF Llama folder (`mmfree_jax.convert.teacher`).
With `distill.init='teacher'` the student starts from `convert.init_student_params`: the
teacher's V/K/Q in the MLGRU's i/f/g in `distill.mapping`'s order, norm_scales scaled by
`distill.calibrate` (default 'all_norm': each kernel's ternary gain and the teacher's
o_proj/down_proj input RMS on the batch step 0 trains on; 'none' the plain copy). Stages, by
step:

1. `step < distill.stage1_steps`: per-layer hidden-state alignment. The frozen teacher runs
   once; every student block gets the teacher's input to that block and is trained to produce
   the teacher block's output (`numerics.distill_loss.hidden_mse_sums`, averaged over layers).
   Embedding and head get no gradient in this stage.
2. afterwards: end to end, `alpha * T^2 KL(teacher || student) + (1 - alpha) * CE`.

The ternary quantization is on from the first step, or ramped in over
`distill.quant_ramp_steps` (activation and weight fake-quantization `x + s (q(x) - x)`, s
rising linearly from 1/N to 1; needs `model.bitlinear_impl='autodiff'`).

The teacher's params are an argument of the same jitted step (never in the train state: no
gradient, no optimizer state, not checkpointed), placed with the shardings its own logical
axes give on the student's mesh. Checkpoints hold the student's train state and data
position exactly as plain training does, so resume is the trainer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mmfree_jax.config import DistillSettings, ModelConfig
from mmfree_jax.convert import calibrate as calibrate_lib
from mmfree_jax.convert import student as student_lib
from mmfree_jax.convert import teacher as teacher_lib
from mmfree_jax.nn import blockwise
from mmfree_jax.numerics import distill_loss, quant
from mmfree_jax.numerics import loss as loss_lib
from mmfree_jax.numerics.dtypes import acc_dtype
from mmfree_jax.parallel import sharding
from mmfree_jax.train import state as state_lib
from mmfree_jax.train import steps as steps_lib
from mmfree_jax.train.state import TrainState


def student_params_from_teacher(
  teacher_params: dict,
  teacher_cfg: ModelConfig,
  student_params: dict,
  student_cfg: ModelConfig,
  shardings=None,
  calibration: calibrate_lib.Calibration | None = None,
  mapping: str = student_lib.DEFAULT_MAPPING,
) -> dict:
  """`convert.init_student_params`, jitted (sharded output when `shardings` is given)."""
  calibration = calibration or calibrate_lib.Calibration()
  rms = (calibration.o_proj_rms, calibration.down_proj_rms)

  def fn(t, s, rms):
    calib = dataclasses.replace(calibration, o_proj_rms=rms[0], down_proj_rms=rms[1])
    return student_lib.init_student_params(t, teacher_cfg, s, student_cfg, calib, mapping)

  return jax.jit(fn, out_shardings=shardings)(teacher_params, student_params, rms)


# ----------------------------------------------------------------------------------- steps


def quant_strength(step, ramp_steps: int):
  """Quantization strength at `step` (0-based): `min(1, (step + 1) / ramp_steps)`, or None
  (plain ternary) without a ramp."""
  if not ramp_steps:
    return None
  return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / ramp_steps)


def distill_objective(
  student_cfg: ModelConfig,
  student_graphdef,
  teacher_cfg: ModelConfig,
  teacher_graphdef,
  settings: DistillSettings,
  stage: int,
  z_loss: float = 0.0,
) -> steps_lib.Objective:
  """The distillation loss of `stage` (1 or 2) for `steps_lib.build_train_step`.

  The loss reads the teacher's params from `ctx.inputs` (under `stop_gradient`) and the
  quantization strength from `ctx.step`. Sums: `nll`, `kl`, `hidden_err`, `hidden_ref` (zeros
  for the terms a stage lacks: stage 1 has no logits, stage 2 no hidden states). Metrics:
  `loss` (stage 2: the student's next-token NLL; stage 1, which computes no logits: the
  hidden-state MSE), `stage`, `distill_loss` (what is minimised), `kl`, `hidden_mse` (mean
  over layers), `hidden_rel_err` (`hidden_mse / mean t^2`), `quant_strength`, `z_loss` (0).
  """
  if stage not in (1, 2):
    raise ValueError(f"stage must be 1 or 2; got {stage}")
  student_lib.check_compatible(teacher_cfg, student_cfg, student_lib.MATCHING[:3])
  acc = acc_dtype(student_cfg.compute_dtype)
  layers = student_cfg.num_layers

  def loss_fn(student_params, batch, ctx: steps_lib.StepContext):
    inputs, segments, targets, mask = loss_lib.split_window(batch["tokens"], batch["segment_ids"])
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(ctx.inputs))
    student = nnx.merge(student_graphdef, student_params)
    t_seg = segments if teacher_cfg.reset_at_doc_start else None
    s_seg = segments if student_cfg.reset_at_doc_start else None
    zero = jnp.zeros((), acc)
    strength = quant_strength(ctx.step, settings.quant_ramp_steps)
    ctx_quant = (
      quant.quantization_strength(strength) if strength is not None else contextlib.nullcontext()
    )
    with ctx_quant:
      if stage == 1:
        hidden = jax.lax.stop_gradient(blockwise.transformer_hidden_states(teacher, inputs, t_seg))
        outputs = blockwise.mmfree_block_outputs(student, hidden[:-1], s_seg)
        err, ref, _ = distill_loss.hidden_mse_sums(outputs, hidden[1:], mask)
        loss = err / (ctx.total_tokens * layers)
        return loss, {"nll": zero, "kl": zero, "hidden_err": err, "hidden_ref": ref}
      teacher_logits = jax.lax.stop_gradient(teacher(inputs, segment_ids=t_seg)[0])
      logits, _ = student(inputs, segment_ids=s_seg)
    kl, _ = distill_loss.kl_divergence_sums(logits, teacher_logits, mask, settings.temperature)
    nll, z, _ = loss_lib.cross_entropy_sums(logits, targets, mask, z_loss)
    loss = (settings.alpha * kl + (1.0 - settings.alpha) * (nll + z)) / ctx.total_tokens
    return loss, {"nll": nll, "kl": kl, "hidden_err": zero, "hidden_ref": zero}

  def metrics(loss, sums, ctx: steps_lib.StepContext):
    tokens = ctx.total_tokens
    hidden_mse = sums["hidden_err"] / (tokens * layers)
    strength = quant_strength(ctx.step, settings.quant_ramp_steps)
    return {
      "loss": sums["nll"] / tokens if stage == 2 else hidden_mse,
      "stage": jnp.asarray(stage, acc),
      "distill_loss": loss,
      "kl": sums["kl"] / tokens,
      "hidden_mse": hidden_mse,
      "hidden_rel_err": sums["hidden_err"] / jnp.maximum(sums["hidden_ref"], jnp.finfo(acc).tiny),
      "quant_strength": jnp.asarray(1.0 if strength is None else strength, acc),
      "z_loss": jnp.zeros((), acc),
    }

  return steps_lib.Objective(loss_fn, metrics)


def make_distill_step(
  student_cfg: ModelConfig,
  student_graphdef,
  teacher_cfg: ModelConfig,
  teacher_graphdef,
  tx: optax.GradientTransformationExtraArgs,
  schedule: optax.Schedule,
  settings: DistillSettings,
  stage: int,
  *,
  microbatches: int = 1,
  z_loss: float = 0.0,
  mesh: Mesh | None = None,
  rules=None,
) -> Callable:
  """`steps_lib.build_train_step` of `distill_objective`: `step(state, batch, teacher_params)
  -> (state, metrics)` (pure; not yet jitted)."""
  objective = distill_objective(
    student_cfg, student_graphdef, teacher_cfg, teacher_graphdef, settings, stage, z_loss
  )
  return steps_lib.build_train_step(
    objective,
    tx,
    schedule,
    acc=acc_dtype(student_cfg.compute_dtype),
    microbatches=microbatches,
    mesh=mesh,
    rules=rules,
  )


class DistillStepper:
  """The trainer's `train_step(state, batch)` in distill mode: the stage-1 or stage-2 jitted
  step by the (host-side) step count, with the placed teacher params bound."""

  def __init__(
    self,
    stage1: Callable | None,
    stage2: Callable,
    teacher_params: dict,
    stage1_steps: int,
    first_step: int,
  ):
    self._stage1, self._stage2 = stage1, stage2
    self.teacher_params = teacher_params
    self.stage1_steps = stage1_steps
    self.step = first_step

  def stage(self) -> int:
    return 1 if self.step < self.stage1_steps else 2

  def __call__(self, state: TrainState, batch: dict):
    fn = self._stage1 if self.stage() == 1 else self._stage2
    self.step += 1
    return fn(state, batch, self.teacher_params)

  def lower(self, state, batch) -> list:
    """The lowered stage steps this stepper will run (for `train.memory`'s estimate)."""
    stages = [f for f in (self._stage1, self._stage2) if f is not None]
    return [f.lower(state, batch, self.teacher_params) for f in stages]


@dataclasses.dataclass
class Distillation:
  """A loaded, placed teacher and what the trainer asks of it (see `setup`)."""

  settings: DistillSettings
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig
  teacher_params: dict
  teacher_shardings: dict
  mesh: Mesh
  rules: tuple
  init_note: str = ""  # how `init_state` initialised the student (for the banner)

  def banner_line(self) -> str:
    """The start-up banner's line for this distillation."""
    s = self.settings
    t = self.teacher_cfg
    stages = (
      f"stage 1 (per-layer hidden states) {s.stage1_steps} steps, then " if s.stage1_steps else ""
    )
    ramp = f", ternary ramped in over {s.quant_ramp_steps} steps" if s.quant_ramp_steps else ""
    init = f"init {s.init}" + (f" ({self.init_note})" if self.init_note else "")
    return (
      f"distill: teacher {s.teacher} ({t.kind} d={t.d_model} L={t.num_layers}); {init}; "
      f"{stages}KL T={s.temperature:g} alpha={s.alpha:g}{ramp}"
    )

  def init_state(
    self,
    state: TrainState,
    tx: optax.GradientTransformation,
    seed: int,
    shardings: TrainState,
    first_batch: Callable[[], dict] | None = None,
  ) -> TrainState:
    """A fresh train state whose params come from the teacher (`distill.init='teacher'`),
    scaled by `distill.calibrate`, whose input-RMS kinds run the teacher on `first_batch()`
    (the global batch `{'tokens', 'segment_ids'} [batch, seq + 1]` step 0 trains on)."""
    if self.settings.init != "teacher":
      return state
    calibration = self.calibration(first_batch)
    self.init_note = _describe_calibration(self.settings, calibration)
    params = student_params_from_teacher(
      self.teacher_params,
      self.teacher_cfg,
      state.params,
      self.student_cfg,
      shardings.params,
      calibration,
      self.settings.mapping,
    )
    return state_lib.train_state_from_params(params, tx, 0, seed, shardings)

  def calibration(self, first_batch: Callable[[], dict] | None) -> calibrate_lib.Calibration:
    """`distill.calibrate`'s factors (the input RMS on `first_batch()` where it needs data)."""
    name = self.settings.calibrate
    if not calibrate_lib.needs_batch(name):
      return calibrate_lib.named_calibration(name)
    if first_batch is None:
      raise ValueError(
        f"distill.calibrate={name!r} needs a batch of text for the teacher's "
        "input RMS; pass first_batch, or use calibrate='ternary' (data-free)"
      )
    batch = first_batch()
    inputs, segments, _, mask = loss_lib.split_window(batch["tokens"], batch["segment_ids"])
    teacher = nnx.merge(state_lib.model_graphdef(self.teacher_cfg), self.teacher_params)
    return calibrate_lib.named_calibration(
      name, teacher, inputs, segments if self.teacher_cfg.reset_at_doc_start else None, mask
    )

  def stepper(
    self,
    graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    microbatches: int,
    z_loss: float,
    shardings: TrainState,
    batch_sharding,
    first_step: int,
  ) -> DistillStepper:
    """The jitted stage steps (stage 1 only if it still has steps to run), teacher bound."""
    teacher_graphdef = state_lib.model_graphdef(self.teacher_cfg)

    def jitted(stage):
      step = make_distill_step(
        self.student_cfg,
        graphdef,
        self.teacher_cfg,
        teacher_graphdef,
        tx,
        schedule,
        self.settings,
        stage,
        microbatches=microbatches,
        z_loss=z_loss,
        mesh=self.mesh,
        rules=self.rules,
      )
      return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding, self.teacher_shardings),
        out_shardings=(shardings, sharding.replicated(self.mesh)),
        donate_argnums=0,
      )

    stage1 = jitted(1) if first_step < self.settings.stage1_steps else None
    return DistillStepper(
      stage1, jitted(2), self.teacher_params, self.settings.stage1_steps, first_step
    )


def _describe_calibration(settings: DistillSettings, calibration: calibrate_lib.Calibration) -> str:
  """'calibrate all_norm: o_proj input RMS [...], down_proj [...]; mapping vkq'."""
  parts = [f"calibrate {settings.calibrate}"]
  for name, rms in (
    ("o_proj input RMS", calibration.o_proj_rms),
    ("down_proj", calibration.down_proj_rms),
  ):
    if rms is not None:
      parts.append(f"{name} [{', '.join(f'{float(v):.3g}' for v in jax.device_get(rms))}]")
  return ", ".join(parts) + f"; mapping {settings.mapping}"


def setup(cfg, student: ModelConfig, mesh: Mesh, rules) -> Distillation | None:
  """Validates the `distill` section, checks the teacher against the student from configs,
  then loads and places the teacher. None when `distill.teacher` is empty (plain training)."""
  if "distill" not in cfg:
    return None
  settings = DistillSettings.from_config(cfg.distill)
  if not settings.enabled:
    return None
  settings.check_student(student)
  teacher = teacher_lib.read_teacher_config(settings.teacher, student)
  # Stage 1 needs the same d and L, the KL the same vocabulary; copying the MLP also the same I.
  keys = student_lib.MATCHING if settings.init == "teacher" else student_lib.MATCHING[:3]
  student_lib.check_compatible(teacher, student, keys)
  shardings = state_lib.param_shardings(teacher, mesh, rules)
  params = teacher_lib.load_teacher_params(
    settings.teacher, teacher, settings.teacher_step, shardings
  )
  return Distillation(settings, student, teacher, params, shardings, mesh, rules)
