"""The config schema: every key declared once, with its default, help text and validator.

`SCHEMA[section][key]` is a `Field`; `base_config()` (the ml-collections ConfigDict that config
files copy and edit), `ModelConfig` and `DistillSettings` (their dataclass fields), the help of
`--print_config`, the validation (`config.validate`) and docs/architecture.md §5
(`python -m mmfree_jax.config --docs`) are all read from it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

from mmfree_jax.config import checks
from mmfree_jax.config.checks import BOOL, TEXT, Check, integer, number, one_of
from mmfree_jax.registry import ATTENTION_IMPLS, BITLINEAR_IMPLS, SCAN_TYPES

MODEL_KINDS = ("mmfree", "transformer")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
REMAT_NAMES = ("none", "full", "dots", "dots_no_batch")
NAN_POLICIES = ("skip", "stop")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
SCHEDULES = ("cosine", "linear", "constant")
DATA_SOURCES = ("builtin_kjv", "text", "jsonl", "tokens", "array_record")
DISTILL_INITS = ("teacher", "random")
CALIBRATIONS = ("none", "ternary", "rms", "all", "all_norm")
MESH_AXES = ("data", "fsdp", "context", "tensor")
# An Adam step moves each weight by about lr: far above 1 the weights overflow within steps.
MAX_LR = 1.0
# `*_every` keys: 0 turns the periodic action off.
EVERY_KEYS = ("log_every", "eval_every", "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: its default, help text and validator. `placeholder`: the type of a key
  whose default is None (so that a `--config.a.b=v` override parses)."""

  default: Any
  help: str
  check: Check
  placeholder: type | None = None


_DTYPE = one_of(DTYPE_NAMES + ("auto",))
_POSITIVE = integer(1)
_COUNT = integer(0)


def _lr_ok(value) -> bool:
  return number(0, MAX_LR).ok(value)


def _mesh_shape_ok(shape) -> bool:
  shape = shape.to_dict() if hasattr(shape, "to_dict") else shape
  return (
    isinstance(shape, dict)
    and set(shape) <= set(MESH_AXES)
    and all(checks.is_int(v) and (v >= 1 or v == -1) for v in shape.values())
    and list(shape.values()).count(-1) <= 1
  )


def _rules_ok(rules) -> bool:
  return isinstance(rules, (list, tuple)) and all(
    isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in rules
  )


SCHEMA: dict[str, dict[str, Field]] = {
  "model": {
    "kind": Field("mmfree", "architecture", one_of(MODEL_KINDS)),
    "vocab_size": Field(32000, "embedding / output rows (>= the tokenizer's ids)", _POSITIVE),
    "d_model": Field(1024, "hidden width", _POSITIVE),
    "num_layers": Field(24, "number of blocks", _POSITIVE),
    "hidden_ratio": Field(4, "GLU width = 256 * ceil(int(d * ratio * 2/3) / 256)", _POSITIVE),
    "intermediate_size": Field(
      None,
      "GLU width; None = derived from d_model, hidden_ratio",
      integer(1, allow_none=True),
      placeholder=int,
    ),
    "num_heads": Field(
      16, "transformer only: attention heads (the MLGRU has one head, as released)", _POSITIVE
    ),
    "num_kv_heads": Field(
      None,
      "transformer only: grouped-query K/V heads (Llama's num_key_value_heads); None = num_heads",
      integer(1, allow_none=True),
      placeholder=int,
    ),
    "rope_theta": Field(10000.0, "transformer only: RoPE base", number(0, low_open=True)),
    "attention_impl": Field(
      "auto",
      "transformer only (registry.ATTENTION_IMPLS): auto = the Pallas splash "
      "attention kernel on TPU, cuDNN flash attention on GPU, XLA's "
      "jax.nn.dot_product_attention elsewhere; naive = the T x T reference",
      one_of(ATTENTION_IMPLS),
    ),
    "use_lower_bound": Field(True, "MLGRU forget-gate lower bounds per layer", BOOL),
    "rms_norm_eps": Field(1e-6, "RMSNorm epsilon", number(0, low_open=True)),
    "scan_type": Field(
      "auto",
      "MLGRU recurrence (registry.SCAN_TYPES): auto = the "
      "Pallas kernel on GPU/TPU, sequential on CPU",
      one_of(SCAN_TYPES),
    ),
    "chunk_size": Field(64, "tokens per chunk for scan_type=chunked", _POSITIVE),
    "reset_at_doc_start": Field(
      True, "zero the recurrent state at each packed document start", BOOL
    ),
    "dtype": Field(
      "auto", "compute dtype: auto = bfloat16 on accelerators, float32 on CPU", _DTYPE
    ),
    "param_dtype": Field("float32", "dtype of the stored (latent) weights", _DTYPE),
    "remat": Field("none", "rematerialization of the layer scan", one_of(REMAT_NAMES)),
    "bitlinear_impl": Field(
      "auto",
      "mmfree only (registry.BITLINEAR_IMPLS): autodiff (quant.bitlinear), lean "
      "(custom backward keeping int8 codes; same numbers), fused (lean with the Pallas "
      "quantizer kernel), int8 (integer matmul forward); auto = fused on GPU/TPU, lean on "
      "CPU",
      one_of(BITLINEAR_IMPLS),
    ),
  },
  "data": {
    "source": Field("builtin_kjv", "where documents come from", one_of(DATA_SOURCES)),
    "paths": Field("", "comma-separated files or globs (array_record: prepared folders)", TEXT),
    "mixture": Field(
      "",
      "array_record only: one weight per data.paths folder (0.7,0.3); '' = by train tokens",
      TEXT,
    ),
    "text_field": Field("text", "the JSONL field holding the text", TEXT),
    "tokenizer": Field(
      "bpe:4096", "bpe:<vocab> (trained + cached) | hf:<tokenizer.json> | spm:<model>", TEXT
    ),
    "seq_len": Field(256, "tokens per training window", _POSITIVE),
    "val_fraction": Field(
      0.02, "share of documents held out for validation", number(0, 1, high_open=True)
    ),
    "seed": Field(0, "shuffle seed of the data pipeline", _COUNT),
    "worker_count": Field(0, "grain worker processes (0 = in-process)", _COUNT),
  },
  "train": {
    "steps": Field(
      1000, "optimizer steps of the whole run (the LR schedule spans them)", _POSITIVE
    ),
    "global_batch": Field(16, "rows per step over all devices", _POSITIVE),
    "microbatches": Field(
      1, "gradient accumulation: the batch is split into this many parts", _POSITIVE
    ),
    "seed": Field(0, "init / dropout seed", integer()),
    "loss_chunk_tokens": Field(
      0,
      "sequence positions per chunk of the head + cross-entropy (numerics.chunked_loss: no "
      "[tokens, vocab] logits, the same loss, one more head forward); a multiple of "
      "mesh.shape.context; 0 = unchunked",
      _COUNT,
    ),
    "log_every": Field(
      10, "metrics.jsonl row and log line every N steps (0 = only the last)", _COUNT
    ),
    "eval_every": Field(200, "validation every N steps (0 = off)", _COUNT),
    "eval_batches": Field(8, "validation batches per evaluation (0 = no validation)", _COUNT),
    "checkpoint_every": Field(
      200, "checkpoint every N steps (0 = only at the end / on stop)", _COUNT
    ),
    "keep_checkpoints": Field(3, "newest checkpoints kept", _POSITIVE),
    "nan_policy": Field(
      "skip", "a non-finite step: skip it, or stop the run", one_of(NAN_POLICIES)
    ),
    "max_consecutive_skips": Field(
      10, "nan_policy=skip gives up (as 'stop') past this many non-finite steps in a row", _POSITIVE
    ),
    "sample_tokens": Field(64, "tokens sampled by train.py after training (0 = none)", _COUNT),
    "peak_flops_per_device": Field(
      0.0, "for MFU; 0 = the datasheet value or a CPU measurement", number(0)
    ),
    "tracker": Field(
      "tensorboard", "metrics tracker (metrics.jsonl is always written)", one_of(TRACKERS)
    ),
    "lock_heartbeat_s": Field(
      60.0,
      "bucket workdir: the lock's holder proves it is alive every N s",
      number(0, low_open=True),
    ),
    "lock_stale_s": Field(
      300.0,
      "bucket workdir: a lock without a heartbeat for N s is taken over (>= 2 x heartbeat)",
      number(0, low_open=True),
    ),
  },
  "optim": {
    "lr": Field(
      3e-3, "peak learning rate", Check(lambda: f"a finite number in [0, {MAX_LR:g}]", _lr_ok)
    ),
    "schedule": Field("cosine", "decay after a linear warmup", one_of(SCHEDULES)),
    "warmup_steps": Field(100, "linear warmup steps (scaled to 10% of a shorter run)", _COUNT),
    "end_lr_ratio": Field(0.1, "final LR / peak LR for cosine and linear", number(0)),
    "weight_decay": Field(0.01, "AdamW decoupled weight decay (dense kernels only)", number(0)),
    "b1": Field(0.9, "Adam beta1", number(0, 1, high_open=True)),
    "b2": Field(0.95, "Adam beta2", number(0, 1, high_open=True)),
    "eps": Field(1e-8, "Adam epsilon", number(0, low_open=True)),
    "clip_norm": Field(1.0, "global gradient norm clip (0 = off)", number(0)),
    "z_loss": Field(0.0, "weight of the log-sum-exp^2 auxiliary loss (0 = off)", number(0)),
    "decay_embeddings": Field(False, "apply weight decay to the embedding too", BOOL),
  },
  "distill": {
    "teacher": Field(
      "",
      "'' = plain training; else a Transformer++ workdir or an HF Llama "
      "folder to distill from (mmfree_jax.train.distill)",
      TEXT,
    ),
    "teacher_step": Field(
      None, "teacher workdir step (None = its latest)", integer(0, allow_none=True), placeholder=int
    ),
    "init": Field(
      "teacher", "student init: teacher (mmfree_jax.convert) | random", one_of(DISTILL_INITS)
    ),
    "stage1_steps": Field(
      0, "per-layer hidden-state alignment steps before logit distillation", _COUNT
    ),
    "temperature": Field(1.0, "distillation softmax temperature", number(0, low_open=True)),
    "alpha": Field(
      0.5, "stage 2 loss: alpha * T^2 KL(teacher || student) + (1 - alpha) * CE", number(0, 1)
    ),
    "quant_ramp_steps": Field(
      0, "0 = ternary throughout; N = quantization strength 1/N .. 1", _COUNT
    ),
    "calibrate": Field(
      "all_norm",
      "init=teacher: scales of the student's init from the "
      "teacher (the ternary gain of each copied kernel and/or the teacher's "
      "o_proj/down_proj input RMS on step 0's batch; "
      "mmfree_jax.convert.calibrate)",
      one_of(CALIBRATIONS),
    ),
    "mapping": Field(
      "vkq",
      "init=teacher: teacher V, K, Q -> the MLGRU's i, f, g (any order)",
      Check("a permutation of 'vkq'", lambda v: isinstance(v, str) and sorted(v) == sorted("vkq")),
    ),
  },
  "mesh": {
    "shape": Field(
      {"data": -1, "fsdp": 1, "context": 1, "tensor": 1},
      "device mesh sizes "
      "per axis (context splits the sequence); one may be -1 (= the "
      "remaining devices)",
      Check(f"a dict of {MESH_AXES} sizes >= 1, at most one -1", _mesh_shape_ok),
    ),
    "dcn": Field(
      {"data": -1, "fsdp": 1, "context": 1, "tensor": 1},
      "multi-slice TPU: "
      "how many slices each mesh axis spans, within mesh.shape; one may be -1 "
      "(= the remaining slices; the default: data spans them)",
      Check(f"a dict of {MESH_AXES} sizes >= 1, at most one -1", _mesh_shape_ok),
    ),
    "axis_rules": Field(
      [
        ("activation_batch", ("data", "fsdp")),
        ("activation_seq", "context"),
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
      "logical axis -> mesh axes (MaxText style), one rule per name of "
      "parallel.sharding.LOGICAL_AXES",
      Check("a list of (name, mesh axes) pairs", _rules_ok),
    ),
  },
  "dist": {
    "coordinator": Field(
      "", "host:port of process 0 for multi-process runs ('' = single process / auto)", TEXT
    ),
    "num_processes": Field(0, "processes of a multi-process run (0 = auto)", _COUNT),
    "process_id": Field(-1, "this process's index (-1 = auto)", integer(-1)),
    "heartbeat_timeout_s": Field(
      100, "a dead peer is detected (and this process stops) after this many seconds", _POSITIVE
    ),
    "initialization_timeout_s": Field(
      300, "seconds to wait for every process at start-up", _POSITIVE
    ),
  },
}


def section_defaults(section: str) -> dict[str, Any]:
  """`{key: default}` of one section (fresh copies of mutable defaults)."""
  return {key: copy.deepcopy(f.default) for key, f in SCHEMA[section].items()}


def _section(section: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      key: config_dict.placeholder(f.placeholder) if f.placeholder else copy.deepcopy(f.default)
      for key, f in SCHEMA[section].items()
    }
  )


def base_model_config() -> ml_collections.ConfigDict:
  """The `model` section with its defaults."""
  return _section("model")


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults (docs/architecture.md §5). Config files copy and edit it."""
  cfg = ml_collections.ConfigDict()
  for section in SCHEMA:
    cfg[section] = _section(section)
  return cfg


def config_help() -> dict[str, str]:
  """Help text of every schema key, `{section.key: text}`."""
  return {f"{s}.{k}": f.help for s, fields in SCHEMA.items() for k, f in fields.items()}


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
    path = arg[len(prefix) :].split("=", 1)[0]
    node, walked = schema, []
    for key in path.split("."):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(walked) or "the config"
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {'.'.join(walked + close)!r}?)" if close else ""
        raise ValueError(
          f"unknown config key {path!r} in {arg!r}: {where} has no key "
          f"{key!r}{hint}. Known keys there: {known}; --print_config lists "
          "every key with its help"
        )
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
