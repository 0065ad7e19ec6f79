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

from mmfree_jax.registry import (ATTENTION_IMPLS, BITLINEAR_IMPLS, SCAN_TYPES, SPLASH_MIN_SEQ,
                                 resolve_attention_impl, resolve_bitlinear_impl,
                                 resolve_scan_type)

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
      # transformer only (registry.ATTENTION_IMPLS): auto = the Pallas splash attention
      # kernel on TPU, cuDNN flash attention on GPU, XLA's jax.nn.dot_product_attention
      # elsewhere; naive = the T x T reference
      "attention_impl": "auto",
      "use_lower_bound": True,
      "rms_norm_eps": 1e-6,
      # auto: the Pallas kernel on GPU/TPU, sequential on CPU (registry.SCAN_TYPES)
      "scan_type": "auto",
      "chunk_size": 64,
      "reset_at_doc_start": True,
      "dtype": "auto",  # compute dtype: bf16 on accelerators, fp32 on CPU
      "param_dtype": "float32",
      "remat": "none",
      # mmfree only (registry.BITLINEAR_IMPLS): 'autodiff' (quant.bitlinear), 'lean'
      # (custom backward keeping int8 codes instead of fp32 intermediates; same numbers),
      # 'fused' (lean with the Pallas quantizer kernel); auto = fused on GPU/TPU, lean on CPU
      "bitlinear_impl": "auto",
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
      "max_consecutive_skips": 10,  # nan_policy=skip gives up (as 'stop') past this many
      "sample_tokens": 64,
      "peak_flops_per_device": 0.0,  # for MFU; 0 = datasheet value or a CPU measurement
      "tracker": "tensorboard",  # none | tensorboard | wandb | mlflow (metrics.jsonl always)
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
      "calibrate": "all_norm",  # init='teacher' scales (mmfree_jax.convert.calibrate)
      "mapping": "vkq",  # init='teacher': teacher V, K, Q -> the MLGRU's i, f, g (any order)
  })
  cfg.mesh = ml_collections.ConfigDict({
      "shape": {"data": -1, "fsdp": 1, "tensor": 1},
      "axis_rules": [
          ("activation_batch", ("data", "fsdp")),
          ("activation_seq", None),
          ("activation_embed", None),
          ("activation_inner", "tensor"),
          ("activation_vocab", "tensor"),
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
  bitlinear_impl: str = "auto"
  num_kv_heads: int | None = None  # from_config resolves None to num_heads
  attention_impl: str = "auto"

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
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"unknown model.attention_impl {self.attention_impl!r}; choose one of "
                       f"{ATTENTION_IMPLS}")
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


def describe_impls(cfg: ModelConfig, platform: str) -> str:
  """One line naming what `model.scan_type` and `model.bitlinear_impl` (MatMul-free) or
  `model.attention_impl` (Transformer++) run on `platform` ('gpu', 'tpu' or 'cpu':
  `kernels.dispatch.platform_of` of the mesh's devices), for a run's startup banner, e.g.
  "scan_type=auto -> pallas (Mosaic kernel); bitlinear_impl=auto -> fused (Mosaic quantizer
  kernel + XLA matmul)"."""
  if cfg.kind != "mmfree":
    attn = resolve_attention_impl(cfg.attention_impl, jnp.dtype(cfg.compute_dtype).name,
                                  cfg.head_dim, platform=platform)
    attn_what = {"cudnn": "cuDNN flash attention", "xla": "XLA attention",
                 "naive": "T x T reference"}.get(attn)
    if attn == "splash":
      attn_what = {"tpu": "Pallas splash attention, Mosaic kernel",
                   "gpu": "no GPU kernel: XLA attention"}.get(
                       platform, "TPU kernel in Pallas interpret mode, slow")
      if cfg.attention_impl == "auto":
        attn_what += f"; XLA's for windows under {SPLASH_MIN_SEQ} tokens"
    return (f"Transformer++: attention_impl={cfg.attention_impl} -> {attn} ({attn_what}) on "
            f"{platform}; no recurrence, no BitLinear (scan_type/bitlinear_impl unused)")
  kernel = {"gpu": "Triton", "tpu": "Mosaic"}.get(platform)
  scan = resolve_scan_type(cfg.scan_type, platform)
  impl = resolve_bitlinear_impl(cfg.bitlinear_impl, platform)
  scan_what = (f"{kernel} kernel" if kernel else "TPU kernel in Pallas interpret mode, slow"
               ) if scan == "pallas" else "pure JAX"
  impl_what = (f"{kernel} quantizer kernel + XLA matmul" if kernel
               else "TPU quantizer kernel in Pallas interpret mode, slow"
               ) if impl == "fused" else "pure JAX"
  return (f"scan_type={cfg.scan_type} -> {scan} ({scan_what}); "
          f"bitlinear_impl={cfg.bitlinear_impl} -> {impl} ({impl_what}) on {platform}")


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


# ------------------------------------------------------------------ run settings, help text

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
# `*_every` keys: 0 turns the periodic action off.
EVERY_KEYS = ("log_every", "eval_every", "checkpoint_every")


def validate_run(cfg: ml_collections.ConfigDict) -> None:
  """Checks the train/optim/mesh values a training run reads; errors name the key to fix."""
  train, optim = cfg.train, cfg.optim

  def integer(section: str, key: str, minimum: int, what: str) -> None:
    value = cfg[section][key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f"{section}.{key} must be an int >= {minimum} ({what}); got {value!r}")

  integer("train", "steps", 1, "the number of optimizer steps")
  integer("train", "global_batch", 1, "rows per step")
  integer("train", "microbatches", 1, "gradient accumulation steps")
  integer("train", "keep_checkpoints", 1, "checkpoints kept")
  integer("train", "eval_batches", 0, "0 = no validation")
  integer("train", "max_consecutive_skips", 1, "non-finite updates in a row before stopping")
  for key in EVERY_KEYS:
    integer("train", key, 0, "0 = off")
  integer("optim", "warmup_steps", 0, "0 = no warmup")
  lr = optim.lr
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
    raise ValueError(f"optim.lr must be a finite number >= 0; got {lr!r}")
  if not 0 <= optim.end_lr_ratio or not math.isfinite(optim.end_lr_ratio):
    raise ValueError(f"optim.end_lr_ratio must be >= 0; got {optim.end_lr_ratio!r}")
  if train.nan_policy not in NAN_POLICIES:
    raise ValueError(f"unknown train.nan_policy {train.nan_policy!r}; choose one of "
                     f"{NAN_POLICIES}")
  if train.tracker not in TRACKERS:
    raise ValueError(f"unknown train.tracker {train.tracker!r}; choose one of {TRACKERS}")


def fit_warmup(cfg: ml_collections.ConfigDict) -> str | None:
  """Scales `optim.warmup_steps` down for a run shorter than it (in place); returns a note.

  A warmup of at least `train.steps` would leave no decay (and the smoke test
  `--config.train.steps=20` would trip over a default warmup of 30): it becomes 10% of the run.
  """
  steps, warmup = cfg.train.steps, cfg.optim.warmup_steps
  if warmup < steps:
    return None
  cfg.optim.warmup_steps = steps // 10
  return (f"optim.warmup_steps={warmup} is not shorter than train.steps={steps}; using "
          f"{cfg.optim.warmup_steps} (10% of the run). Set --config.optim.warmup_steps to "
          "choose another")


# Help for keys whose schema line has no comment (the others use that comment).
_HELP = {
    "model.kind": f"architecture: {' | '.join(MODEL_KINDS)}",
    "model.vocab_size": "embedding / output rows (>= the tokenizer's ids)",
    "model.d_model": "hidden width",
    "model.num_layers": "number of blocks",
    "model.hidden_ratio": "GLU width = 256 * ceil(int(d * ratio * 2/3) / 256)",
    "model.rope_theta": "RoPE base (transformer only)",
    "model.num_kv_heads": "transformer: key/value heads (None = num_heads)",
    "model.use_lower_bound": "MLGRU forget-gate lower bounds per layer",
    "model.rms_norm_eps": "RMSNorm epsilon",
    "model.scan_type": "MLGRU recurrence implementation (ops.recurrence / kernels registry)",
    "model.chunk_size": "tokens per chunk for scan_type=chunked",
    "model.reset_at_doc_start": "zero the recurrent state at each packed document start",
    "model.param_dtype": "dtype of the stored (latent) weights",
    "model.bitlinear_impl": "BitLinear implementation (ops.bitlinear registry)",
    "model.attention_impl": "transformer attention (ops.attention registry; auto per platform)",
    "data.mixture": "array_record: one weight per data.paths folder ('' = by train tokens)",
    "model.remat": f"rematerialization of the layer scan: {' | '.join(REMAT_POLICIES)}",
    "data.text_field": "the JSONL field holding the text",
    "data.seq_len": "tokens per training window",
    "data.val_fraction": "share of documents held out for validation",
    "data.seed": "shuffle seed of the data pipeline",
    "data.worker_count": "grain worker processes (0 = in-process)",
    "train.steps": "optimizer steps of the whole run (the LR schedule spans them)",
    "train.global_batch": "rows per step over all devices",
    "train.microbatches": "gradient accumulation: the batch is split into this many parts",
    "train.seed": "init / dropout seed",
    "train.log_every": "metrics.jsonl row and log line every N steps (0 = only the last)",
    "train.eval_every": "validation every N steps (0 = off)",
    "train.eval_batches": "validation batches per evaluation (0 = no validation)",
    "train.checkpoint_every": "checkpoint every N steps (0 = only at the end / on stop)",
    "train.keep_checkpoints": "newest checkpoints kept",
    "train.sample_tokens": "tokens sampled by train.py after training (0 = none)",
    "optim.lr": "peak learning rate (>= 0)",
    "optim.schedule": "cosine | linear | constant (after a linear warmup)",
    "optim.warmup_steps": "linear warmup steps (scaled to 10% of a shorter run)",
    "optim.end_lr_ratio": "final LR / peak LR for cosine and linear",
    "optim.weight_decay": "AdamW decoupled weight decay (dense kernels only)",
    "optim.b1": "Adam beta1",
    "optim.b2": "Adam beta2",
    "optim.eps": "Adam epsilon",
    "optim.clip_norm": "global gradient norm clip (0 = off)",
    "optim.z_loss": "weight of the log-sum-exp^2 auxiliary loss (0 = off)",
    "optim.decay_embeddings": "apply weight decay to the embedding too",
    "mesh.shape": "device mesh sizes per axis (data, fsdp, tensor; one may be -1 = the rest)",
    "mesh.axis_rules": "logical axis -> mesh axes (MaxText style)",
    "dist.coordinator": "host:port of process 0 for multi-process runs ('' = single/auto)",
    "dist.num_processes": "processes of a multi-process run (0 = auto)",
    "dist.process_id": "this process's index (-1 = auto)",
    "dist.initialization_timeout_s": "seconds to wait for every process at start-up",
    "distill.temperature": "distillation softmax temperature",
    "distill.calibrate": "scales of the student's init from the teacher: none | ternary | rms | "
                         "all | all_norm (the ternary gain of each copied kernel and/or the "
                         "teacher's o_proj/down_proj input RMS on step 0's batch; "
                         "mmfree_jax.convert.calibrate)",
}


def _schema_comments() -> dict[str, str]:
  """`{section.key: inline comment}` read from the schema's source lines."""
  import inspect  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  out, section = {}, "model"
  source = inspect.getsource(base_model_config) + inspect.getsource(base_config)
  for line in source.splitlines():
    opened = re.match(r"\s*cfg\.(\w+) = ml_collections\.ConfigDict", line)
    if opened:
      section = opened.group(1)
    entry = re.match(r'\s*"(\w+)":.*?#\s*(.+)$', line)
    if entry:
      out.setdefault(f"{section}.{entry.group(1)}", entry.group(2).strip())
  return out


def config_help() -> dict[str, str]:
  """Help text of every schema key, `{section.key: text}`."""
  comments = _schema_comments()
  keys = [f"{s}.{k}" for s, sub in base_config().items() for k in sub]
  return {key: _HELP.get(key) or comments.get(key, "") for key in keys}


def describe(cfg: ml_collections.ConfigDict) -> str:
  """The resolved config, one `section.key = value  # help` line per key (`--print_config`)."""
  help_text = config_help()
  lines = []
  for section, sub in cfg.items():
    lines.append(f"[{section}]")
    for key, value in sub.items():
      value = value.to_dict() if hasattr(value, "to_dict") else value
      text = help_text.get(f"{section}.{key}", "")
      lines.append(f"  {section}.{key} = {value!r}" + (f"    # {text}" if text else ""))
  return "\n".join(lines)


def check_override_keys(argv, flag: str = "config") -> None:
  """Raises ValueError naming the fix for a `--config.a.b=v` whose key is not in the schema.

  (ml_collections reports it as a ~70-line traceback with the suggestion buried in it.)
  """
  import difflib  # pylint: disable=import-outside-toplevel
  schema = base_config()
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split("=", 1)[0]
    node, walked = schema, []
    for key in path.split("."):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(walked) or "the config"
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {'.'.join(walked + close)!r}?)" if close else ""
        raise ValueError(f"unknown config key {path!r} in {arg!r}: {where} has no key "
                         f"{key!r}{hint}. Known keys there: {known}; --print_config lists "
                         "every key with its help")
      node = node[key]
      walked.append(key)


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """A locked full config: the schema's defaults updated with `values` (unknown keys raise)."""
  cfg = base_config()

  def merge(node, updates, where):
    for key, value in updates.items():
      if key not in node:
        raise ValueError(f"unknown config key {where}{key}")
      if isinstance(value, dict) and isinstance(node[key], ml_collections.ConfigDict):
        merge(node[key], value, f"{where}{key}.")
      else:
        node[key] = value

  merge(cfg, values, "")
  cfg.lock()
  return cfg
