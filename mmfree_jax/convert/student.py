"""A MatMul-free student initialised from a Transformer++ teacher (same d, L, vocab, I).

What is copied where (teacher → student), and why:

- `embedding` → `embedding`; teacher `lm_head.kernel` → the ternary `lm_head.kernel` (latent
  weights; the BitLinear quantizes them in its forward).
- Norms are *folded* into the BitLinears that consume them. Every student projection is a
  BitLinear that RMS-normalises its own input with its `norm_scale`; an RMSNorm of an
  RMSNormed vector is the identity (up to eps). So the block norms (`attn_norm`, `mlp_norm`,
  `final_norm`) are set to 1 and the teacher's gammas go into the `norm_scale` of the
  projections reading them (i/f/g ← attn_norm, gate ← mlp_norm, lm_head ← final_norm): each
  student projection then sees exactly the teacher's normalised input. `o_proj`, `down_proj`
  and `g_norm` have no teacher counterpart norm and keep scale 1, unless a `Calibration`
  (`convert.calibrate`) is given: then o_proj/down_proj get the mean per-token RMS of the
  teacher's inputs to them (which the teacher reads raw, the BitLinear normalises), and every
  copied projection the least-squares gain of its ternary quantization (~1.34). On the
  teacher of experiments/convert.py that takes the init's KL to the teacher from 5.68 to 0.91
  nats/token.
- MLP: the teacher's fused `[d, 2I]` gate/up kernel → the GLU's fused ternary gate/up kernel
  (same gate-then-up column order), `down_proj` → `down_proj`. Widths must match.
- Attention → MLGRU (`h_t = f_t h_{t-1} + (1 - f_t) silu(i_t)`, `y = o(rmsnorm(g) swish(h))`):
  **V → i** (the content written into the state, as values are what attention mixes),
  **K → f** (the forget gate: Liger builds its gates from the key projection, the per-token
  "how much to remember" signal of a gated linear RNN comes from the same side as keys),
  **Q → g** (the output gate reads the state out, the role the query has; Mamba-in-the-Llama
  likewise maps Q → the state read-out C, K → B, V → x), **O → o**. Grouped K/V
  (`num_kv_heads < num_heads`) are widened to d by repeating each K/V head for the query
  heads that share it (query head h reads K/V head h // group, as attention does).
  `mapping` permutes the i/f/g sources (e.g. 'kqv'); in experiments/convert.py (seed 0, the
  calibrated init) 'kqv' and 'qkv' started closer to the teacher (KL 0.77/0.80 vs 0.91) but
  ended worse after distillation (val 4.058/4.086 vs 4.002, alpha 1), so V/K/Q → i/f/g
  stays. The mapping transfers shapes and scales, not the mixing itself: on that teacher's
  hidden states the calibrated MLGRU's output correlates -0.01 / -0.11 (layers 0 / 1) with the
  attention output it replaces (the MLP's copy: 0.93 / 0.90); distillation learns the mixing.
- `lower_bounds` keep the student's own initialisation (zeros: layer l's forget-gate floor
  starts at l / L, as the reference initialises it): the teacher has nothing comparable.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mmfree_jax.config import ModelConfig
from mmfree_jax.convert.calibrate import Calibration, ternary_gain


class ConversionError(ValueError):
  """A teacher/student pair whose shapes cannot map onto each other."""


MATCHING = ("vocab_size", "d_model", "num_layers", "intermediate_size")
DEFAULT_MAPPING = "vkq"  # teacher V, K, Q -> the MLGRU's i, f, g


def check_mapping(mapping: str) -> None:
  """A mapping names the teacher projection (v, k or q) of the MLGRU's i, f and g, in order."""
  if not isinstance(mapping, str) or sorted(mapping) != sorted(DEFAULT_MAPPING):
    raise ConversionError(
      f"mapping {mapping!r} must be a permutation of 'vkq': the teacher "
      "projections copied into the MLGRU's i, f and g, in that order"
    )


def student_config(teacher: ModelConfig, **overrides) -> ModelConfig:
  """The MatMul-free config with the teacher's d, L, vocab, I and eps (overrides on top)."""
  if teacher.kind != "transformer":
    raise ConversionError(
      f"the teacher must be a Transformer++ (model.kind='transformer'); got {teacher.kind!r}"
    )
  values = dataclasses.asdict(teacher)
  values.update(kind="mmfree")
  values.update(overrides)
  student = ModelConfig.from_config(values)
  check_compatible(teacher, student)
  return student


def check_compatible(
  teacher: ModelConfig, student: ModelConfig, keys: tuple[str, ...] = MATCHING
) -> None:
  """Raises ConversionError naming every shape in `keys` that differs (before any compute)."""
  if teacher.kind != "transformer" or student.kind != "mmfree":
    raise ConversionError(
      f"conversion maps a Transformer++ teacher onto a MatMul-free student; "
      f"got teacher kind {teacher.kind!r}, student kind {student.kind!r}"
    )
  diffs = [
    f"{k}: teacher {getattr(teacher, k)} vs student {getattr(student, k)}"
    for k in keys
    if getattr(teacher, k) != getattr(student, k)
  ]
  if diffs:
    raise ConversionError(
      "the student does not fit this teacher: " + "; ".join(diffs) + ". Give the student "
      f"the teacher's {', '.join(keys)} (mmfree_jax.convert.student_config(teacher) does)"
    )


def _widen_kv(kernel: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
  """`[L, d, kv_heads * hd]` → `[L, d, heads * hd]`: K/V head j repeated for its query heads."""
  kv_heads = getattr(cfg, "num_kv_heads", None) or cfg.num_heads
  if kv_heads == cfg.num_heads:
    return kernel
  layers, d, _ = kernel.shape
  blocks = kernel.reshape(layers, d, kv_heads, cfg.head_dim)
  blocks = jnp.repeat(blocks, cfg.num_heads // kv_heads, axis=2)
  return blocks.reshape(layers, d, cfg.num_heads * cfg.head_dim)


def _cast(x, like):
  """`x` in `like`'s dtype."""
  return jnp.asarray(x, like.dtype)


def _mlgru_params(
  tb: dict, sb: dict, teacher_cfg: ModelConfig, mapping: str, norm_scale, o_proj_rms
) -> dict:
  """The student blocks' MLGRU params (`attn`) from the teacher blocks' attention: the
  `mapping` projections into i, f, g, O into o (stacked `[L, ...]` leaves, student dtypes).

  norm_scale: `(gamma, kernel, like, rms=None) -> [L, in]` (see `init_student_params`).
  """
  attn_gamma = tb["attn_norm"]["scale"]
  teacher_kernels = {
    "v": _widen_kv(tb["attn"]["v_proj"]["kernel"], teacher_cfg),
    "k": _widen_kv(tb["attn"]["k_proj"]["kernel"], teacher_cfg),
    "q": tb["attn"]["q_proj"]["kernel"],
  }
  mlgru_source = {gate: teacher_kernels[src] for gate, src in zip("ifg", mapping)}
  mlgru_source["o"] = tb["attn"]["o_proj"]["kernel"]
  attn = {}
  for name, kernel in mlgru_source.items():
    proj = sb["attn"][f"{name}_proj"]
    if name == "o":
      norm = norm_scale(None, kernel, proj["norm_scale"], o_proj_rms)
    else:
      norm = norm_scale(attn_gamma, kernel, proj["norm_scale"])
    attn[f"{name}_proj"] = {"kernel": _cast(kernel, proj["kernel"]), "norm_scale": norm}
  attn["g_norm"] = {"scale": jnp.ones_like(sb["attn"]["g_norm"]["scale"])}
  return attn


def _glu_params(tb: dict, sb: dict, norm_scale, down_proj_rms) -> dict:
  """The student blocks' GLU params (`mlp`) from the teacher blocks' gate / down projections
  (stacked `[L, ...]` leaves, student dtypes)."""
  gate_kernel, down_kernel = tb["mlp"]["gate_proj"]["kernel"], tb["mlp"]["down_proj"]["kernel"]
  return {
    "gate_proj": {
      "kernel": _cast(gate_kernel, sb["mlp"]["gate_proj"]["kernel"]),
      "norm_scale": norm_scale(
        tb["mlp_norm"]["scale"], gate_kernel, sb["mlp"]["gate_proj"]["norm_scale"]
      ),
    },
    "down_proj": {
      "kernel": _cast(down_kernel, sb["mlp"]["down_proj"]["kernel"]),
      "norm_scale": norm_scale(
        None, down_kernel, sb["mlp"]["down_proj"]["norm_scale"], down_proj_rms
      ),
    },
  }


def init_student_params(
  teacher_params: dict,
  teacher_cfg: ModelConfig,
  student_params: dict,
  student_cfg: ModelConfig,
  calibration: Calibration | None = None,
  mapping: str = DEFAULT_MAPPING,
) -> dict:
  """Student params from the teacher's (pure; jit it with out_shardings for big models).

  Args:
    teacher_params: the TransformerLM's nested param dict.
    student_params: a freshly initialised MatMulFreeLM param dict (gives the leaves the
      teacher has no counterpart for, and the dtypes).
    calibration: scale factors folded into the BitLinear norm_scales (`convert.calibrate`:
      the ternary gain of each copied kernel, the RMS of the teacher's o_proj/down_proj
      inputs); None: the plain copy (o_proj/down_proj norm_scale 1, no gain).
    mapping: the teacher projections copied into the MLGRU's i, f, g, in that order, as
      three letters of 'v', 'k', 'q' (default 'vkq': V → i, K → f, Q → g; O → o always).
  Returns:
    a new nested dict with the student's structure and dtypes.
  """
  check_compatible(teacher_cfg, student_cfg)
  check_mapping(mapping)
  calibration = calibration or Calibration()
  t, s = teacher_params, student_params
  tb, sb = t["blocks"], s["blocks"]
  layers = student_cfg.num_layers
  one = jnp.ones((layers,), jnp.float32)

  def norm_scale(gamma, kernel, like, rms=None):
    """`[L, in]` gamma (or 1) x ternary gain of `kernel` x rms, per layer, in like's dtype."""
    factor = ternary_gain(kernel, calibration.block_gain) if calibration.ternary else one
    if rms is not None:
      factor = factor * jnp.asarray(rms, jnp.float32).reshape(layers)
    base = jnp.ones(like.shape, jnp.float32) if gamma is None else jnp.asarray(gamma, jnp.float32)
    return (base * factor[:, None]).astype(like.dtype)

  attn = _mlgru_params(tb, sb, teacher_cfg, mapping, norm_scale, calibration.o_proj_rms)
  mlp = _glu_params(tb, sb, norm_scale, calibration.down_proj_rms)
  ones = lambda like: jnp.ones_like(like)
  head_gain = ternary_gain(t["lm_head"]["kernel"]) if calibration.ternary else 1.0
  out = {
    "embedding": _cast(t["embedding"], s["embedding"]),
    "blocks": {
      "attn_norm": {"scale": ones(sb["attn_norm"]["scale"])},
      "attn": attn,
      "mlp_norm": {"scale": ones(sb["mlp_norm"]["scale"])},
      "mlp": mlp,
    },
    "final_norm": {"scale": ones(s["final_norm"]["scale"])},
    "lm_head": {
      "kernel": _cast(t["lm_head"]["kernel"], s["lm_head"]["kernel"]),
      "norm_scale": _cast(
        jnp.asarray(t["final_norm"]["scale"], jnp.float32) * head_gain, s["lm_head"]["norm_scale"]
      ),
    },
  }
  if "lower_bounds" in s:
    out["lower_bounds"] = s["lower_bounds"]
  return out
