"""HF Llama import (`python -m mmfree_jax.hf import --arch llama`) against an independent numpy
LlamaForCausalLM (tests/llama_reference.py, float64), and its early errors.

Tolerance: 1e-10 on logits of magnitude ~1-10 in float64 (both sides run the same formulas in
f64; measured differences ~1e-14).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax.checkpoint import loading
from mmfree_jax.hf import HFCheckpointError, llama
from mmfree_jax.hf.__main__ import main as hf_main
from mmfree_jax.nn import blockwise
from tests import llama_reference as ref

F64_TOL = 1e-10
BASE = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 64,
  "intermediate_size": 96,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 128,
  "rms_norm_eps": 1e-5,
  "rope_theta": 5000.0,  # not the default, so a mixed-up theta would show
  "hidden_act": "silu",
  "tie_word_embeddings": False,
  "attention_bias": False,
  "mlp_bias": False,
  "rope_scaling": None,
}
TOKENS = np.random.default_rng(3).integers(0, BASE["vocab_size"], (2, 11))
VARIANTS = {
  "gqa_untied": {},
  "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
}


def _write(folder, config, seed=0):
  weights = ref.random_llama_weights(config, seed)
  return ref.write_llama_checkpoint(str(folder), config, weights), weights


@nnx.jit
def _forward(model, tokens):
  return model(tokens)[0], blockwise.transformer_hidden_states(model, tokens)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_float64_matches_numpy_llama(tmp_path, variant):
  config = {**BASE, **VARIANTS[variant]}
  src, weights = _write(tmp_path / "hf", config)
  workdir = str(tmp_path / "imported")
  assert (
    hf_main(["import", "--arch", "llama", "--src", src, "--workdir", workdir, "--dtype", "float64"])
    == 0
  )
  want_logits, want_hidden = ref.forward(weights, config, TOKENS, return_hidden=True)
  with jax.enable_x64(True):
    model, cfg, step = loading.load_model(workdir)
    logits, hidden = jax.device_get(_forward(model, TOKENS))
  assert step == 0 and logits.dtype == np.float64
  np.testing.assert_allclose(logits, want_logits, rtol=0, atol=F64_TOL)
  np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=F64_TOL)
  assert np.abs(want_logits).max() > 0.5
  assert cfg.model.kind == "transformer"
  assert cfg.model.num_kv_heads == config["num_key_value_heads"]
  assert (cfg.model.rope_theta, cfg.model.rms_norm_eps) == (5000.0, 1e-5)


def test_fused_gate_up_and_tied_head_layout(tmp_path):
  config = {**BASE, "tie_word_embeddings": True}
  src, weights = _write(tmp_path / "hf", config, seed=1)
  section, flat = llama.load_llama(src)
  inter = config["intermediate_size"]
  fused = flat["blocks.mlp.gate_proj.kernel"][1]
  np.testing.assert_array_equal(fused[:, :inter], weights["model.layers.1.mlp.gate_proj.weight"].T)
  np.testing.assert_array_equal(fused[:, inter:], weights["model.layers.1.mlp.up_proj.weight"].T)
  np.testing.assert_array_equal(flat["lm_head.kernel"], weights["model.embed_tokens.weight"].T)
  assert flat["blocks.attn.k_proj.kernel"].shape == (2, 64, 32)  # 2 kv heads x head_dim 16
  assert section["num_kv_heads"] == 2


BAD_CONFIGS = [
  ({"model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts"),
  ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
  ({"attention_bias": True}, "bias"),
  ({"mlp_bias": True}, "bias"),
  ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
  ({"head_dim": 32}, "head_dim"),
  ({"hidden_act": "gelu"}, "hidden_act"),
  ({"num_key_value_heads": 3}, "num_key_value_heads"),
  ({"model_type": "gpt2"}, "model_type"),
]


@pytest.mark.parametrize("change,match", BAD_CONFIGS)
def test_unmappable_config_fails_before_reading_weights(tmp_path, change, match):
  src, _ = _write(tmp_path / "hf", BASE)
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump({**BASE, **change}, f)
  workdir = tmp_path / "out"
  with pytest.raises(HFCheckpointError, match=match):
    llama.import_llama(src, str(workdir))
  assert not workdir.exists()


def test_unmappable_weights_fail_with_the_tensor_named(tmp_path, capsys):
  src, weights = _write(tmp_path / "hf", BASE)
  from safetensors.numpy import save_file

  path = os.path.join(src, "model.safetensors")
  biased = {**weights, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
  save_file(biased, path)
  with pytest.raises(HFCheckpointError, match="q_proj.bias"):
    llama.load_llama(src)
  wrong = {**weights, "model.layers.1.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}
  save_file(wrong, path)
  with pytest.raises(HFCheckpointError, match=r"up_proj.weight .*\(95, 64\)"):
    llama.load_llama(src)
  missing = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.v_proj.weight"}
  save_file(missing, path)
  assert hf_main(["import", "--arch", "llama", "--src", src, "--workdir", str(tmp_path / "w")]) == 1
  assert "v_proj.weight" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_gqa_kv_cache_holds_kv_heads_and_decodes_like_the_full_forward(tmp_path):
  config = {**BASE}
  src, _ = _write(tmp_path / "hf", config, seed=2)
  workdir = str(tmp_path / "imported")
  llama.import_llama(src, workdir, dtype="float64")
  with jax.enable_x64(True):
    model, _, _ = loading.load_model(workdir)
    state = model.init_state(2, 24)
    # per layer: k, v [batch * kv_heads, head_dim, max_len]
    assert [a.shape for a in state.k + state.v] == [(4, 16, 24)] * 4

    @nnx.jit
    def prefill_then_decode(model, state):
      logits, state = model(TOKENS[:, :6], state=state)
      steps = [logits]
      for t in range(6, TOKENS.shape[1]):
        out, state = model(TOKENS[:, t : t + 1], state=state)
        steps.append(out)
      return jnp.concatenate(steps, axis=1)

    got = prefill_then_decode(model, state)
    want = _forward(model, TOKENS)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=F64_TOL)
