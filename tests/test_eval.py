"""Evaluation: continuation log-likelihoods, state reuse, perplexity, multiple choice, the CLI.

Equivalence tests run tiny random models (perturbed params) in float64, where two correct
computations of the same log-probabilities agree to ~1e-13; the tolerance is 1e-9 (absolute,
on log-probs of magnitude ~5): a wrong state, offset or mask changes them by O(0.1).
"""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax import eval as ev
from mmfree_jax import generate as generate_lib
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.config import ModelConfig, base_config
from mmfree_jax.eval import multiple_choice, scoring
from mmfree_jax.eval.samples import SAMPLE_MC
from mmfree_jax.nn.model import build_model
from tests.perturb import perturb_params
from tests.test_cli_logging import log_headers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-9
VOCAB = 260
PAD = 32  # reference forwards run on [rows, PAD] right-padded sequences (one compile)


class ByteTok:
  """UTF-8 bytes 0..255, eos 256, bos 257, pad 258 (a BOS exercises the document start)."""

  vocab_size, eos_id, bos_id, pad_id = 259, 256, 257, 258

  def encode(self, text):
    return list(text.encode("utf-8"))

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ByteTokNoBos(ByteTok):
  bos_id = None


@functools.lru_cache(maxsize=None)
def _model(kind):
  """A float64 tiny model (build inside `jax.enable_x64`)."""
  cfg = ModelConfig.tiny(kind=kind, vocab_size=VOCAB, dtype="float64", param_dtype="float64")
  return perturb_params(build_model(cfg, 0))


def _without_resets(model):
  """The same params under `reset_at_doc_start=False` (the reference's packed behaviour)."""
  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, state)
  cfg = dataclasses.replace(model.cfg, reset_at_doc_start=False)
  for _, module in nnx.iter_modules(clone):
    if getattr(module, "cfg", None) == model.cfg:
      module.cfg = cfg
  return clone


_full_logits = nnx.jit(lambda m, t: m(t)[0])


def _reference_scores(model, requests):
  """Independent: softmax of the logits of one plain full forward over context + continuation.

  Returns (summed log-probs [n] f64, all-argmax flags [n], argmax after each context [n]).
  """
  rows = np.zeros((len(requests), PAD), np.int32)
  for r, (c, k) in enumerate(requests):
    rows[r, : len(c) + len(k)] = c + k
  logits = np.asarray(_full_logits(model, jnp.asarray(rows)), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))  # log softmax
  sums, greedy, next_after_context = [], [], []
  for r, (c, k) in enumerate(requests):
    positions = np.arange(len(c) - 1, len(c) + len(k) - 1)
    sums.append(float(np.sum(logp[r, positions, k])))
    greedy.append(bool(np.all(np.argmax(logp[r, positions], -1) == k)))
    next_after_context.append(int(np.argmax(logp[r, len(c) - 1])))
  return np.array(sums), greedy, next_after_context


TEXTS = ["uniform logits here!", "and some more text.."]  # 20 + 20 bytes


def _requests(seed=0):
  """3 contexts (one longer than chunk_len=8) x 3 continuations of 1-6 tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for length in (3, 13, 1):
    context = rng.integers(0, VOCAB, length).tolist()
    for n in (1, 4, 6):
      out.append((context, rng.integers(0, VOCAB, n).tolist()))
  return out


@pytest.mark.slow
@pytest.mark.parametrize(
  "kind,resets", [("mmfree", True), ("mmfree", False), ("transformer", True)]
)
def test_continuation_loglik_equals_full_forward_softmax(kind, resets):
  with jax.enable_x64(True):
    model = _model(kind)
    requests = _requests()
    _, _, argmax_next = _reference_scores(model, requests)
    # A one-token continuation equal to the argmax after its context must be greedy.
    requests.append((requests[0][0], [argmax_next[0]]))
    expected, greedy, _ = _reference_scores(model, requests)  # one document: resets moot
    scored_model = model if resets else _without_resets(model)
    assert scored_model.cfg.reset_at_doc_start == resets
    got = ev.score_continuations(scored_model, requests, batch_size=8, chunk_len=8)
  np.testing.assert_allclose([s.logprob for s in got], expected, rtol=0, atol=TOL)
  assert [s.is_greedy for s in got] == greedy and greedy[-1]
  assert [s.num_tokens for s in got] == [len(k) for _, k in requests]


def test_state_reuse_equals_scoring_each_choice_from_scratch(monkeypatch):
  prefilled = []
  prefill = scoring._prefill

  def counting_prefill(graphdef, params, contexts, rows, chunk_len):
    prefilled.extend(map(tuple, contexts))
    return prefill(graphdef, params, contexts, rows, chunk_len)

  monkeypatch.setattr(scoring, "_prefill", counting_prefill)
  with jax.enable_x64(True):
    model = _model("mmfree")
    requests = _requests(seed=1)
    shared = ev.score_continuations(model, requests, batch_size=8, chunk_len=8)
    distinct = {tuple(c) for c, _ in requests}
    assert sorted(prefilled) == sorted(distinct)  # each context prefilled exactly once
    alone = [ev.score_continuations(model, [r], batch_size=8, chunk_len=8)[0] for r in requests]
    recomputed = scoring._score_full_forward(model, requests, 8, None)  # context + choice, no state
  np.testing.assert_allclose(
    [s.logprob for s in shared], [s.logprob for s in alone], rtol=0, atol=TOL
  )
  np.testing.assert_allclose(
    [s.logprob for s in shared], [s.logprob for s in recomputed], rtol=0, atol=TOL
  )


def test_document_nll_uses_full_context_for_mmfree():
  """A 27-token document in chunks of 8 == one full forward over [bos] + document."""
  text = "In the beginning was the Wo"
  with jax.enable_x64(True):
    model = _model("mmfree")
    ids = ByteTok().encode(text)
    expected, _, _ = _reference_scores(model, [([ByteTok.bos_id], ids)])
    out = ev.perplexity_of_texts(model, ByteTok(), [text, ""], batch_size=8, chunk_len=8)
  assert out["tokens"] == len(ids) and out["documents"] == 1 and out["bytes"] == len(text)
  assert abs(out["nll_nats"] + expected[0]) < TOL
  assert abs(out["bits_per_byte"] - out["nll_nats"] / math.log(2) / len(text)) < 1e-12


def test_rolling_windows_match_lm_eval_example():
  # lm-eval's LM.loglikelihood_rolling docstring: tokens 0..9, prefix P, max length 4.
  P = 99
  got = ev.rolling_requests(list(range(10)), P, 4)
  assert got == [([P], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
  for max_len in (1, 2, 3, 5, 16):
    windows = ev.rolling_requests(list(range(13)), P, max_len)
    assert [t for _, cont in windows for t in cont] == list(range(13))  # each token once
    assert all(len(c) + len(k) - 1 <= max_len for c, k in windows)
  assert ev.rolling_requests([5, 6], P, None) == [([P], [5, 6])]


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_uniform_logits_give_perplexity_equal_to_vocab_size(kind):
  with jax.enable_x64(True):
    graphdef, state = nnx.split(_model(kind))
    model = nnx.merge(graphdef, state)
    kernel = model.lm_head.kernel
    kernel[...] = jnp.zeros_like(kernel[...])  # ternary or dense: all logits exactly 0
    rng = np.random.default_rng(0)
    tokens = rng.integers(32, 127, (4, 17)).astype(np.int32)  # ASCII: one byte per token
    segments = np.ones_like(tokens)
    segments[0, 9:] = 2  # a second document in row 0
    segments[1, 12:] = 0  # padding: not counted
    tokens[0, 8] = ByteTok.eos_id
    out = ev.perplexity_of_batches(model, [{"tokens": tokens, "segment_ids": segments}], ByteTok())
    texts = ev.perplexity_of_texts(model, ByteTok(), TEXTS, max_len=24, batch_size=8, chunk_len=8)
  assert out["tokens"] == int((segments[:, 1:] != 0).sum()) == 59
  assert out["bytes"] == 59 - 1  # the EOS target counts as a token but adds no bytes
  np.testing.assert_allclose([out["perplexity"], texts["perplexity"]], [VOCAB, VOCAB], rtol=1e-9)
  assert texts["tokens"] == texts["bytes"] == 40  # ASCII: one byte per token
  np.testing.assert_allclose(texts["bits_per_byte"], math.log2(VOCAB), rtol=1e-9)
  np.testing.assert_allclose(out["bits_per_byte"], 59 * math.log2(VOCAB) / 58, rtol=1e-9)


def test_multiple_choice_acc_and_length_normalised_acc(monkeypatch):
  examples = [
    ev.MCExample("ctx", ("a", "bbbb"), 1),
    ev.MCExample("ctx", ("cc", "d"), 0),
    ev.MCExample("", ("x", "yy", "z"), 2),
  ]
  # summed log-likelihoods: acc picks the higher sum, acc_norm the higher sum per byte.
  lls = [-2.0, -4.0, -3.0, -2.5, -1.0, -3.0, -0.5]
  monkeypatch.setattr(
    multiple_choice,
    "score_continuations",
    lambda model, requests, **kw: [ev.Scored(v, False, 1) for v in lls],
  )
  out = ev.evaluate_multiple_choice(None, ByteTok(), examples)
  assert out["predictions"] == [0, 1, 2]  # argmax of sums
  assert out["predictions_norm"] == [1, 0, 2]  # -2/1 < -4/4; -3/2 > -2.5/1; -1, -1.5, -0.5
  assert out["acc"] == pytest.approx(1 / 3) and out["acc_norm"] == pytest.approx(1.0)
  assert out["n"] == 3


def test_encode_pair_follows_lm_eval_split():
  tok, nobos = ByteTok(), ByteTokNoBos()
  # trailing context space moves into the continuation; the context starts with BOS
  assert ev.encode_pair(tok, "Hi ", "you") == ([257] + tok.encode("Hi"), tok.encode(" you"))
  assert ev.encode_pair(nobos, "Hi", " you") == (tok.encode("Hi"), tok.encode(" you"))
  # empty context: the prefix token (BOS, else EOS)
  assert ev.encode_pair(tok, "", "ab") == ([257], [97, 98])
  assert ev.encode_pair(nobos, "", "ab") == ([256], [97, 98])


def test_sample_mc_file_is_well_formed():
  examples = ev.load_mc_jsonl(SAMPLE_MC)
  assert len(examples) >= 30
  labels = [e.label for e in examples]
  assert len(set(labels)) > 1  # the right answer is not always in the same slot


@pytest.mark.parametrize(
  "line,message",
  [
    ('{"context": "a", "choices": ["b"]}', r"missing field\(s\) \['label'\]"),
    ('{"choices": ["b"], "label": 0}', r"missing field\(s\) \['context'\]"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "label 2 out of range"),
    ('{"context": "a", "choices": ["b"], "label": -1}', "label -1 out of range"),
    ('{"context": "a", "choices": [], "label": 0}', "non-empty list"),
    ('{"context": "a", "choices": ["b", ""], "label": 0}', "non-empty string"),
    ('{"context": "a", "choices": ["b"], "label": true}', "must be an int"),
    ('{"context": "a", "choices": ["b"], "label": 0', "invalid JSON"),
    ('["a", ["b"], 0]', "expected a JSON object"),
  ],
)
def test_malformed_mc_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  good = '{"context": "a", "choices": ["b"], "label": 0}'
  path.write_text(f"{good}\n\n{line}\n")
  with pytest.raises(ValueError, match=message) as info:
    ev.load_mc_jsonl(str(path))
  assert f"{path}:3:" in str(info.value)


def test_empty_or_missing_mc_file(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="no examples"):
    ev.load_mc_jsonl(str(tmp_path / "empty.jsonl"))
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    ev.load_mc_jsonl(str(tmp_path / "nope.jsonl"))


def test_bad_requests_raise():
  model = types.SimpleNamespace(cfg=ModelConfig.tiny())  # never run: the checks come first
  with pytest.raises(ValueError, match="empty continuation"):
    ev.score_continuations(model, [([1], [])])
  with pytest.raises(ValueError, match="empty context"):
    ev.score_continuations(model, [([], [1])])
  with pytest.raises(ValueError, match="token ids must be in"):
    ev.score_continuations(model, [([1], [10_000])])


def _tiny_config(kind="mmfree"):
  cfg = base_config()
  cfg.model.update(kind=kind, vocab_size=320, d_model=32, num_layers=2, num_heads=4)
  cfg.data.update(source="builtin_kjv", tokenizer="byte", seq_len=16)
  cfg.lock()
  return cfg


def _make_workdir(workdir, kind="mmfree", config=None):
  """A workdir holding a random tiny model at step 0 (as an importer would write it), of
  `config` (default `_tiny_config(kind)`)."""
  cfg = config or _tiny_config(kind)
  model = build_model(ModelConfig.from_config(cfg.model), 0)
  checkpointer = ckpt_lib.Checkpointer(str(workdir))
  checkpointer.save_params(0, nnx.split(model)[1].to_pure_dict(), json.loads(cfg.to_json()))
  checkpointer.close()
  loading.save_workdir_config(str(workdir), cfg)
  return model


def test_workdir_errors_are_clear(tmp_path):
  options = ev.EvalOptions(mc_files=[SAMPLE_MC])
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    ev.evaluate_workdir(str(tmp_path), options, tokenizer=ByteTok())
  loading.save_workdir_config(str(tmp_path), _tiny_config())
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in .*train first"):
    ev.evaluate_workdir(str(tmp_path), options, tokenizer=ByteTok())
  with pytest.raises(ValueError, match="empty prompt"):  # checked before loading anything
    ev.evaluate_workdir(str(tmp_path), ev.EvalOptions(prompts=["hi", ""]))
  with pytest.raises(ValueError, match="nothing to evaluate"):
    ev.evaluate_workdir(str(tmp_path), ev.EvalOptions())


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_cli_end_to_end(tmp_path):
  workdir = tmp_path / "wd"
  _make_workdir(workdir)
  doc = tmp_path / "doc.txt"
  paragraphs = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void.",
  ]
  doc.write_text("\n\n".join(paragraphs) + "\n")
  prompt = "In the beginning God created the heaven and the earth, and"
  # PYTHONPATH: the user's runtime path, without the compile-only toolchains of .venv-accel
  # (their CUDA plugin logs `I0000 … cudart_stub.cc` lines on a host without a GPU).
  env = dict(os.environ, MMFREE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [
    sys.executable,
    os.path.join(REPO, "eval.py"),
    f"--workdir={workdir}",
    f"--mc_file={SAMPLE_MC}",
    "--mc_limit=6",
    f"--ppl_file={doc}",
    "--ppl_split=val",
    "--val_batches=1",
    f"--prompt={prompt}",
    "--max_new_tokens=5",
    "--batch_size=8",
    "--chunk_len=8",
  ]  # chunk_len 8: every scoring forward has one shape (fewer compiles)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "acc_norm" in proc.stdout and "perplexity" in proc.stdout
  # One log format (tests/test_cli_logging.py): our info lines plain, no absl `I1208 …` header.
  assert log_headers(proc.stdout + proc.stderr) == [], proc.stderr[-3000:]
  assert any(
    line.startswith("MatMul-free LM: no context limit") for line in proc.stderr.split("\n")
  )
  with open(workdir / "eval" / "step_0.json") as f:
    out = json.load(f)
  assert out["step"] == 0 and out["model"]["kind"] == "mmfree"
  mc = out["multiple_choice"]["sample_mc"]
  assert mc["n"] == 6 and 0.0 <= mc["acc"] <= 1.0 and len(mc["predictions"]) == 6
  ppl = out["perplexity"][str(doc)]
  assert ppl["documents"] == 2 and ppl["bytes"] == sum(map(len, paragraphs))
  assert 1.0 < ppl["perplexity"] < 320 * 3  # random init: near the vocabulary size
  (gen,) = out["generation"]
  assert gen["prompt_tokens"] == len(prompt) and 1 <= gen["new_tokens"] <= 5  # byte tokens
  # The prompt is longer than data.seq_len=16: fine for MatMul-free, and said so.
  assert "no context limit" in gen["notes"][0] and "exceed" in gen["notes"][0]
  assert "no context limit" in proc.stdout
  val = out["perplexity"]["val"]  # 1 batch of 8 windows of data.seq_len=16 from the KJV split
  assert 0 < val["tokens"] <= 8 * 16 and 0 < val["bytes"] <= val["tokens"]
  assert 1.0 < val["perplexity"] < 320 * 3

  # --config overrides: same architecture loads (other data settings), another one is refused.
  other = _tiny_config()
  with other.unlocked():
    other.data.seq_len = 64
  model, cfg, step = ev.load_for_eval(str(workdir), config=other)
  assert step == 0 and cfg.data.seq_len == 64 and model.cfg.d_model == 32
  with other.unlocked():
    other.model.d_model = 64
  with pytest.raises(ckpt_lib.CheckpointError, match="d_model"):
    ev.load_for_eval(str(workdir), config=other)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint step 7 .* available: \[0\]"):
    ev.load_for_eval(str(workdir), step=7)


def _write_tasks(folder, mc_path, docs_path):
  """Two harness tasks on local files: multiple choice and rolling log-likelihood."""
  (folder / "mmfree_sample_mc.yaml").write_text(f"""task: mmfree_sample_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc_path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
  (folder / "mmfree_sample_ppl.yaml").write_text(f"""task: mmfree_sample_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs_path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""")


@pytest.mark.slow
def test_lm_eval_adapter_runs_local_tasks_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed")
  from lm_eval.api.instance import Instance
  from lm_eval.tasks import TaskManager

  from mmfree_jax.eval.lm_eval_adapter import MMFreeLM

  mc_path = tmp_path / "mc.jsonl"
  mc_path.write_text("".join(open(SAMPLE_MC).readlines()[:8]))
  docs_path = tmp_path / "docs.jsonl"
  docs_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  _write_tasks(tmp_path, mc_path, docs_path)
  with jax.enable_x64(True):
    model = _model("mmfree")
    lm = MMFreeLM(model=model, tokenizer=ByteTok(), batch_size=8, chunk_len=8)
    out = lm_eval.simple_evaluate(
      model=lm,
      tasks=["mmfree_sample_mc", "mmfree_sample_ppl"],
      task_manager=TaskManager(include_path=str(tmp_path)),
    )
    ours = ev.evaluate_multiple_choice(
      model, ByteTok(), ev.load_mc_jsonl(str(mc_path)), batch_size=8, chunk_len=8
    )
    ppl = ev.perplexity_of_texts(model, ByteTok(), TEXTS, batch_size=8, chunk_len=8)
    # generate_until: greedy, cut at the stop string
    request = Instance("generate_until", {}, ("In the", {"until": ["\n"], "max_gen_toks": 3}), 0)
    (text,) = lm.generate_until([request])
    prompt = [ByteTok.bos_id] + ByteTok().encode("In the")  # starts as a training document
    new = generate_lib.generate(
      model, [prompt], generate_lib.SamplingConfig(max_new_tokens=3, eos_id=ByteTok.eos_id)
    )[0].tolist()
  mc, rolling = out["results"]["mmfree_sample_mc"], out["results"]["mmfree_sample_ppl"]
  assert mc["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
  assert mc["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
  assert rolling["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-9)
  expected = ByteTok().decode(new[: new.index(256)] if 256 in new else new).split("\n")[0]
  assert text == expected
