"""An independent HF Llama oracle for tests/test_llama.py: it never imports mmfree_jax.

- `llama_tensor_names` / `random_llama_weights`: the `LlamaForCausalLM` key layout with torch
  shapes (`Linear.weight` is `[out, in]`), GQA (`num_key_value_heads`) and tied embeddings.
- `write_llama_checkpoint`: config.json + model.safetensors written with the safetensors library.
- `forward`: LlamaForCausalLM logits in plain numpy float64 (RMSNorm, rotate-half RoPE, causal
  softmax attention with `repeat_kv`, SwiGLU), reading the HF tensor names directly.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file


def llama_tensor_names(config: dict) -> dict[str, tuple[int, ...]]:
  """`{name: torch shape}` of every tensor of LlamaForCausalLM (no biases)."""
  d, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
  heads = config["num_attention_heads"]
  kv_heads = config.get("num_key_value_heads") or heads
  head_dim = d // heads
  names = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
  if not config.get("tie_word_embeddings", False):
    names["lm_head.weight"] = (vocab, d)
  for layer in range(config["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    names[p + "input_layernorm.weight"] = (d,)
    names[p + "post_attention_layernorm.weight"] = (d,)
    names[p + "self_attn.q_proj.weight"] = (heads * head_dim, d)
    names[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, d)
    names[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, d)
    names[p + "self_attn.o_proj.weight"] = (d, heads * head_dim)
    names[p + "mlp.gate_proj.weight"] = (inter, d)
    names[p + "mlp.up_proj.weight"] = (inter, d)
    names[p + "mlp.down_proj.weight"] = (d, inter)
  return names


def random_llama_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights: norms around 1, embeddings N(0, 1), projections N(0, 0.1)."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in llama_tensor_names(config).items():
    if name.endswith("norm.weight"):
      value = 1.0 + 0.2 * rng.normal(size=shape)
    elif name == "model.embed_tokens.weight":
      value = rng.normal(0.0, 1.0, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    weights[name] = value.astype(np.float32)
  return weights


def write_llama_checkpoint(folder: str, config: dict, weights: dict[str, np.ndarray]) -> str:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  return folder


def _rmsnorm(x, weight, eps):
  return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x, positions, theta):
  """HF `apply_rotary_pos_emb`: x `[B, heads, T, hd]`, positions `[T]`."""
  hd = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  freqs = positions[:, None].astype(np.float64) * inv_freq[None]  # [T, hd/2]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return x * np.cos(emb) + _rotate_half(x) * np.sin(emb)


def _attention(w, p, x, config):
  batch, seq, d = x.shape
  heads = config["num_attention_heads"]
  kv_heads = config.get("num_key_value_heads") or heads
  hd = d // heads
  theta = config.get("rope_theta", 10000.0)
  q = (x @ w[p + "q_proj.weight"].T).reshape(batch, seq, heads, hd).transpose(0, 2, 1, 3)
  k = (x @ w[p + "k_proj.weight"].T).reshape(batch, seq, kv_heads, hd).transpose(0, 2, 1, 3)
  v = (x @ w[p + "v_proj.weight"].T).reshape(batch, seq, kv_heads, hd).transpose(0, 2, 1, 3)
  positions = np.arange(seq)
  q, k = _rope(q, positions, theta), _rope(k, positions, theta)
  k = np.repeat(k, heads // kv_heads, axis=1)  # repeat_kv: query head h reads kv head h // rep
  v = np.repeat(v, heads // kv_heads, axis=1)
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
  scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
  probs = scores / scores.sum(axis=-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, heads * hd)
  return out @ w[p + "o_proj.weight"].T


def _mlp(w, p, x):
  gate = x @ w[p + "gate_proj.weight"].T
  up = x @ w[p + "up_proj.weight"].T
  return (_silu(gate) * up) @ w[p + "down_proj.weight"].T


def forward(
  weights: dict[str, np.ndarray], config: dict, tokens: np.ndarray, return_hidden: bool = False
):
  """LlamaForCausalLM logits `[B, T, vocab]` float64 for int tokens `[B, T]`.

  return_hidden: also return the residual stream before each layer and after the last,
    `[layers + 1, B, T, d]` (HF's `output_hidden_states` without the final norm).
  """
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  eps = config.get("rms_norm_eps", 1e-6)
  x = w["model.embed_tokens.weight"][tokens]
  hidden = [x]
  for layer in range(config["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    x = x + _attention(
      w, p + "self_attn.", _rmsnorm(x, w[p + "input_layernorm.weight"], eps), config
    )
    x = x + _mlp(w, p + "mlp.", _rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps))
    hidden.append(x)
  head = (
    w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
  )
  logits = _rmsnorm(x, w["model.norm.weight"], eps) @ head.T
  return (logits, np.stack(hidden)) if return_hidden else logits
