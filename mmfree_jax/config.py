"""Config schema (ml-collections) and the validated, frozen model config the modules take.

`base_config()` is the whole schema of docs/architecture.md §5 with defaults; the files in `configs/`
start from it, change values and `lock()` it, so that an unknown key (a typo in a
`--config.x.y=v` override or in a config file) raises instead of being silently ignored.
`ModelConfig.from_config(cfg.model)` validates the model section once and gives the modules a
hashable dataclass.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from mmfree_jax.ops.bitlinear import BITLINEAR_IMPLS
from mmfree_jax.ops.recurrence import SCAN_TYPES

MODEL_KINDS = ("mmfree", "transformer")
DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}
# The `model.remat` registry: name -> what the layer scan saves for the backward (None: no remat).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
NAN_POLICIES = ("skip", "stop")


def resolve_dtype(name: str):
  """Maps a dtype name from the config to a jnp dtype, with an error naming the choices.

  `auto` is bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are emulated).
  """
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  try:
    return DTYPES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES) + ['auto']}"
                     ) from None


def intermediate_size_for(d_model: int, hidden_ratio: int) -> int:
  """The reference's GLU width: `256 * ceil(int(d * hidden_ratio * 2/3) / 256)`."""
  return 256 * math.ceil(int(d_model * hidden_ratio * 2 / 3) / 256)


def base_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "kind": "mmfree",
      "vocab_size": 32000,
      "d_model": 1024,
      "num_layers": 24,
      "hidden_ratio": 4,
      "intermediate_size": config_dict.placeholder(int),  # None = derived from d, ratio
      "num_heads": 16,  # transformer only (the MLGRU has one head, as released)
      # transformer only: grouped-query K/V heads (Llama's num_key_value_heads); None = num_heads
      "num_kv_heads": config_dict.placeholder(int),
      "rope_theta": 10000.0,  # transformer only
      "use_lower_bound": True,
      "rms_norm_eps": 1e-6,
      "scan_type": "sequential",
      "chunk_size": 64,
      "reset_at_doc_start": True,
      "dtype": "auto",  # compute dtype: bf16 on accelerators, fp32 on CPU
      "param_dtype": "float32",
      "remat": "none",
      # mmfree only: 'autodiff' (quant.bitlinear) or 'lean' (bitlinear_lean: custom backward
      # that keeps int8 activation codes instead of fp32 intermediates; same numbers)
      "bitlinear_impl": "autodiff",
  })


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults (docs/architecture.md §5). Config files copy and edit it."""
  cfg = ml_collections.ConfigDict()
  cfg.model = base_model_config()
  cfg.data = ml_collections.ConfigDict({
      "source": "builtin_kjv",  # builtin_kjv | text | jsonl | tokens | array_record
      "paths": "",  # comma-separated files or globs (array_record: prepared folders)
      # array_record only: one weight per data.paths folder ("0.7,0.3"); "" = by train tokens
      "mixture": "",
      "text_field": "text",
      "tokenizer": "bpe:4096",  # bpe:<vocab> (trained+cached) | hf:<tokenizer.json> | spm:<model>
      "seq_len": 256,
      "val_fraction": 0.02,
      "seed": 0,
      "worker_count": 0,
  })
  cfg.train = ml_collections.ConfigDict({
      "steps": 1000,
      "global_batch": 16,
      "microbatches": 1,
      "seed": 0,
      "log_every": 10,
      "eval_every": 200,
      "eval_batches": 8,
      "checkpoint_every": 200,
      "keep_checkpoints": 3,
      "nan_policy": "skip",  # skip | stop
      "sample_tokens": 64,
      "peak_flops_per_device": 0.0,  # for MFU; 0 = datasheet value or a CPU measurement
  })
  cfg.optim = ml_collections.ConfigDict({
      "lr": 3e-3,
      "schedule": "cosine",
      "warmup_steps": 100,
      "end_lr_ratio": 0.1,
      "weight_decay": 0.01,
      "b1": 0.9,
      "b2": 0.95,
      "eps": 1e-8,
      "clip_norm": 1.0,
      "z_loss": 0.0,
      "decay_embeddings": False,
  })
  cfg.distill = ml_collections.ConfigDict({  # mmfree_jax.train.distill
      "teacher": "",  # '' = plain training; a Transformer++ workdir or an HF Llama folder
      "teacher_step": config_dict.placeholder(int),  # teacher workdir step (None: latest)
      "init": "teacher",  # student init: 'teacher' (mmfree_jax.convert) | 'random'
      "stage1_steps": 0,  # per-layer hidden-state alignment steps before logit distillation
      "temperature": 1.0,
      "alpha": 0.5,  # stage 2 loss: alpha * T^2 KL(teacher || student) + (1 - alpha) * CE
      "quant_ramp_steps": 0,  # 0: ternary throughout; N: quantization strength 1/N .. 1
  })
  cfg.mesh = ml_collections.ConfigDict({
      "shape": {"data": -1, "fsdp": 1, "tensor": 1},
      "axis_rules": [
          ("batch", ("data", "fsdp")),
          ("seq", None),
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          ("inner", "tensor"),
          ("heads", "tensor"),
          ("vocab", "tensor"),
          ("layers", None),
      ],
  })
  cfg.dist = ml_collections.ConfigDict({
      "coordinator": "",
      "num_processes": 0,
      "process_id": -1,
      "heartbeat_timeout_s": 100,  # a dead peer is detected (and this process stops) after this
      "initialization_timeout_s": 300,
  })
  return cfg


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Validated model hyper-parameters (hashable: usable as a static jit argument)."""
  kind: str
  vocab_size: int
  d_model: int
  num_layers: int
  hidden_ratio: int
  intermediate_size: int
  num_heads: int
  rope_theta: float
  use_lower_bound: bool
  rms_norm_eps: float
  scan_type: str
  chunk_size: int
  reset_at_doc_start: bool
  dtype: str
  param_dtype: str
  remat: str
  bitlinear_impl: str = "autodiff"
  num_kv_heads: int | None = None  # from_config resolves None to num_heads

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
    """Validates a `model` config section (ConfigDict or dict) and freezes it."""
    values = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
    defaults = base_model_config().to_dict()
    defaults.update(values)
    values = defaults
    if values["intermediate_size"] is None:
      values["intermediate_size"] = intermediate_size_for(values["d_model"],
                                                          values["hidden_ratio"])
    if values.get("num_kv_heads") is None:
      values["num_kv_heads"] = values["num_heads"]
    cfg = cls(**values)
    cfg.validate()
    return cfg

  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """A small model for tests and notebooks."""
    values = base_model_config().to_dict()
    values.update(vocab_size=256, d_model=64, num_layers=2, num_heads=4)
    values.update(overrides)
    return cls.from_config(values)

  def validate(self) -> None:
    if self.kind not in MODEL_KINDS:
      raise ValueError(f"unknown model.kind {self.kind!r}; choose one of {MODEL_KINDS}")
    resolve_dtype(self.dtype)
    resolve_dtype(self.param_dtype)
    for name in ("vocab_size", "d_model", "num_layers", "hidden_ratio", "intermediate_size",
                 "num_heads", "chunk_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{name} must be a positive int; got {value!r}")
    if self.scan_type not in SCAN_TYPES:
      raise ValueError(f"unknown model.scan_type {self.scan_type!r}; choose one of "
                       f"{tuple(SCAN_TYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown model.remat {self.remat!r}; choose one of {tuple(REMAT_POLICIES)}")
    if self.bitlinear_impl not in BITLINEAR_IMPLS:
      raise ValueError(f"unknown model.bitlinear_impl {self.bitlinear_impl!r}; choose one of "
                       f"{tuple(BITLINEAR_IMPLS)}")
    if self.kind == "transformer":
      if self.d_model % self.num_heads:
        raise ValueError(f"model.d_model={self.d_model} is not divisible by "
                         f"model.num_heads={self.num_heads}; pick num_heads dividing d_model")
      if (not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1
          or self.num_heads % self.num_kv_heads):
        raise ValueError(f"model.num_kv_heads={self.num_kv_heads!r} must be a positive divisor "
                         f"of model.num_heads={self.num_heads} (grouped-query attention)")
      if self.head_dim % 2:
        raise ValueError(f"head_dim={self.head_dim} must be even for RoPE; change "
                         "model.num_heads")


def validate(cfg: ml_collections.ConfigDict) -> ModelConfig:
  """Checks a whole config before any compute; returns the frozen model config."""
  model = ModelConfig.from_config(cfg.model)
  if cfg.train.nan_policy not in NAN_POLICIES:
    raise ValueError(f"unknown train.nan_policy {cfg.train.nan_policy!r}; choose one of "
                     f"{NAN_POLICIES}")
  validate_data(cfg.data)
  seq_len = cfg.data.seq_len
  if model.kind == "mmfree" and model.scan_type == "chunked" and seq_len % model.chunk_size:
    raise ValueError(
        f"data.seq_len={seq_len} is not divisible by model.chunk_size={model.chunk_size} "
        "with model.scan_type='chunked'; set --config.model.chunk_size to a divisor of "
        "seq_len or --config.model.scan_type=sequential")
  return model


def mixture_weights(mixture: str) -> list[float] | None:
  """`data.mixture` parsed: None when empty, else finite weights >= 0 with a positive sum."""
  if not (mixture or "").strip():
    return None
  try:
    weights = [float(w) for w in mixture.split(",")]
  except ValueError:
    raise ValueError(f"data.mixture={mixture!r} must be comma-separated numbers, one weight "
                     "per data.paths folder (e.g. 0.7,0.3)") from None
  if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"data.mixture={mixture!r}: weights must be finite, >= 0 and sum to a "
                     "positive number")
  return weights


def validate_data(data_cfg) -> None:
  """The data section's own checks (files and folders are checked when the data is opened)."""
  if data_cfg.get("mixture") and data_cfg.source != "array_record":
    raise ValueError("data.mixture weights prepared folders: set --config.data.source="
                     "array_record, or clear --config.data.mixture")
  mixture_weights(data_cfg.get("mixture", ""))


# The paper's three MatMul-free sizes (d_model, num_layers); I is derived (hidden_ratio 4).
PAPER_SIZES = {"370m": (1024, 24), "1.3b": (2048, 24), "2.7b": (2560, 32)}
# Our optimizer values for the paper sizes. The released code has no recipe; the paper says only
# "larger learning rate than for Transformers, cosine schedule". Tokens: 15B (370M), 100B (others).
PAPER_RECIPE = {
    #        mmfree lr, transformer lr, tokens
    "370m": (1.5e-3, 6e-4, 15e9),
    "1.3b": (1.0e-3, 4e-4, 100e9),
    "2.7b": (8.0e-4, 3e-4, 100e9),
}


def paper_config(size: str, kind: str = "mmfree") -> ml_collections.ConfigDict:
  """A released size (`370m`, `1.3b`, `2.7b`) as MatMul-free or Transformer++ (same d/L).

  Data defaults to the Mistral-7B-v0.1 sentencepiece tokenizer (vocab 32000) on jsonl files
  given by `--config.data.paths`; sequence length 2048, 0.5M tokens per step.
  """
  if size not in PAPER_SIZES:
    raise ValueError(f"unknown paper size {size!r}; choose one of {sorted(PAPER_SIZES)}")
  d_model, num_layers = PAPER_SIZES[size]
  mmfree_lr, transformer_lr, tokens = PAPER_RECIPE[size]
  cfg = base_config()
  cfg.model.update(kind=kind, vocab_size=32000, d_model=d_model, num_layers=num_layers,
                   num_heads=d_model // 128, dtype="bfloat16", remat="dots_no_batch")
  cfg.data.update(source="jsonl", tokenizer="spm:mistral", seq_len=2048, val_fraction=0.001)
  global_batch = 256  # x 2048 tokens = 0.5M tokens per step
  cfg.train.update(global_batch=global_batch,
                   steps=int(tokens // (global_batch * cfg.data.seq_len)),
                   log_every=50, eval_every=2000, checkpoint_every=2000, eval_batches=20)
  cfg.optim.update(lr=mmfree_lr if kind == "mmfree" else transformer_lr, schedule="cosine",
                   warmup_steps=1000, end_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
                   clip_norm=1.0)
  cfg.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
  return cfg
