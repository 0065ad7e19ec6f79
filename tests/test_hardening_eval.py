"""Issue 16, eval/generation/HF side: generation limits, streaming and vocab masking, the
multiple-choice delimiter, eval.py output (table first, --output_dir, failed writes, x64), HF
import of tensors over orbax's cap, tokenizers through export/import, and a trained model's
train → export → import → eval round trip."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mmfree_jax import eval as ev
from mmfree_jax import generate as gen
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.config import ModelConfig, config_from_dict
from mmfree_jax.data.tokenizer import ByteTokenizer
from mmfree_jax.hf import checkpoint_io, mapping
from mmfree_jax.nn.model import abstract_model, build_model
from mmfree_jax.train import trainer
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "In the beginning God created the heaven and the earth.\n\nAnd the earth was void.\n"


def _random_workdir(path, *, param_dtype="float32", tokenizer="byte", vocab=320, seed=0):
  """A params-only workdir (as an importer writes it) with random weights, built in numpy."""
  cfg = config_from_dict(
    {
      "model": {
        "vocab_size": vocab,
        "d_model": 32,
        "num_layers": 2,
        "num_heads": 4,
        "param_dtype": param_dtype,
        "dtype": param_dtype,
      },
      "data": {"tokenizer": tokenizer, "seq_len": 16},
    }
  )
  _, state = nnx.split(abstract_model(ModelConfig.from_config(cfg.model)))
  rng = np.random.default_rng(seed)
  flat = {
    p: (rng.normal(0, 0.3, leaf.shape) + ("scale" in p)).astype(param_dtype)
    for p, leaf in mapping.flatten(state.to_pure_dict()).items()
  }
  checkpointer = ckpt_lib.Checkpointer(str(path))
  checkpointer.save_params(0, mapping.unflatten(flat), cfg.to_dict())
  checkpointer.close()
  loading.save_workdir_config(str(path), cfg)
  return flat


# ------------------------------------------------------------------------ 4. generation


def test_generation_limits_are_checked_before_anything_is_allocated():
  model = build_model(ModelConfig.tiny(kind="transformer", vocab_size=64, d_model=16), 0)
  with pytest.raises(ValueError, match="max_new_tokens=1000000000 is more than"):
    gen.generate(model, [[1, 2]], gen.SamplingConfig(max_new_tokens=10**9))
  # A 300k-token prompt: ~1.4 TB of attention scores in the prefill; refused up front.
  with pytest.raises(ValueError, match=r"needs about .* GiB .*prefill_attention_scores"):
    gen.generate(model, np.ones((1, 300_000), np.int32), gen.SamplingConfig(max_new_tokens=4))
  parts = gen.generation_memory_bytes(model.cfg, 2, 10, 6)
  assert parts["kv_cache"] == 2 * 2 * 2 * 16 * 4 * 4 * 4  # K+V, layers, batch, pos, heads, hd
  assert parts["output_ids"] == 2 * 6 * 4
  assert "decode_weights" not in parts
  frozen = gen.generation_memory_bytes(model.cfg, 2, 10, 6, frozen_copy=True)["decode_weights"]
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks, nnx.Param))) + 16 * 64
  assert n - 4 * 16 * model.cfg.num_layers <= frozen // 4 <= n  # all but the norms, fp32
  # bf16 on CPU: the freeze keeps the layers stacked for both kinds, so no copy is counted
  for kind in ("transformer", "mmfree"):
    bf16 = ModelConfig.tiny(kind=kind, vocab_size=64, d_model=16, dtype="bfloat16")
    assert "decode_weights" not in gen.generation_memory_bytes(bf16, 2, 10, 6, frozen_copy=True)


@pytest.mark.slow
def test_streaming_sees_each_token_and_ids_stay_in_the_tokenizer():
  model = build_model(ModelConfig.tiny(vocab_size=320, d_model=32), 0)  # byte tokenizer: 258
  seen = []
  cfg = gen.SamplingConfig(max_new_tokens=24, temperature=1.5)
  out = gen.generate(
    model,
    [[5, 6, 7]],
    cfg,
    seed=3,
    vocab_limit=258,
    on_tokens=lambda i, t: seen.append((i, int(t[0]))),
  )
  assert seen == list(enumerate(out[0].tolist()))  # in order, as produced
  assert out.max() < 258
  # Unmasked, the same sampling reaches ids the tokenizer cannot decode (the bug).
  assert gen.generate(model, [[5, 6, 7]], cfg, seed=3).max() >= 258
  pieces = []
  g = gen.generate_text(
    model, ByteTokenizer(), "In the", cfg._replace(eos_id=-5), seed=3, on_text=pieces.append
  )
  assert max(g.new_tokens) < 258 and "".join(pieces) == g.text and len(g.new_tokens) == 24


# --------------------------------------------------------------------- 6. mc delimiter


def test_mc_delimiter_scores_choices_that_carry_their_own_space(tmp_path):
  _random_workdir(tmp_path / "w")
  items = [
    {"context": "The heaven and the", "choices": ["earth", "sea", "sky"], "label": 0},
    {"context": "God said, let there be", "choices": ["light", "dark"], "label": 0},
  ]
  plain, spaced = tmp_path / "plain.jsonl", tmp_path / "spaced.jsonl"
  plain.write_text("\n".join(json.dumps(i) for i in items))
  spaced.write_text(
    "\n".join(json.dumps(dict(i, choices=[" " + c for c in i["choices"]])) for i in items)
  )
  kw = dict(tokenizer=ByteTokenizer(), write=False)
  a = ev.evaluate_workdir(str(tmp_path / "w"), ev.EvalOptions(mc_files=[str(plain)]), **kw)
  b = ev.evaluate_workdir(
    str(tmp_path / "w"), ev.EvalOptions(mc_files=[str(spaced)], mc_delimiter=""), **kw
  )
  c = ev.evaluate_workdir(str(tmp_path / "w"), ev.EvalOptions(mc_files=[str(spaced)]), **kw)
  ra, rb, rc = (r["multiple_choice"][n] for r, n in ((a, "plain"), (b, "spaced"), (c, "spaced")))
  assert ra["predictions"] == rb["predictions"] and ra["acc_norm"] == rb["acc_norm"]
  assert a["output"] is None  # write=False: the caller writes
  assert rc["n"] == 2  # a double space is scored differently (what the flag is for)


# ------------------------------------------------------------------------------ 6. HF


def test_import_of_a_tensor_over_the_concurrency_cap(tmp_path, monkeypatch):
  src = tmp_path / "src"
  flat = _random_workdir(src, tokenizer="spm:mistral")
  hf = str(tmp_path / "hf")
  checkpoint_io.export_checkpoint(str(src), hf)
  # A 1 kB cap: every stacked kernel is larger, as the 2.2 GB gate_proj is over orbax's 1 GB.
  monkeypatch.setattr(checkpoint_io, "SAVE_CONCURRENT_GB", 1e-6)
  assert checkpoint_io.save_concurrent_gb(mapping.unflatten(flat)) > 1e-6
  back = str(tmp_path / "back")
  checkpoint_io.import_checkpoint(hf, back)
  params, _ = loading.load_params(
    back, ModelConfig.from_config(loading.load_workdir_config(back).model)
  )
  for path, value in mapping.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), flat[path], err_msg=path)


def test_import_records_the_tokenizer_it_has_and_compares_only_architecture(tmp_path):
  src = tmp_path / "src"
  _random_workdir(src, tokenizer="byte")  # the byte tokenizer has no file form
  hf = str(tmp_path / "hf")
  out = checkpoint_io.export_checkpoint(str(src), hf)
  assert out["tokenizer"] is None and out["dtype"] == "float32"
  hf_config = json.load(open(os.path.join(hf, "config.json")))
  assert (hf_config["eos_token_id"], hf_config["bos_token_id"]) == (256, None)
  assert hf_config["torch_dtype"] == "float32"
  back = str(tmp_path / "back")
  assert checkpoint_io.import_checkpoint(hf, back)["tokenizer"] == ""  # none, not spm:mistral
  with pytest.raises(ValueError, match="records no tokenizer.*--tokenizer"):
    ev.evaluate_workdir(back, ev.EvalOptions(prompts=["x"]), write=False)
  named = str(tmp_path / "named")
  checkpoint_io.import_checkpoint(hf, named, tokenizer="byte")
  assert loading.load_workdir_config(named).data.tokenizer == "byte"
  # Another config of the same MLGRU shapes but num_heads 16: the MLGRU has no heads.
  cfg = loading.load_workdir_config(named)
  with cfg.unlocked():
    cfg.model.num_heads = 16
  _, _, step = ev.load_for_eval(named, config=cfg)
  assert step == 0


@pytest.mark.slow
def test_trained_bpe_model_round_trips_through_hf(tmp_path):
  work = str(tmp_path / "work")
  cfg = small_config(**{"data.tokenizer": "bpe:300", "train.steps": 2, "train.tracker": "none"})
  trainer.train(cfg, work, progress=False)
  hf, back = str(tmp_path / "hf"), str(tmp_path / "back")
  out = checkpoint_io.export_checkpoint(work, hf)  # default: the weights' float32
  assert out["tokenizer"] == "tokenizer.json" and out["dtype"] == "float32"
  hf_config = json.load(open(os.path.join(hf, "config.json")))
  assert hf_config["eos_token_id"] == 0 and hf_config["bos_token_id"] is None  # our BPE's
  imported = checkpoint_io.import_checkpoint(hf, back)
  assert imported["tokenizer"] == "hf:" + os.path.join(back, "tokenizer.json")
  assert not imported["notes"]
  doc = tmp_path / "doc.txt"
  doc.write_text(TEXT)
  options = ev.EvalOptions(
    ppl_files=[str(doc)],
    prompts=["In the beginning"],
    sampling=gen.SamplingConfig(max_new_tokens=8),
  )
  a = ev.evaluate_workdir(work, options, write=False)
  b = ev.evaluate_workdir(back, options, write=False)
  pa, pb = a["perplexity"][str(doc)], b["perplexity"][str(doc)]
  assert pa["tokens"] == pb["tokens"] and pa["perplexity"] == pb["perplexity"]
  assert a["generation"][0]["token_ids"] == b["generation"][0]["token_ids"]
  assert len(a["generation"][0]["token_ids"]) == a["generation"][0]["new_tokens"]


# -------------------------------------------------------------------------- 3. eval.py


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_cli_prints_first_warns_on_unwritable_output_and_enables_x64(tmp_path):
  work = tmp_path / "w64"
  _random_workdir(work, param_dtype="float64")
  doc = tmp_path / "doc.txt"
  doc.write_text(TEXT)
  blocker = tmp_path / "file"
  blocker.write_text("a file, not a folder")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [
    sys.executable,
    os.path.join(REPO, "eval.py"),
    f"--workdir={work}",
    f"--ppl_file={doc}",
    "--prompt=In the",
    "--max_new_tokens=4",
    "--chunk_len=8",
    f"--output_dir={blocker / 'eval'}",
  ]
  proc = subprocess.run(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300
  )
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:]
  assert "float64 model: x64 enabled" in out
  assert out.index("perplexity") < out.index("warning: could not write the results")
  assert "prompt: 'In the'\n→ " in out  # streamed
  good = tmp_path / "results"
  proc = subprocess.run(
    cmd[:-1] + [f"--output_dir={good}", "--stream=false"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.load(open(good / "step_0.json"))
  assert len(saved["generation"][0]["token_ids"]) == saved["generation"][0]["new_tokens"]
  assert not os.path.exists(work / "eval")
