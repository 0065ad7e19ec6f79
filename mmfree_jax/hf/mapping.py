"""What a Hugging Face `hgrn_bit` checkpoint means in our terms: config keys and tensor names.

`NAME_TABLE` is the one table of `(HF name pattern, our param path, transpose?)` that both
import and export read (docs/architecture.md §1.6). A pattern with `{l}` is one tensor per
layer; our side stacks those on a leading `layers` axis. Torch `Linear` weights are
`[out, in]`, our kernels `[in, out]`: those rows say `transpose=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from mmfree_jax import config as config_lib


class HFCheckpointError(ValueError):
  """An HF checkpoint (or a request to write one) that we cannot convert faithfully."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the name table.

  hf: HF tensor name; `{l}` stands for the layer index of a per-layer tensor.
  ours: dotted path in our param dict (`nnx.split(model)[1].to_pure_dict()`).
  transpose: True for Linear weights (torch `[out, in]` vs our `[in, out]`).
  """

  hf: str
  ours: str
  transpose: bool

  @property
  def per_layer(self) -> bool:
    return "{l}" in self.hf


_LAYER = "model.layers.{l}."
NAME_TABLE: tuple[Entry, ...] = (
  Entry("model.embeddings.weight", "embedding", False),
  Entry("model.lower_bounds", "lower_bounds", False),  # only with use_lower_bound
  Entry("model.norm.weight", "final_norm.scale", False),
  Entry("lm_head.weight", "lm_head.kernel", True),
  Entry("lm_head.norm.weight", "lm_head.norm_scale", False),
  Entry(_LAYER + "attn_norm.weight", "blocks.attn_norm.scale", False),
  *(Entry(_LAYER + f"attn.{p}_proj.weight", f"blocks.attn.{p}_proj.kernel", True) for p in "ifgo"),
  *(
    Entry(_LAYER + f"attn.{p}_proj.norm.weight", f"blocks.attn.{p}_proj.norm_scale", False)
    for p in "ifgo"
  ),
  Entry(_LAYER + "attn.g_norm.weight", "blocks.attn.g_norm.scale", False),
  Entry(_LAYER + "mlp_norm.weight", "blocks.mlp_norm.scale", False),
  Entry(_LAYER + "mlp.gate_proj.weight", "blocks.mlp.gate_proj.kernel", True),
  Entry(_LAYER + "mlp.gate_proj.norm.weight", "blocks.mlp.gate_proj.norm_scale", False),
  Entry(_LAYER + "mlp.down_proj.weight", "blocks.mlp.down_proj.kernel", True),
  Entry(_LAYER + "mlp.down_proj.norm.weight", "blocks.mlp.down_proj.norm_scale", False),
)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor and where it lives on our side.

  layer: index into the leading `layers` axis of our leaf, or None (the whole leaf).
  hf_shape: the HF tensor's shape (torch layout).
  """

  hf_name: str
  ours: str
  layer: int | None
  transpose: bool
  hf_shape: tuple[int, ...]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """Nested param dict → `{dotted.path: leaf}`."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


def unflatten(flat: dict[str, Any]) -> dict:
  """`{dotted.path: leaf}` → nested param dict (inverse of `flatten`)."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split(".")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def slots(our_shapes: dict[str, tuple[int, ...]], num_layers: int) -> Iterator[Slot]:
  """Expands `NAME_TABLE` against our flat `{path: shape}` (rows absent from it are skipped).

  Raises if one of our params has no row: the table and the model must cover each other.
  """
  mapped = {e.ours for e in NAME_TABLE}
  unmapped = sorted(set(our_shapes) - mapped)
  if unmapped:
    raise HFCheckpointError(
      f"params {unmapped} have no HF name in mmfree_jax.hf.NAME_TABLE; add rows for them"
    )
  for entry in NAME_TABLE:
    if entry.ours not in our_shapes:
      continue
    shape = tuple(our_shapes[entry.ours])
    if entry.per_layer:
      for layer in range(num_layers):
        yield Slot(
          entry.hf.format(l=layer),
          entry.ours,
          layer,
          entry.transpose,
          _hf_shape(shape[1:], entry.transpose),
        )
    else:
      yield Slot(entry.hf, entry.ours, None, entry.transpose, _hf_shape(shape, entry.transpose))


def _hf_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
  return tuple(reversed(shape)) if transpose else tuple(shape)


# ------------------------------------------------------------------------------ config.json

# HGRNBitConfig's defaults (ridgerchu/matmulfreellm, configuration_hgrn_bit.py): a key absent
# from config.json takes these values, as `from_pretrained` would.
REFERENCE_DEFAULTS: dict[str, Any] = {
  "vocab_size": 32000,
  "hidden_size": 2048,
  "num_hidden_layers": 24,
  "attn_mode": "fused_recurrent",
  "num_heads": 1,
  "expand_ratio": 1,
  "use_short_conv": False,
  "conv_size": 4,
  "share_conv_kernel": True,
  "use_lower_bound": True,
  "hidden_ratio": 4,
  "intermediate_size": None,
  "hidden_act": "swish",
  "max_position_embeddings": 2048,
  "rms_norm_eps": 1e-6,
  "use_cache": True,
  "pad_token_id": None,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "tie_word_embeddings": False,
  "initializer_range": 0.02,
  "fuse_cross_entropy": True,
}
# Keys whose value must be one of these: our MLGRU is the released 1-head, expand-1,
# no-conv variant, and the reference implements only the fused_recurrent mode.
SUPPORTED_VALUES: dict[str, tuple] = {
  "num_heads": (1,),
  "expand_ratio": (1,),
  "use_short_conv": (False,),
  "attn_mode": ("fused_recurrent",),
  "tie_word_embeddings": (False,),
}
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")
MODEL_TYPE = "hgrn_bit"
ARCHITECTURES = ["HGRNBitForCausalLM"]


def check_supported(hf_config: dict) -> None:
  """Raises HFCheckpointError naming the supported values for any unsupported setting."""
  model_type = hf_config.get("model_type", MODEL_TYPE)
  if model_type != MODEL_TYPE:
    raise HFCheckpointError(
      f"config.json has model_type={model_type!r}; only {MODEL_TYPE!r} "
      "(HGRNBitForCausalLM, ridger/MMfreeLM-*) can be imported"
    )
  missing = [k for k in REQUIRED_KEYS if hf_config.get(k) is None]
  if missing:
    raise HFCheckpointError(
      f"config.json lacks {missing}; an hgrn_bit config needs {list(REQUIRED_KEYS)}"
    )
  for key, allowed in SUPPORTED_VALUES.items():
    value = hf_config.get(key, REFERENCE_DEFAULTS[key])
    if value not in allowed or type(value) is not type(allowed[0]):
      raise HFCheckpointError(
        f"config.json has {key}={value!r}, which mmfree_jax does not support; supported: "
        f"{key} in {list(allowed)} (the released MMfreeLM models use {allowed[0]!r})"
      )


def positive_int(hf_config: dict, key: str) -> int:
  value = hf_config[key]
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise HFCheckpointError(f"config.json has {key}={value!r}; expected a positive integer")
  return value


def model_section_from_hf(hf_config: dict, dtype: str) -> dict:
  """Our `model` config section (kind 'mmfree') for an HF hgrn_bit config.

  dtype: our `param_dtype` and compute `dtype` (override the latter at load time with
    `loading.load_model(..., model_overrides={"dtype": ...})`).
  """
  check_supported(hf_config)
  values = {**REFERENCE_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
  if values.get("hidden_ratio") is None:
    values["hidden_ratio"] = 4  # HGRNBitMLP's fallback
  d_model = positive_int(values, "hidden_size")
  hidden_ratio = positive_int(values, "hidden_ratio")
  intermediate = values.get("intermediate_size")
  if intermediate is None:
    intermediate = config_lib.intermediate_size_for(d_model, hidden_ratio)
  else:
    intermediate = positive_int(values, "intermediate_size")
  return {
    "kind": "mmfree",
    "vocab_size": positive_int(values, "vocab_size"),
    "d_model": d_model,
    "num_layers": positive_int(values, "num_hidden_layers"),
    "hidden_ratio": hidden_ratio,
    "intermediate_size": intermediate,
    "use_lower_bound": bool(values["use_lower_bound"]),
    "rms_norm_eps": float(values["rms_norm_eps"]),
    "dtype": dtype,
    "param_dtype": dtype,
  }


def hf_config_from_model(
  model_cfg: config_lib.ModelConfig,
  *,
  torch_dtype: str,
  bos_token_id: int | None = 1,
  eos_token_id: int = 2,
  pad_token_id: int | None = None,
) -> dict:
  """The `config.json` HGRNBitForCausalLM would write for this model (reference keys)."""
  if model_cfg.kind != "mmfree":
    raise HFCheckpointError(
      f"only model.kind='mmfree' exports to the {MODEL_TYPE} layout; "
      f"this workdir holds kind={model_cfg.kind!r}"
    )
  cfg = {"architectures": list(ARCHITECTURES), "model_type": MODEL_TYPE, **REFERENCE_DEFAULTS}
  cfg.update(
    vocab_size=model_cfg.vocab_size,
    hidden_size=model_cfg.d_model,
    num_hidden_layers=model_cfg.num_layers,
    hidden_ratio=model_cfg.hidden_ratio,
    intermediate_size=model_cfg.intermediate_size,
    use_lower_bound=model_cfg.use_lower_bound,
    rms_norm_eps=model_cfg.rms_norm_eps,
    bos_token_id=bos_token_id,
    eos_token_id=eos_token_id,
    pad_token_id=pad_token_id,
    torch_dtype=torch_dtype,
  )
  return dict(sorted(cfg.items()))
