"""Import Hugging Face `LlamaForCausalLM` checkpoints into the Transformer++ model (a teacher).

    python -m mmfree_jax.hf import --arch llama --src HF_DIR --workdir DIR [--dtype float32]

Llama's layout in our terms: RMSNorm, rotate-half RoPE (HF stores q/k already permuted for
it, as our `numerics.attention.rope` expects), causal softmax attention with grouped K/V heads
(`num_key_value_heads` → `model.num_kv_heads`), SwiGLU whose `gate_proj` and `up_proj` we hold
fused in one `[d, 2I]` kernel (gate columns first), untied or tied (`tie_word_embeddings`: the
embedding is copied into our untied `lm_head`).

Everything that cannot map is refused from config.json and the tensor names, before any
tensor is read: mixture-of-experts, sliding-window attention, attention/MLP biases, RoPE
scaling other than the default, a head_dim other than hidden_size / num_heads, activations
other than SiLU.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np

from mmfree_jax import paths
from mmfree_jax.checkpoint import loading
from mmfree_jax.config import ModelConfig, config_from_dict
from mmfree_jax.hf import checkpoint_io, mapping, staging, tensors
from mmfree_jax.hf.mapping import HFCheckpointError

MODEL_TYPES = ("llama", "mistral")  # mistral: only without a sliding window (= Llama layout)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
REQUIRED_KEYS = (
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "intermediate_size",
  "vocab_size",
)
# LlamaConfig's defaults for keys a config.json may omit.
DEFAULTS = {
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "hidden_act": "silu",
  "tie_word_embeddings": False,
  "attention_bias": False,
  "mlp_bias": False,
  "rope_scaling": None,
  "sliding_window": None,
}
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
# Buffers some older checkpoints store; they are derived from rope_theta, not weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the Llama name table.

  hf: HF tensor name (`{l}`: layer index); ours: dotted path in our param dict;
  transpose: torch `[out, in]` → our `[in, out]`; part: `(index, count)` when the HF tensor
  fills one of `count` equal column blocks of our (fused) kernel, else None.
  """

  hf: str
  ours: str
  transpose: bool
  part: tuple[int, int] | None = None


_L = "model.layers.{l}."
NAME_TABLE: tuple[Entry, ...] = (
  Entry("model.embed_tokens.weight", "embedding", False),
  Entry("model.norm.weight", "final_norm.scale", False),
  Entry("lm_head.weight", "lm_head.kernel", True),  # tied: read from model.embed_tokens
  Entry(_L + "input_layernorm.weight", "blocks.attn_norm.scale", False),
  *(Entry(_L + f"self_attn.{p}_proj.weight", f"blocks.attn.{p}_proj.kernel", True) for p in "qkvo"),
  Entry(_L + "post_attention_layernorm.weight", "blocks.mlp_norm.scale", False),
  Entry(_L + "mlp.gate_proj.weight", "blocks.mlp.gate_proj.kernel", True, (0, 2)),
  Entry(_L + "mlp.up_proj.weight", "blocks.mlp.gate_proj.kernel", True, (1, 2)),
  Entry(_L + "mlp.down_proj.weight", "blocks.mlp.down_proj.kernel", True),
)
TIED_HEAD_SOURCE = "model.embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor read into (a layer and column block of) one of our leaves."""

  hf_name: str
  ours: str
  layer: int | None
  transpose: bool
  part: tuple[int, int] | None
  hf_shape: tuple[int, ...]


# ------------------------------------------------------------------------------ config.json


def check_supported(hf_config: dict) -> None:
  """Raises HFCheckpointError naming the first setting that has no Transformer++ equivalent."""
  model_type = hf_config.get("model_type")
  if any(hf_config.get(k) for k in _MOE_KEYS):
    raise HFCheckpointError(
      f"config.json describes a mixture-of-experts model (model_type={model_type!r}, "
      f"{[k for k in _MOE_KEYS if hf_config.get(k)]}); only dense Llama-layout models can be "
      "imported (one SwiGLU MLP per layer)"
    )
  if model_type not in MODEL_TYPES:
    raise HFCheckpointError(
      f"config.json has model_type={model_type!r}; --arch llama imports {list(MODEL_TYPES)} "
      "(LlamaForCausalLM layout: RMSNorm, RoPE, SwiGLU, no biases)"
    )
  missing = [k for k in REQUIRED_KEYS if hf_config.get(k) is None]
  if missing:
    raise HFCheckpointError(
      f"config.json lacks {missing}; a Llama config needs {list(REQUIRED_KEYS)}"
    )
  values = {**DEFAULTS, **hf_config}
  if values["sliding_window"] is not None:
    raise HFCheckpointError(
      f"config.json has sliding_window={values['sliding_window']}: sliding-window attention "
      "is not supported (our attention is full causal); only sliding_window=null maps exactly"
    )
  for key in ("attention_bias", "mlp_bias"):
    if values[key]:
      raise HFCheckpointError(
        f"config.json has {key}=true: biases are not supported (our "
        "Transformer++ projections have none)"
      )
  if values["hidden_act"] not in ("silu", "swish"):
    raise HFCheckpointError(
      f"config.json has hidden_act={values['hidden_act']!r}; only 'silu' (SwiGLU) is supported"
    )
  scaling = values["rope_scaling"]
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind != "default":
      raise HFCheckpointError(
        f"config.json has rope_scaling={scaling!r}; only plain RoPE (rope_scaling null or "
        "rope_type 'default') is supported: llama3/linear/dynamic/yarn scaling would change "
        "the logits"
      )
  d, heads = values["hidden_size"], values["num_attention_heads"]
  kv_heads = values.get("num_key_value_heads") or heads
  if d % heads:
    raise HFCheckpointError(f"hidden_size={d} is not divisible by num_attention_heads={heads}")
  head_dim = values.get("head_dim")
  if head_dim is not None and head_dim != d // heads:
    raise HFCheckpointError(
      f"config.json has head_dim={head_dim} != hidden_size / num_attention_heads = "
      f"{d // heads}; our attention needs heads * head_dim == hidden_size"
    )
  if heads % kv_heads:
    raise HFCheckpointError(
      f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
    )


def model_section_from_llama(hf_config: dict, dtype: str) -> dict:
  """Our `model` config section (kind 'transformer') for an HF Llama config."""
  check_supported(hf_config)
  values = {**DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
  positive_int = mapping.positive_int
  ints = {k: positive_int(values, k) for k in REQUIRED_KEYS}
  kv_heads = values.get("num_key_value_heads") or ints["num_attention_heads"]
  return {
    "kind": "transformer",
    "vocab_size": ints["vocab_size"],
    "d_model": ints["hidden_size"],
    "num_layers": ints["num_hidden_layers"],
    "num_heads": ints["num_attention_heads"],
    "num_kv_heads": int(kv_heads),
    "intermediate_size": ints["intermediate_size"],
    "rope_theta": float(values["rope_theta"]),
    "rms_norm_eps": float(values["rms_norm_eps"]),
    "dtype": dtype,
    "param_dtype": dtype,
  }


def is_tied(hf_config: dict) -> bool:
  return bool(hf_config.get("tie_word_embeddings", DEFAULTS["tie_word_embeddings"]))


# ------------------------------------------------------------------------------ tensors


def slots(our_shapes: dict[str, tuple[int, ...]], num_layers: int, tied: bool) -> list[Slot]:
  """Expands NAME_TABLE against our flat `{path: shape}`; every param must be covered."""
  unmapped = sorted(set(our_shapes) - {e.ours for e in NAME_TABLE})
  if unmapped:
    raise HFCheckpointError(
      f"params {unmapped} have no Llama name in mmfree_jax.hf.llama.NAME_TABLE"
    )
  out = []
  for entry in NAME_TABLE:
    shape = tuple(our_shapes[entry.ours])
    hf = TIED_HEAD_SOURCE if (tied and entry.ours == "lm_head.kernel") else entry.hf
    layers = range(num_layers) if "{l}" in hf else [None]
    for layer in layers:
      leaf = shape if layer is None else shape[1:]
      if entry.part is not None:
        leaf = leaf[:-1] + (leaf[-1] // entry.part[1],)
      hf_shape = tuple(reversed(leaf)) if entry.transpose else leaf
      out.append(
        Slot(
          hf.format(l=layer) if layer is not None else hf,
          entry.ours,
          layer,
          entry.transpose,
          entry.part,
          hf_shape,
        )
      )
  return out


def check_weights(weights: tensors.WeightFiles, layout: list[Slot], note: str) -> None:
  """Names and shapes of the stored tensors against the layout, before reading any."""
  expected = {s.hf_name for s in layout}
  present = {n for n in weights.names if not n.endswith(_IGNORED_SUFFIXES)}
  biases = sorted(n for n in present if n.endswith(".bias"))
  if biases:
    raise HFCheckpointError(
      f"{weights.description} holds bias tensors {biases[:5]}: attention/"
      "MLP biases are not supported (our Transformer++ has none)"
    )
  experts = sorted(n for n in present if ".experts." in n or ".block_sparse_moe." in n)
  if experts:
    raise HFCheckpointError(
      f"{weights.description} holds mixture-of-experts tensors "
      f"{experts[:3]}: only dense Llama-layout MLPs can be imported"
    )
  natural = checkpoint_io.natural_key
  missing = sorted(expected - present, key=natural)
  if missing:
    raise HFCheckpointError(
      f"{weights.description} lacks {len(missing)} tensor(s) that config.json ({note}) "
      f"implies: {missing[:10]}. The weights and config.json disagree, or the download is "
      "incomplete"
    )
  # A tied checkpoint may still store lm_head.weight (HF ties it to the embedding on load).
  unexpected = sorted(present - expected - {"lm_head.weight"}, key=natural)
  if unexpected:
    raise HFCheckpointError(
      f"{weights.description} holds {len(unexpected)} tensor(s) a LlamaForCausalLM of "
      f"config.json ({note}) does not have: {unexpected[:10]}"
    )
  if "lm_head.weight" in present - expected:
    expected_head = next(s.hf_shape for s in layout if s.ours == "lm_head.kernel")
    if weights.shape("lm_head.weight") != expected_head:
      raise HFCheckpointError(
        f"lm_head.weight has shape {weights.shape('lm_head.weight')}, "
        f"config.json ({note}) implies {expected_head}"
      )
  for slot in layout:
    shape = weights.shape(slot.hf_name)
    if shape != slot.hf_shape:
      raise HFCheckpointError(
        f"{slot.hf_name} in {weights.file_of(slot.hf_name)} has shape "
        f"{shape}, but config.json ({note}) implies {slot.hf_shape}"
      )
    if weights.dtype_name(slot.hf_name) not in tensors.SAFETENSORS_DTYPES:
      raise HFCheckpointError(
        f"{slot.hf_name} is stored as {weights.dtype_name(slot.hf_name)}; "
        f"expected floating point ({sorted(tensors.SAFETENSORS_DTYPES)})"
      )


def read_params(
  weights: tensors.WeightFiles,
  layout: list[Slot],
  shapes: dict[str, tuple[int, ...]],
  dtype: np.dtype,
) -> dict[str, np.ndarray]:
  """Our flat `{path: array}` in `dtype`, filled one HF tensor at a time (one model copy)."""
  flat = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
  for slot in layout:
    tensor = weights.read(slot.hf_name)
    if slot.transpose:
      tensor = tensor.T
    target = flat[slot.ours] if slot.layer is None else flat[slot.ours][slot.layer]
    if slot.part is not None:
      index, count = slot.part
      width = target.shape[-1] // count
      target = target[..., index * width : (index + 1) * width]
    target[...] = tensor
    del tensor
  return flat


def _config_note(hf_config: dict) -> str:
  return ", ".join(
    f"{k}={hf_config.get(k)}"
    for k in (
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "intermediate_size",
      "vocab_size",
      "tie_word_embeddings",
    )
  )


def load_llama(
  src: str, *, dtype: str = "float32", allow_nonfinite: bool = False
) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads an HF Llama folder into memory: `(our model section, flat {path: numpy array})`.

  What `import_llama` writes to a workdir, and what distillation uses directly as a teacher.
  A tensor holding NaN/inf is refused unless allow_nonfinite.
  """
  np_dtype = checkpoint_io.numpy_dtype(dtype)
  hf_config = tensors.read_hf_config(src)
  section = model_section_from_llama(hf_config, dtype)
  model_cfg = ModelConfig.from_config(section)
  shapes = checkpoint_io.our_shapes(model_cfg)
  layout = slots(shapes, model_cfg.num_layers, is_tied(hf_config))
  with tensors.open_weights(src, allow_nonfinite=allow_nonfinite) as weights:
    check_weights(weights, layout, _config_note(hf_config))
    flat = read_params(weights, layout, shapes, np_dtype)
  return section, flat


def tokenizer_spec(folder: str) -> tuple[str, str] | None:
  """`(HF file name, our tokenizer kind)` of the tokenizer an HF folder ships, or None."""
  for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "spm")):
    if paths.isfile(paths.join(folder, name)):
      return name, kind
  return None


def import_llama(
  src: str, workdir: str, *, dtype: str = "float32", allow_nonfinite: bool = False
) -> dict:
  """Converts an HF Llama folder into a Transformer++ workdir (params-only step 0).

  The tokenizer file (tokenizer.json, else tokenizer.model) is copied and named in the
  workdir's data config; without one, data.tokenizer keeps its default and must be set to the
  teacher's tokenizer before training on it.
  """
  workdir = staging.check_workdir_destination(workdir)
  section, flat = load_llama(src, dtype=dtype, allow_nonfinite=allow_nonfinite)
  with staging.workdir_destination(workdir) as tmp:
    data = {}
    found = tokenizer_spec(src)
    if found is not None:
      name, kind = found
      paths.write_atomic(paths.join(tmp, name), paths.read_bytes(paths.join(src, name)))
      data["tokenizer"] = f"{kind}:{paths.join(workdir, name)}"
    cfg = config_from_dict({"model": section, "data": data})
    with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
      checkpoint_io.to_device_leaf_by_leaf(flat)
      checkpoint_io.save_params(tmp, mapping.unflatten(flat), cfg)
    loading.save_workdir_config(tmp, cfg)
  num_params = sum(int(np.prod(v.shape)) for v in flat.values())
  tokenizer = (
    cfg.data.tokenizer
    if found
    else (
      f"{cfg.data.tokenizer} (the default: {src} has no tokenizer.json or tokenizer.model; set "
      "data.tokenizer to the teacher's tokenizer)"
    )
  )
  return {"workdir": workdir, "num_params": num_params, "model": section, "tokenizer": tokenizer}
