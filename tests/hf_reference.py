"""An independent HF-side oracle for tests/test_hf.py: it never imports mmfree_jax.

- `hf_tensor_names` / `random_hf_weights`: the HF key layout of `ridger/MMfreeLM-*`
  (docs/architecture.md §1.6) with torch shapes (`Linear.weight` is `[out, in]`), random values.
- `write_hf_checkpoint`: config.json + model.safetensors written with the safetensors
  library (not our writer).
- `forward`: HGRNBitForCausalLM logits in plain numpy float64, written from the formulas of
  docs/architecture.md §1, reading the HF tensor names directly.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import save_file

BITLINEAR_EPS = 1e-6  # RMSNorm inside FusedBitLinear


# ------------------------------------------------------------------------- layout and files


def glu_width(config: dict) -> int:
  """HGRNBitMLP's intermediate size: explicit, or 256 * ceil(int(d * ratio * 2/3) / 256)."""
  if config.get("intermediate_size") is not None:
    return config["intermediate_size"]
  ratio = config.get("hidden_ratio") or 4
  return 256 * math.ceil(int(config["hidden_size"] * ratio * 2 / 3) / 256)


def hf_tensor_names(config: dict) -> dict[str, tuple[int, ...]]:
  """`{name: torch shape}` of every tensor of HGRNBitForCausalLM (1 head, expand 1)."""
  d, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
  inter = glu_width(config)
  names = {
    "model.embeddings.weight": (vocab, d),
    "model.norm.weight": (d,),
    "lm_head.weight": (vocab, d),
    "lm_head.norm.weight": (d,),
  }
  if config.get("use_lower_bound", True):
    names["model.lower_bounds"] = (layers, d)
  for layer in range(layers):
    p = f"model.layers.{layer}."
    names[p + "attn_norm.weight"] = (d,)
    names[p + "mlp_norm.weight"] = (d,)
    names[p + "attn.g_norm.weight"] = (d,)
    for proj in "ifgo":
      names[p + f"attn.{proj}_proj.weight"] = (d, d)
      names[p + f"attn.{proj}_proj.norm.weight"] = (d,)
    names[p + "mlp.gate_proj.weight"] = (2 * inter, d)
    names[p + "mlp.gate_proj.norm.weight"] = (d,)
    names[p + "mlp.down_proj.weight"] = (d, inter)
    names[p + "mlp.down_proj.norm.weight"] = (inter,)
  return names


def random_hf_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights: every tensor random, norm weights around 1, lower bounds N(0,1)."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in hf_tensor_names(config).items():
    if name == "model.lower_bounds":
      value = rng.normal(0.0, 1.0, shape)
    elif name.endswith("norm.weight"):
      value = 1.0 + 0.2 * rng.normal(size=shape)
    elif name == "model.embeddings.weight":
      value = rng.normal(0.0, 1.0, shape)
    else:
      value = rng.normal(0.0, 0.05, shape)
    weights[name] = value.astype(np.float32)
  return weights


def write_hf_checkpoint(folder: str, config: dict, weights: dict[str, np.ndarray]) -> str:
  """config.json + model.safetensors (safetensors library, `format: pt`) into folder."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  return folder


# --------------------------------------------------------------------------- numpy forward


def _rmsnorm(x, weight, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
  return x * _sigmoid(x)


def _round_half_away(x):
  return np.sign(x) * np.floor(np.abs(x) + 0.5)


def bitlinear(x, weight, norm_weight):
  """FusedBitLinear. x `[..., in]`, weight `[out, in]` (torch), norm_weight `[in]`."""
  xn = _rmsnorm(x, norm_weight, BITLINEAR_EPS)
  sx = 127.0 / np.maximum(np.max(np.abs(xn), axis=-1, keepdims=True), 1e-5)
  xq = np.clip(_round_half_away(xn * sx), -128, 127) / sx
  sw = 1.0 / max(np.mean(np.abs(weight)), 1e-5)
  wq = np.clip(np.rint(weight * sw), -1, 1) / sw  # rint: half to even, like torch.round
  return xq @ wq.T


def _linear(w, name, x):
  return bitlinear(x, w[name + ".weight"], w[name + ".norm.weight"])


def layer_lower_bounds(lower_bounds):
  """`p = softmax(lower_bounds, 0); cumsum(p, 0) - p[0]` → `[layers, d]`."""
  e = np.exp(lower_bounds - lower_bounds.max(axis=0, keepdims=True))
  p = e / e.sum(axis=0, keepdims=True)
  return np.cumsum(p, axis=0) - p[0]


def hgrn_bit_attention(w, prefix, x, lower_bound, layer, eps):
  """HGRNBitAttention (1 head, expand 1, no conv): `x [B, T, d]` → `[B, T, d]`."""
  i = _linear(w, prefix + "i_proj", x)
  f = _sigmoid(_linear(w, prefix + "f_proj", x))
  if lower_bound is not None and layer > 0:
    f = lower_bound + (1 - lower_bound) * f
  i = _silu(i) * (1 - f)
  h = np.zeros_like(i[:, 0])
  hs = []
  for t in range(x.shape[1]):
    h = f[:, t] * h + i[:, t]
    hs.append(h)
  h = np.stack(hs, axis=1)
  g = _linear(w, prefix + "g_proj", x)
  o = _rmsnorm(g, w[prefix + "g_norm.weight"], eps) * h * _sigmoid(h)
  return _linear(w, prefix + "o_proj", o)


def hgrn_bit_mlp(w, prefix, x):
  """HGRNBitMLP: gate_proj d → 2I, split (gate, up), down_proj(silu(gate) * up)."""
  gate, up = np.split(_linear(w, prefix + "gate_proj", x), 2, axis=-1)
  return _linear(w, prefix + "down_proj", _silu(gate) * up)


def forward(weights: dict[str, np.ndarray], config: dict, tokens: np.ndarray) -> np.ndarray:
  """HGRNBitForCausalLM logits `[B, T, vocab]` float64 for int tokens `[B, T]`."""
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  eps = config.get("rms_norm_eps", 1e-6)
  lbs = None
  if config.get("use_lower_bound", True):
    lbs = layer_lower_bounds(w["model.lower_bounds"])
  x = w["model.embeddings.weight"][tokens]
  for layer in range(config["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    lb = None if lbs is None else lbs[layer]
    x = x + hgrn_bit_attention(
      w, p + "attn.", _rmsnorm(x, w[p + "attn_norm.weight"], eps), lb, layer, eps
    )
    x = x + hgrn_bit_mlp(w, p + "mlp.", _rmsnorm(x, w[p + "mlp_norm.weight"], eps))
  x = _rmsnorm(x, w["model.norm.weight"], eps)
  return bitlinear(x, w["lm_head.weight"], w["lm_head.norm.weight"])
